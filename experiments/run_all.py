"""Regenerates every table and plot in experiments/results with one command.

Runs each experiment script with the settings its checked-in result was made
with (the scripts' full defaults), one after the other, each in its own
process from the repository root, and prints each one's time:

  python experiments/run_all.py            # everything this machine can run
  python experiments/run_all.py --list     # what would run, and what is skipped
  python experiments/run_all.py --only digits_tradeoff,published_imagenet
  python experiments/run_all.py --fresh    # reuse no run from earlier calls

The digits scripts train through one run cache (``experiments/_runner.py``,
keyed on config, arguments, seed, overrides, float start and commit): a
setting two tables share is trained once, by the first script that needs
it, and the later script reuses it. The times in ``--list`` are estimates
from the training wall times recorded in the result files (3 seeds, 2 CPU
cores shared with other work, so they vary by about 2x): digits_pcqat
trains the float starts and its 7 rows (~20 min), digits_tradeoff the 10
other quantized points (~35 min), digits_fracbits_vs_uniform then reuses
every run (~1 min), hawq_vs_fracbits trains only HAWQ (~8 min); about 75
min in all with the F8Net check and the CPU benchmark, plus about 2 h for
lm_bits (the byte-level LM: its own float start and 39 fine-tuning runs).
A second call at the same commit reuses every cached run (minutes in all)
unless ``--fresh``.
The ResNet-18/50 ImageNet-shape benchmarks need a GPU: where JAX's backend
is the CPU they are skipped and listed as such (also when named with
``--only``: their CPU timings would mean nothing and take hours).
``bench_core.py`` only prints (no results file) and is not run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = 'experiments/results'


def _bench(model, batch, size, reps, name, skip_qwix=False):
  args = [
    'experiments/bench_train_step.py',
    '--model',
    model,
    '--batch',
    str(batch),
    '--size',
    str(size),
    '--reps',
    str(reps),
  ]
  if skip_qwix:
    args.append('--skip_qwix')
  return args + ['--json', f'{RESULTS}/{name}.json']


# name -> (script and arguments, needs a GPU, what it writes, rough time)
JOBS = {
  'published_imagenet': (
    ['experiments/published_imagenet.py'],
    False,
    'published_imagenet.{md,json}',
    'seconds',
  ),
  'digits_pcqat': (
    ['experiments/digits_pcqat.py', '--seeds', '0,1,2'],
    False,
    'digits_pcqat.{md,json}',
    '~20 min on 2 CPU cores (trains the float starts)',
  ),
  # After digits_pcqat: the trade-off plot reads its PCQAT rows.
  'digits_tradeoff': (
    ['experiments/digits_tradeoff.py', '--seeds', '0,1,2'],
    False,
    'digits_tradeoff.{md,json,png}',
    '~35 min on 2 CPU cores',
  ),
  'digits_fracbits_vs_uniform': (
    [
      'experiments/digits_fracbits_vs_uniform.py',
      '--seeds',
      '0,1,2',
      '--bits',
      '3,2',
    ],
    False,
    'digits_fracbits_vs_uniform.{md,json}',
    '~1 min after digits_tradeoff (every run cached); ~12 min alone',
  ),
  'hawq_vs_fracbits': (
    ['experiments/hawq_vs_fracbits.py', '--seeds', '0,1,2', '--bits', '4,3'],
    False,
    'hawq_vs_fracbits.{md,json,png}',
    '~8 min after digits_tradeoff (only HAWQ trains); ~20 min alone',
  ),
  'lm_bits': (
    ['experiments/lm_bits.py', '--seeds', '0,1,2'],
    False,
    'lm_bits.{md,json} and lm_bits_{bitmap,pareto}.png',
    '~1 h on 2 idle CPU cores (a float LM and 39 fine-tuning runs of 1-2 min)',
  ),
  'f8net_integer_imagenet': (
    ['experiments/f8net_integer_imagenet.py'],
    False,
    'f8net_integer_imagenet.{md,json}',
    '~3 min on 2 CPU cores',
  ),
  'recipes_integer': (
    ['experiments/recipes_integer.py'],
    False,
    'recipes_integer.{md,json}',
    '~5 min on 2 CPU cores',
  ),
  'deploy_matrix': (
    ['experiments/deploy_matrix.py'],
    False,
    'deploy_matrix.{md,json}',
    '45 cells; ~30 s (digits) to ~5 min (ResNet) a cell on 2 shared CPU '
    'cores: over an hour under load',
  ),
  'deploy_speed': (
    ['experiments/deploy_speed.py'],
    False,
    'deploy_speed.{md,json}',
    '~30-60 min on 2 shared CPU cores (224 px builds and the JAX integer '
    'program timings)',
  ),
  'bench_train_step': (
    _bench('resnet20', 128, 32, 3, 'bench_train_step') + ['--rounds', '5'],
    False,
    'bench_train_step.{md,json}',
    '~5 min on 2 CPU cores',
  ),
  'bench_scaling': (
    ['experiments/bench_scaling.py', '--json', f'{RESULTS}/bench_scaling.json'],
    False,
    'bench_scaling.{md,json}',
    '~10-12 min on 2 shared CPU cores',
  ),
  'bench_lm_gpu': (
    _bench('gpt_small', 32, 128, 20, 'bench_lm_gpu'),
    True,
    'bench_lm_gpu.{md,json}',
    '~2 min on one GPU (bash experiments/bench_gpu.sh installs and runs it)',
  ),
  'bench_resnet18_gpu': (
    _bench('resnet18', 128, 224, 20, 'bench_resnet18_gpu', skip_qwix=True),
    True,
    'bench_resnet18_gpu.{md,json}',
    '~2 min on one H100',
  ),
  'bench_resnet50_gpu': (
    _bench('resnet50', 64, 224, 20, 'bench_resnet50_gpu', skip_qwix=True),
    True,
    'bench_resnet50_gpu.{md,json}',
    '~2 min on one H100',
  ),
}


def backend() -> str:
  """JAX's default backend, probed in a child process (so this process never
  initialises, or holds memory on, an accelerator)."""
  try:
    out = subprocess.run(
      [sys.executable, '-c', 'import jax; print(jax.default_backend())'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
    )
    return out.stdout.strip().splitlines()[-1]
  except (subprocess.SubprocessError, IndexError):
    return 'cpu'


def plan(only, has_gpu):
  """``[(name, args, skip_reason or '')]`` in run order."""
  names = only or list(JOBS)
  bad = [n for n in names if n not in JOBS]
  if bad:
    raise SystemExit(f'unknown experiments {bad}; known: {", ".join(JOBS)}')
  out = []
  for n in names:
    args, gpu, _, _ = JOBS[n]
    why = 'needs a GPU (JAX backend here is CPU)' if gpu and not has_gpu else ''
    out.append((n, args, why))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--list',
    action='store_true',
    help='print what would run (and what is skipped), run nothing',
  )
  p.add_argument(
    '--only', default='', help=f'comma-separated subset of: {", ".join(JOBS)}'
  )
  p.add_argument(
    '--keep_going',
    action='store_true',
    help='run the remaining experiments after one fails',
  )
  p.add_argument(
    '--fresh',
    action='store_true',
    help='train every run again: a new, empty run cache for this '
    'call (runs are still shared between its scripts)',
  )
  a = p.parse_args(argv)
  only = [n for n in a.only.split(',') if n]
  be = backend()
  jobs = plan(only, has_gpu=be in ('gpu', 'cuda', 'rocm'))
  if a.list:
    print(f'JAX backend: {be}')
    for n, args, why in jobs:
      _, _, writes, eta = JOBS[n]
      status = f'SKIP ({why})' if why else f'run ({eta})'
      print(
        f'{n:<28} {status}\n    python {" ".join(args)}\n'
        f'    -> {RESULTS}/{writes}'
      )
    return 0
  env = dict(os.environ)
  if a.fresh:
    env['FRACQ_RUN_CACHE'] = tempfile.mkdtemp(prefix='fracq_runs_')
  failed, done, times = [], [], []
  for n, args, why in jobs:
    if why:
      print(f'== {n}: skipped, {why}', flush=True)
      continue
    print(f'== {n}: python {" ".join(args)}', flush=True)
    t = time.time()
    rc = subprocess.call([sys.executable] + args, cwd=ROOT, env=env)
    dt = time.time() - t
    times.append((n, dt))
    print(
      f'== {n}: {"ok" if rc == 0 else f"FAILED (exit {rc})"} in {dt:.0f} s',
      flush=True,
    )
    (done if rc == 0 else failed).append(n)
    if rc and not a.keep_going:
      break
  for n, dt in times:
    print(f'{n:<28} {dt / 60:6.1f} min')
  print(f'{"total":<28} {sum(dt for _, dt in times) / 60:6.1f} min')
  print(f'done: {", ".join(done) or "-"}; failed: {", ".join(failed) or "-"}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
