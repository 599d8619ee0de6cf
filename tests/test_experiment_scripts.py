"""experiments/: run_all.py, provenance, the run cache, tables (no training)."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import _runner
import lm_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  # The scripts run as `python experiments/X.py` with fracq installed
  # (`pip install -e .`); PYTHONPATH stands in for the install when the
  # checkout under test is not the installed one.
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
    filter(None, [ROOT, env.get('PYTHONPATH')])
  )
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    text=True,
    capture_output=True,
    timeout=300,
  )


def test_run_all_lists_every_experiment_script():
  r = _run('experiments/run_all.py', '--list')
  assert r.returncode == 0, r.stderr
  for script in (
    'digits_tradeoff.py',
    'digits_pcqat.py',
    'digits_fracbits_vs_uniform.py',
    'hawq_vs_fracbits.py',
    'bench_train_step.py',
    'f8net_integer_imagenet.py',
    'recipes_integer.py',
    'published_imagenet.py',
    'lm_bits.py',
  ):
    assert f'experiments/{script}' in r.stdout
    assert os.path.exists(os.path.join(ROOT, 'experiments', script))
  if 'JAX backend: cpu' in r.stdout:
    assert 'bench_resnet18_gpu           SKIP' in r.stdout
  assert _run('experiments/run_all.py', '--only', 'nope').returncode != 0


def test_published_imagenet_table(tmp_path):
  r = _run('experiments/published_imagenet.py', '--out', str(tmp_path))
  assert r.returncode == 0, r.stdout + r.stderr
  data = json.load(open(tmp_path / 'published_imagenet.json'))
  sources = {row['source'] for row in data['rows']}
  assert sources == {'FracBits', 'NNCF', 'HAWQ-V3', 'HAQ', 'LSQ', 'F8Net'}
  for row in data['rows']:
    assert row['citation'] and row['published_top1'] > 50
    # Either a config that builds and a command, or a stated reason.
    if row['config']:
      assert row['config_builds'] and 'launch.py' in row['command']
    else:
      assert row['status'].startswith('no config')
  md = open(tmp_path / 'published_imagenet.md').read()
  assert '76.12' in md and 'configs/resnet50_fracbits.py' in md


# GPU benchmarks measured before result files recorded their provenance:
# `python experiments/run_all.py` regenerates them on a machine with a GPU
# (skipped on a CPU backend). Every other result records it.
REGENERATION_PENDING = {'bench_resnet18_gpu', 'bench_resnet50_gpu'}
RESULTS = os.path.join(ROOT, 'experiments', 'results')
VERSION_KEYS = {
  'python',
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'numpy',
  'onnxruntime',
  'torch',
}


def _check_provenance(p):
  assert set(_runner.PROVENANCE_FIELDS) <= set(p), p
  assert re.fullmatch(r'([0-9a-f]{40}(-dirty)?|unknown)', p['commit']), p
  assert p['command'].startswith('python '), p
  assert VERSION_KEYS <= set(p['versions']), p['versions']
  for key in ('python', 'jax', 'jaxlib', 'flax', 'numpy'):
    assert p['versions'][key], (key, p['versions'])
  m = p['machine']
  assert m['cpu'] and m['cpu_cores'] >= 1 and m['jax_backend'], m
  assert m['jax_devices'], m


def _absolute_paths(value):
  """Every string in a JSON value that is an absolute filesystem path."""
  if isinstance(value, dict):
    return [p for v in value.values() for p in _absolute_paths(v)]
  if isinstance(value, list):
    return [p for v in value for p in _absolute_paths(v)]
  if isinstance(value, str) and os.path.isabs(value) and ' ' not in value:
    return [value]
  return []


def test_provenance_helper_writes_every_field(tmp_path):
  script = os.path.join(ROOT, 'experiments', 'digits_tradeoff.py')
  argv = [script, '--seeds', '0', '--out', 'some/dir']
  rows_path = tmp_path / 'rows.json'
  _runner.write_json(str(rows_path), [{'a': 1}], argv)
  data = json.load(open(rows_path))
  assert data['rows'] == [{'a': 1}]
  _check_provenance(data['provenance'])
  # The command as typed from the repository root, with no machine path.
  assert data['provenance']['command'] == (
    'python experiments/digits_tradeoff.py --seeds 0 --out some/dir'
  )
  head = subprocess.run(
    ['git', 'rev-parse', 'HEAD'], cwd=ROOT, text=True, capture_output=True
  ).stdout.strip()
  assert data['provenance']['commit'].split('-')[0] == head
  assert _runner.load_rows(str(rows_path)) == [{'a': 1}]
  # Absolute paths typed on the command line are not recorded either.
  assert _runner._command(
    [
      script,
      '--json',
      os.path.join(ROOT, 'experiments', 'results', 'x.json'),
      '--out=/somewhere/out',
    ]
  ) == (
    'python experiments/digits_tradeoff.py --json '
    'experiments/results/x.json --out=<outside the repository>/out'
  )
  dict_path = tmp_path / 'dict.json'
  _runner.write_json(str(dict_path), {'results': {'x': 2}}, argv)
  data = json.load(open(dict_path))
  assert data['results'] == {'x': 2}
  _check_provenance(data['provenance'])
  assert not _absolute_paths(data)
  md = tmp_path / 'table.md'
  _runner.write_md(str(md), '| a |\n|---|\n| 1 |\n', argv)
  first, _, rest = md.read_text().partition('\n\n')
  assert first.startswith(
    'Generated by `python experiments/digits_tradeoff.py'
    ' --seeds 0 --out some/dir` at commit `'
  )
  for word in ('jax ', 'flax ', 'cores', 'JAX backend'):
    assert word in first, first
  assert rest == '| a |\n|---|\n| 1 |\n'
  with pytest.raises(TypeError, match='list of rows or a dict'):
    _runner.write_json(str(tmp_path / 'bad.json'), 3, argv)


def test_checked_in_results_record_provenance_and_no_machine_paths():
  names = sorted(
    f[: -len('.json')] for f in os.listdir(RESULTS) if f.endswith('.json')
  )
  assert names
  assert REGENERATION_PENDING <= set(names), (
    'a pending name has no result file any more; drop it from the set'
  )
  for name in names:
    data = json.load(open(os.path.join(RESULTS, name + '.json')))
    assert not _absolute_paths(data), (name, _absolute_paths(data))
    if name in REGENERATION_PENDING:
      continue
    assert isinstance(data, dict) and 'provenance' in data, name
    _check_provenance(data['provenance'])
    md = os.path.join(RESULTS, name + '.md')
    if os.path.exists(md):
      assert open(md).readline().startswith('Generated by `python '), md


def test_parse_overrides():
  assert _runner.parse_overrides(
    ['num_train_steps=20', 'model=digits_cnn', 'export=true']
  ) == {'num_train_steps': 20, 'model': 'digits_cnn', 'export': True}
  with pytest.raises(ValueError, match='FIELD=VALUE'):
    _runner.parse_overrides(['num_train_steps'])


def test_separation_note_ranks_only_beyond_seed_range():
  # Means 99.50 and 99.30 (0.20 apart); seed ranges 1.00 and 0.20.
  note = _runner.separation_note(
    '3-bit', {'A': [99.0, 99.5, 100.0], 'B': [99.2, 99.3, 99.4]}
  )
  assert note == (
    '3-bit: A, B not separable (means within 0.20 points, '
    'less than the widest seed range 1.00).'
  )
  # Means 99.0 and 95.0 (4 points apart), ranges 1.0 and 2.0: ranked.
  note = _runner.separation_note(
    '2-bit', {'B': [94.0, 95.0, 96.0], 'A': [98.5, 99.0, 99.5]}
  )
  assert note == (
    '2-bit: A > B (means 4.00 points apart, more than the '
    'widest seed range 2.00).'
  )
  # One seed has no range to compare with: never ranked.
  assert 'not separable' in _runner.separation_note(
    'x', {'A': [1.0], 'B': [2.0]}
  )


class _FakeTrainer:
  """Stands in for training: deterministic metrics per (config, arg), and a
  log of every run that really trained."""

  def __init__(self):
    self.calls = []

  def __call__(self, config_name, arg, workdir, overrides):
    os.makedirs(workdir, exist_ok=True)
    self.calls.append((config_name, arg, dict(overrides)))
    h = int(hashlib.sha256(f'{config_name}:{arg}'.encode()).hexdigest(), 16)
    m = {
      'eval_accuracy': 0.95 + (h % 50) / 1000,
      'eval_loss': 0.1,
      'wall_s': 10.0 + h % 7,
    }
    if config_name != 'digits_float':
      bits = 3.0 if 'bits=3' in arg else 4.0
      m.update(
        cost_integer=1000.0 * bits,
        cost_target=1000.0 * bits,
        compression_over_int8=8 / bits,
        bits={'conv1': 8.0, 'conv2': bits, 'head': 8.0},
      )
    if config_name == 'digits_hawq':
      m['search_seconds'] = 2.0
    return m


def test_scripts_share_one_run_per_setting_from_one_float_start(
  tmp_path, monkeypatch
):
  import digits_fracbits_vs_uniform as fvu
  import hawq_vs_fracbits as hvf

  fake = _FakeTrainer()
  monkeypatch.setattr(_runner, '_train', fake)
  monkeypatch.setenv('FRACQ_RUN_CACHE', str(tmp_path / 'cache'))
  out = str(tmp_path / 'out')
  fvu.main(['--seeds', '0,1', '--bits', '3', '--out', out])
  # Per seed: one float run, then uniform and FracBits from it.
  assert [c[0] for c in fake.calls] == [
    'digits_float',
    'digits_uniform',
    'digits_fracbits',
  ] * 2
  float_dirs = {c[1]: c[2].get('init_from') for c in fake.calls}
  for config, arg, overrides in fake.calls:
    if config == 'digits_float':
      assert 'init_from' not in overrides
    else:
      assert overrides['export'] is True
      seed = arg.rsplit('seed=', 1)[1]
      assert overrides['init_from'].endswith('workdir')
      assert overrides['init_from'] == float_dirs[f'bits=3,seed={seed}']
  assert float_dirs['bits=3,seed=0'] != float_dirs['bits=3,seed=1']
  fake.calls.clear()
  hvf.main(['--seeds', '0,1', '--bits', '3', '--out', out])
  # Only HAWQ is new: float, uniform and FracBits runs are reused.
  assert [c[0] for c in fake.calls] == ['digits_hawq'] * 2
  a = _runner.load_rows(os.path.join(out, 'digits_fracbits_vs_uniform.json'))
  b = _runner.load_rows(os.path.join(out, 'hawq_vs_fracbits.json'))

  def strip(row):  # the row's labels; the per-layer bits are in b only
    return {
      k: v for k, v in row.items() if k not in ('method', 'bits', 'budget')
    }

  for method, bm in (
    ('float', 'float'),
    ('uniform QAT', 'uniform QAT'),
    ('FracBits', 'FracBits'),
  ):
    ra = [strip(r) for r in a if r['method'] == method]
    rb = [strip(r) for r in b if r['method'] == bm]
    assert ra == rb and len(ra) == 2, method
  md = open(os.path.join(out, 'hawq_vs_fracbits.md')).read()
  assert md.startswith('Generated by `python ')
  assert 'same seed as start' in md and 'cost / target' in md
  assert '| 1.000 |' in md
  assert 'uniform 3-bit size:' in md  # the separability note
  assert os.path.exists(os.path.join(out, 'hawq_vs_fracbits.png'))
  # A different override is a different run.
  fake.calls.clear()
  fvu.main(
    ['--seeds', '0', '--bits', '3', '--out', out, '--set', 'num_train_steps=5']
  )
  assert len(fake.calls) == 3
  assert all(c[2]['num_train_steps'] == 5 for c in fake.calls)
  md = open(os.path.join(out, 'digits_fracbits_vs_uniform.md')).read()
  assert '(440 steps, SGD 0.1 cosine) with num_train_steps=5' in md


def test_run_rejects_a_path_as_init_from(tmp_path, monkeypatch):
  monkeypatch.setenv('FRACQ_RUN_CACHE', str(tmp_path))
  with pytest.raises(ValueError, match='run_key'):
    _runner.run('digits_uniform', 'bits=3', init_from={'workdir': '/x'})


def test_tradeoff_plot_spreads_equal_sizes_and_draws_seed_ranges(
  tmp_path, monkeypatch
):
  import digits_tradeoff as dt

  # Pairs within 3.5% of each other are moved 1.75% either side; three equal
  # sizes to 0.965, 1, 1.035; isolated points stay.
  np.testing.assert_allclose(
    dt._dodge([63.3, 63.8, 146.1, 146.1, 582.8, 38.4]),
    [0.9825, 1.0175, 0.9825, 1.0175, 1.0, 1.0],
  )
  np.testing.assert_allclose(dt._dodge([81.5, 81.5, 81.5]), [0.965, 1.0, 1.035])
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summary = [
    ('a', 'A', 63.3, np.array([99.0, 99.5, 100.0])),
    ('b', 'B', 63.8, np.array([98.0, 99.0, 99.2])),
  ]
  shown = []
  with monkeypatch.context() as patch:  # keep the figure to inspect it
    patch.setattr(plt, 'close', lambda fig=None: shown.append(fig))
    dt._plot(summary, str(tmp_path / 'p.png'))
  ax = shown[0].axes[0]
  assert os.path.getsize(tmp_path / 'p.png') > 0
  assert not ax.texts  # points are named in the legend, not on the plot
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert 'A (3 seeds)' in labels and 'B (3 seeds)' in labels
  # One error bar per point, spanning the seeds' min-max.
  segments = [c for c in ax.collections if len(c.get_segments()) == 1]
  spans = sorted(
    tuple(np.round(s.get_segments()[0][:, 1], 6)) for s in segments
  )
  assert spans == [(98.0, 99.2), (99.0, 100.0)], spans
  assert 'KiB' in ax.get_xlabel() and '%' in ax.get_ylabel()
  plt.close(shown[0])


def _lm_row(method, budget, seed, bpb, bits, variant=''):
  layers = {f'block_{d}/{k}': bits(d, k) for d in (0, 1) for k in lm_bits.KINDS}
  return {
    'method': method,
    'budget_bits': budget,
    'variant': variant,
    'seed': seed,
    'val_bits_per_byte': bpb,
    'bits': {'embed': 8, **layers} if method != 'float' else {},
    'fractional_bits': None,
  }


def test_lm_bits_separation_and_allocation_verdicts():
  uniform3 = lambda d, k: 3  # noqa: E731
  # Attention at 5 bits, MLP at 2: a non-uniform allocation.
  skewed = lambda d, k: 2 if k.startswith('mlp') else 5  # noqa: E731
  rows = [
    _lm_row('uniform', 3, s, v, uniform3)
    for s, v in enumerate([2.47, 2.48, 2.49])
  ]
  rows += [
    _lm_row('fracbits', 3, s, v, uniform3)
    for s, v in enumerate([2.475, 2.485, 2.47])
  ]
  rows += [
    _lm_row('hawq', 3, s, v, skewed) for s, v in enumerate([2.60, 2.61, 2.62])
  ]
  note = lm_bits.separation(rows, 3)
  # FracBits: 0.0033 apart, within the widest seed range 0.02.
  assert (
    'FracBits, 3-bit size budget: mean -0.0033 bits/byte against uniform '
    'QAT (lower is better; not separable from uniform: widest seed range '
    '0.0200); integer allocation '
    'non-uniform in 0 of 3 seeds.'
  ) in note
  # HAWQ: 0.13 worse, beyond the ranges; its allocation is not uniform.
  assert (
    'HAWQ + QAT, 3-bit size budget: mean +0.1300 bits/byte against uniform '
    'QAT (lower is better; worse than uniform: widest seed range 0.0200); '
    'integer allocation non-uniform '
    'in 3 of 3 seeds.'
  ) in note
  depths, grid = lm_bits._layer_grid(rows[-1]['bits'])
  assert depths == [0, 1] and grid[:, :4].tolist() == [[5] * 4] * 2
  assert grid[:, 4:].tolist() == [[2, 2], [2, 2]]
  # The learned spread leaves out the fixed 8-bit embedding.
  learned = {'embed': 8.0, 'block_0/mlp_up': 2.9, 'block_1/attn/key': 3.6}
  assert lm_bits.learned_spread({'fractional_bits': learned}) == pytest.approx(
    0.7
  )
