"""experiments/run_all.py and published_imagenet.py: fast checks (no training)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, text=True,
                        capture_output=True, timeout=300)


def test_run_all_lists_every_experiment_script():
  r = _run('experiments/run_all.py', '--list')
  assert r.returncode == 0, r.stderr
  for script in ('digits_tradeoff.py', 'digits_pcqat.py',
                 'digits_fracbits_vs_uniform.py',
                 'hawq_vs_fracbits.py', 'bench_train_step.py',
                 'f8net_integer_imagenet.py',
                 'published_imagenet.py'):
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
