"""Digits: accuracy vs actual model size on disk, every method, one table.

Trains each point with its config (same digits recipe, same seeds), exports
it (``--config.export=True``) and records the test accuracy and the bytes of
the artifact a user would ship:

* float: the float32 parameters and BN statistics (safetensors);
* uniform QAT / FracBits: the packed-weights artifact
  (``model.fracq.safetensors``: kernels at their bits, float BN) and the
  integer-only program (``model.int.safetensors``);
* F8Net: the integer-only program (8-bit kernels, int32 biases, shifts);
* PCQAT (uniform and FracBits): read from experiments/results/
  digits_pcqat.json (``experiments/digits_pcqat.py`` fine-tunes a float
  model, so it runs there), the packed artifact with its sparse/codebook
  encodings.

Writes experiments/results/digits_tradeoff.{md,json,png}; the PNG plots
accuracy against size with the Pareto front. Results are cached per point
in the JSON, so ``--only`` adds or refreshes points without rerunning the
others.

  python experiments/digits_tradeoff.py [--seeds 0,1,2] [--only f8net,float]
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from experiments._runner import run  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
JSON = os.path.join(OUT, 'digits_tradeoff.json')

# name -> (config, arg, label)
POINTS = {
    'float': ('digits_float', '', 'float32'),
    'uniform8': ('digits_uniform', 'bits=8', 'uniform QAT w8a8'),
    'uniform4': ('digits_uniform', 'bits=4', 'uniform QAT w4a8'),
    'uniform3': ('digits_uniform', 'bits=3', 'uniform QAT w3a8'),
    'uniform2': ('digits_uniform', 'bits=2', 'uniform QAT w2a8'),
    'fracbits4': ('digits_fracbits', 'bits=4', 'FracBits, 4-bit size budget'),
    'fracbits3': ('digits_fracbits', 'bits=3', 'FracBits, 3-bit size budget'),
    'fracbits2': ('digits_fracbits', 'bits=2', 'FracBits, 2-bit size budget'),
    'fracbits_bitops4': ('digits_fracbits', 'bits=4,bitops=True',
                         'FracBits, 4-bit BitOPs budget (w+a)'),
    'f8net': ('digits_f8net', '', 'F8Net (8-bit fixed point)'),
    'f8net_pact': ('digits_f8net', 'pact=True',
                   'F8Net + fixed-point PACT (clips folded)'),
}
# Rows of experiments/digits_pcqat.py shown here: name -> (config, arg, label).
PCQAT_JSON = os.path.join(OUT, 'digits_pcqat.json')
PCQAT_ROWS = {
    'pcqat': ('digits_pcqat', 'mode=pcqat',
              'PCQAT w8a8, 50% sparse + 16 clusters (digits_pcqat.py)'),
    'pcqat_fb': ('digits_pcqat', 'mode=pcqat,quant=fracbits,bits=6',
                 'PCQAT FracBits 6-bit budget, 50% + 16 clusters '
                 '(digits_pcqat.py)'),
}


def _pcqat_rows():
  if not os.path.exists(PCQAT_JSON):
    return []
  with open(PCQAT_JSON) as f:
    return [dict(r, point=r['row']) for r in json.load(f)
            if r['row'] in PCQAT_ROWS]


def _float_bytes(workdir):
  from safetensors.numpy import save_file
  from fracq.train import checkpoint as ckpt_lib
  import jax
  raw = ckpt_lib.restore_raw(workdir)
  flat = {}
  for group in ('trainable', 'state'):
    for kp, v in jax.tree_util.tree_leaves_with_path(raw.get(group, {})):
      flat['/'.join(str(getattr(k, 'key', k)) for k in kp)] = np.asarray(
          v, np.float32)
  path = os.path.join(workdir, 'float.safetensors')
  save_file(flat, path)
  return os.path.getsize(path)


def _point(name, seed):
  config, arg, _ = POINTS[name]
  arg = ','.join(a for a in (arg, f'seed={seed}') if a)
  with tempfile.TemporaryDirectory() as wd:
    m = run(config, arg, wd, export=(name != 'float'))
    if name == 'float':
      m['float32_bytes'] = _float_bytes(wd)
  m.pop('bits', None)
  return m


def _size(r):
  """The shipped artifact's bytes: program for F8Net, packed weights for
  QAT methods, float32 for float."""
  for k in ('float32_bytes', 'artifact_bytes', 'program_bytes'):
    if k in r:
      return r[k]
  return None


def _pareto(points):
  """Indices of (size, acc) points not dominated (smaller and better)."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0],
                                                    -points[i][1]))
  front, best = [], -1.0
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


def write(rows, cmd):
  rows = list(rows) + _pcqat_rows()
  table = {**POINTS, **PCQAT_ROWS}
  names = [n for n in table if any(r['point'] == n for r in rows)]
  lines = ['| point | config | test acc. % (mean) | min-max | seeds | '
           'artifact KiB | integer program KiB | integer = fake-quant |',
           '|---|---|---|---|---|---|---|---|']
  summary = []
  for n in names:
    rs = [r for r in rows if r['point'] == n]
    if not rs:
      continue
    acc = np.array([r['eval_accuracy'] for r in rs]) * 100
    size = np.mean([_size(r) for r in rs]) / 1024
    prog = [r['program_bytes'] for r in rs if 'program_bytes' in r]
    match = [r['integer_prediction_match'] for r in rs
             if 'integer_prediction_match' in r]
    config, arg, label = table[n]
    cfg = f'`{config}.py{":" + arg if arg else ""}`'
    prog_kib = f'{np.mean(prog) / 1024:.1f}' if prog else '-'
    lines.append(f'| {label} | {cfg} | {acc.mean():.2f} | '
                 f'{acc.min():.2f}-{acc.max():.2f} | {len(rs)} | {size:.1f} | '
                 f'{prog_kib} ')
    lines[-1] += (f'| {100 * np.mean(match):.1f}% |' if match else '| - |')
    summary.append((n, label, size, acc.mean()))
  text = '\n'.join(lines)
  with open(os.path.join(OUT, 'digits_tradeoff.md'), 'w') as f:
    f.write(f'Generated by `{cmd}`. Artifact: the file a user ships (float32 '
            'safetensors for float; packed weights for QAT methods; the '
            'integer-only program for F8Net). "integer = fake-quant": share '
            'of one eval batch where the integer-only program predicts what '
            'the fake-quantized model predicts. Points with fewer seeds were '
            'run with `--only NAME --seeds 0` for time.\n\n' + text + '\n')
  if summary:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(s, a) for _, _, s, a in summary]
    front = _pareto(pts)
    for i, (n, label, s, a) in enumerate(summary):
      ax.scatter(s, a, color='C3' if i in front else 'C0', zorder=3)
      ax.annotate(n, (s, a), fontsize=7, xytext=(3, 3),
                  textcoords='offset points')
    fx = [pts[i] for i in front]
    ax.plot([p[0] for p in fx], [p[1] for p in fx], 'C3--', lw=1,
            label='Pareto front')
    ax.set_xscale('log')
    ax.set_xlabel('artifact size on disk (KiB, log)')
    ax.set_ylabel('digits test accuracy (%)')
    ax.set_title('digits: accuracy vs actual size')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, 'digits_tradeoff.png'), dpi=120)
  return text


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--only', default='', help='comma-separated point names')
  p.add_argument('--list', action='store_true')
  args = p.parse_args()
  if args.list:
    for n, (c, a, label) in POINTS.items():
      print(f'{n:<18} configs/{c}.py{":" + a if a else ""}  ({label})')
    return
  logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in args.seeds.split(',')]
  only = [n for n in args.only.split(',') if n] or list(POINTS)
  bad = [n for n in only if n not in POINTS]
  if bad:
    raise SystemExit(f'unknown points {bad}; --list shows them.')
  os.makedirs(OUT, exist_ok=True)
  rows = json.load(open(JSON)) if os.path.exists(JSON) else []
  for n in only:
    if not os.path.exists(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'configs', POINTS[n][0] + '.py')):
      print(f'skipping {n}: configs/{POINTS[n][0]}.py does not exist')
      continue
    for s in seeds:
      m = _point(n, s)
      rows = [r for r in rows if not (r['point'] == n and r['seed'] == s)]
      rows.append(dict(point=n, seed=s, **m))
      print(n, s, f'{100 * m["eval_accuracy"]:.2f}%', _size(m), flush=True)
      with open(JSON, 'w') as f:
        json.dump(rows, f, indent=1)
  cmd = 'python experiments/digits_tradeoff.py'
  print(write(rows, cmd))


if __name__ == '__main__':
  main()
