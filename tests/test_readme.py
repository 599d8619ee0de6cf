"""The README's library snippet runs as written (on the digits CNN)."""

import os
import re

import jax
import numpy as np

from fracq import models
from fracq.data import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_snippet_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(r'```python\n(import fracq.*?)```', text, re.S).group(1)
  x = digits.load_digits_split()[0][:16]
  env = {'my_flax_module': models.get_model('digits_cnn'),
         'sample_batch': x, 'rng': jax.random.key(0), 'step': 0}
  exec(compile(code, 'README.md', 'exec'), env)  # pylint: disable=exec-used
  assert env['logits'].shape == (16, 10)
  assert np.isfinite(float(env['penalty']))
  assert 'cost_integer' in env['hard'].metrics(env['variables'])


def test_readme_pcqat_snippet_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(r'```python\n(from fracq.methods import preserve.*?)```',
                   text, re.S).group(1)
  env = {'my_flax_module': models.get_model('digits_cnn'),
         'sample_batch': digits.load_digits_split()[0][:16],
         'rng': jax.random.key(0)}
  exec(compile(code, 'README.md', 'exec'), env)  # pylint: disable=exec-used
  for path in ('conv1', 'head'):
    w = np.asarray(env['plain']['params'][path]['kernel'])
    assert abs(np.mean(w == 0) - 0.5) < 0.01
    assert np.unique(w).size <= 16
