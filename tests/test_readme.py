"""The README: its library snippets run as written (on the digits CNN), and
the numbers its results passages print are the ones in the result files."""

import json
import os
import re

import jax
import numpy as np

import fracq
from fracq import models
from fracq.data import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_snippet_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(r'```python\n(import fracq.*?)```', text, re.S).group(1)
  x = digits.load_digits_split()[0][:16]
  env = {
    'my_flax_module': models.get_model('digits_cnn'),
    'sample_batch': x,
    'rng': jax.random.key(0),
    'step': 0,
  }
  exec(compile(code, 'README.md', 'exec'), env)  # pylint: disable=exec-used
  assert env['logits'].shape == (16, 10)
  assert np.isfinite(float(env['penalty']))
  assert 'cost_integer' in env['hard'].metrics(env['variables'])


def test_readme_transformer_snippet_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(
    r'```python\n(from fracq import models.*?)```', text, re.S
  ).group(1)
  env = {'fracq': fracq, 'jax': jax, 'rng': jax.random.key(0)}
  exec(compile(code, 'README.md', 'exec'), env)  # pylint: disable=exec-used
  assert env['logits'].shape == (2, 16, 256)
  assert env['qmodel'].facts['embed'].weight_quantized
  step = env['variables']['quant']['block_0']['mlp_up']['kernel_step']
  assert step.shape == (32 // 16 * 128,)


def test_readme_pcqat_snippet_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(
    r'```python\n(from fracq.methods import preserve.*?)```', text, re.S
  ).group(1)
  env = {
    'my_flax_module': models.get_model('digits_cnn'),
    'sample_batch': digits.load_digits_split()[0][:16],
    'rng': jax.random.key(0),
  }
  exec(compile(code, 'README.md', 'exec'), env)  # pylint: disable=exec-used
  for path in ('conv1', 'head'):
    w = np.asarray(env['plain']['params'][path]['kernel'])
    assert abs(np.mean(w == 0) - 0.5) < 0.01
    assert np.unique(w).size <= 16


# A README passage quoting measured numbers sits between
#   <!-- from: experiments/results/NAME.json [more result files] -->
# and <!-- /from -->, and every number it prints (outside code spans) must be
# one a named result holds: a number of the table the experiment script
# wrote from it (NAME.md), or a value of the JSON at the README's precision.
_FROM = re.compile(r'<!-- from: ([^>]+?) -->(.*?)<!-- /from -->', re.S)
_NUMBER = re.compile(r'\d+(?:,\d{3})*(?:\.\d+)?')


def _numbers(text):
  """Numbers printed in ``text`` outside code spans, as written (thousands
  commas removed). Skipped: digits inside names (w8a8, conv3, ResNet-18)
  and bit-width settings ('8-bit', 'uniform 3-bit size'); a trailing 'x'
  (a ratio, 2.62x) is allowed."""
  text = re.sub(r'`[^`]*`', ' ', text)
  out = []
  for m in _NUMBER.finditer(text):
    before = text[m.start() - 1] if m.start() else ' '
    after = text[m.end()] if m.end() < len(text) else ' '
    named = before == '-' and m.start() > 1 and text[m.start() - 2].isalpha()
    setting = text.startswith('-bit', m.end())
    if (
      before.isalpha()
      or before == '_'
      or named
      or setting
      or (after.isalpha() and after != 'x')
    ):
      continue
    out.append(m.group().replace(',', ''))
  return out


def _json_values(value):
  if isinstance(value, bool):
    return []
  if isinstance(value, (int, float)):
    return [value]
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, list):
    return [x for v in value for x in _json_values(v)]
  return []


def _result_numbers(path):
  """The numbers a result holds: its script-written table's, and its JSON
  values (kept raw; formatted at the README's precision when compared)."""
  table = set()
  md = path[: -len('.json')] + '.md'
  if os.path.exists(md):
    table = set(_numbers(open(md).read()))
  with open(path) as f:
    return table, _json_values(json.load(f))


def _in_result(number, table, values):
  if number in table:
    return True
  decimals = len(number.partition('.')[2])
  return any(f'{v:.{decimals}f}' == number for v in values)


def _from_blocks(text):
  return [(m.group(1).split(), m.group(2)) for m in _FROM.finditer(text)]


def test_readme_numbers_match_their_result_files():
  text = open(os.path.join(ROOT, 'README.md')).read()
  blocks = _from_blocks(text)
  named = {name for names, _ in blocks for name in names}
  # Every results passage of the README is marked.
  for name in (
    'digits_fracbits_vs_uniform',
    'hawq_vs_fracbits',
    'digits_tradeoff',
    'digits_pcqat',
    'bench_train_step',
    'published_imagenet',
    'lm_bits',
  ):
    assert f'experiments/results/{name}.json' in named, name
  assert (
    text.count('<!-- from:') == text.count('<!-- /from -->') == len(blocks)
  ), 'unbalanced <!-- from: --> / <!-- /from --> markers'
  wrong = []
  for names, block in blocks:
    results = []
    for name in names:
      path = os.path.join(ROOT, name)
      assert name.endswith('.json') and os.path.exists(path), name
      results.append(_result_numbers(path))
    numbers = _numbers(block)
    assert numbers, f'the block from {names} quotes no number'
    wrong += [
      (names, n) for n in numbers if not any(_in_result(n, *r) for r in results)
    ]
  assert not wrong, f'README numbers not in their result files: {wrong}'


def test_number_check_catches_a_wrong_number(tmp_path):
  """The check itself: a number the result does not hold is reported, one
  it holds (in its table, or in the JSON at the printed precision) is not."""
  (tmp_path / 'r.json').write_text(
    json.dumps(
      [{'eval_accuracy': 0.99722, 'wall_s': 50.6, 'name': 'x', 'ok': True}]
    )
  )
  (tmp_path / 'r.md').write_text('| x | 99.72 | 1,234 | 2.62x |\n')
  table, values = _result_numbers(str(tmp_path / 'r.json'))
  assert _numbers(
    'FracBits 99.72 (99.44-100.00), 2.62x, w8a8, `--seeds '
    '0,1,2`, 1,234 bits, conv3, ResNet-18, 4-bit size'
  ) == ['99.72', '99.44', '100.00', '2.62', '1234']
  for n in ('99.72', '1234', '2.62', '51', '50.6', '0.997'):
    assert _in_result(n, table, values), n
  for n in ('99.35', '99.7', '52', '1.98'):
    assert not _in_result(n, table, values), n
  blocks = _from_blocks('a <!-- from: x.json -->b 1.5<!-- /from --> c')
  assert blocks == [(['x.json'], 'b 1.5')]
