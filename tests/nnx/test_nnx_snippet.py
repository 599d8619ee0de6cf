"""The NNX snippet (fracq.nnx's docstring, the README's NNX section) runs
as written on the NNX digits CNN."""

import os
import re

import jax
import numpy as np
from flax import nnx

import fracq.nnx
from fracq import export
from fracq.data import digits
from fracq.nnx.models import DigitsCNN


def test_nnx_snippet_runs(tmp_path):
  code = re.search(r'```python\n(.*?)```', fracq.nnx.__doc__, re.S).group(1)
  x, y = digits.load_digits_split()[:2]
  model = DigitsCNN(widths=(8, 8, 8, 8, 8), rngs=nnx.Rngs(0))
  # A fresh namespace: the snippet's own imports only.
  env = {
    'my_nnx_model': model,
    'sample_batch': jax.numpy.asarray(x[:16]),
    'labels': jax.numpy.asarray(y[:16]),
    'artifact_path': str(tmp_path / 'model.fracq.safetensors'),
  }
  exec(compile(code, 'fracq.nnx', 'exec'), env)  # pylint: disable=exec-used
  assert np.isfinite(float(env['loss']))
  qmodel = env['qmodel']
  assert qmodel.hard and not isinstance(model.conv1, fracq.nnx.QuantizedLayer)
  frozen = {
    '/'.join(map(str, path)): np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(env['stats'])
    if path[-1] == 'kernel_hard_bits'
  }
  assert set(frozen) == {f'model/conv{i}/kernel_hard_bits' for i in range(1, 5)}
  assert all(np.all(bits >= 2) for bits in frozen.values())
  _, _, manifest = export.read_artifact(env['artifact_path'])
  assert manifest['tensors']['conv1/kernel.packed']['bits'] == int(
    frozen['model/conv1/kernel_hard_bits']
  )


def test_readme_nnx_snippet_is_the_executed_one():
  """The README's NNX section shows the snippet executed above, verbatim."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  with open(os.path.join(root, 'README.md')) as f:
    text = f.read()
  found = re.search(
    r'```python\n(import fracq\nimport fracq\.nnx\n.*?)```', text, re.S
  )
  assert found, "the README's NNX section has no snippet (import fracq.nnx)"
  code = re.search(r'```python\n(.*?)```', fracq.nnx.__doc__, re.S).group(1)
  assert found.group(1) == code
