"""Digits: accuracy vs actual model size on disk, every method, one table.

Fine-tunes each quantized point with its config from the same trained float
model of each seed (``_runner.float_start``; same digits schedule, same
seeds), exports it (``--config.export=True``) and records the test accuracy
and the bytes of the artifact a user would ship:

* float: the float32 parameters and BN statistics (safetensors);
* uniform QAT / FracBits: the packed-weights artifact
  (``model.fracq.safetensors``: kernels at their bits, float BN) and the
  integer-only program (``model.int.safetensors``);
* F8Net: the integer-only program (8-bit kernels, int32 biases, shifts);
* PCQAT (uniform and FracBits): read from experiments/results/
  digits_pcqat.json (``experiments/digits_pcqat.py`` fine-tunes a float
  model, so it runs there), the packed artifact with its sparse/codebook
  encodings.

Writes digits_tradeoff.{md,json,png} under ``--out``; the PNG plots
accuracy against size (seed min-max as error bars) with the Pareto front.
Runs come from the run cache (``_runner.run``), shared with
digits_fracbits_vs_uniform.py and hawq_vs_fracbits.py; ``--only`` refreshes
some points and keeps the others already in the JSON.

  python experiments/digits_tradeoff.py [--seeds 0,1,2] [--only f8net,float]
"""

import argparse
import os


import numpy as np
from absl import logging

import _runner

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
  'fracbits_bitops4': (
    'digits_fracbits',
    'bits=4,bitops=True',
    'FracBits, 4-bit BitOPs budget (w+a)',
  ),
  'f8net': ('digits_f8net', '', 'F8Net (8-bit fixed point)'),
  'f8net_pact': (
    'digits_f8net',
    'pact=True',
    'F8Net + fixed-point PACT (clips folded)',
  ),
}
# Rows of experiments/digits_pcqat.py shown here: name -> (config, arg, label).
PCQAT_ROWS = {
  'pcqat': (
    'digits_pcqat',
    'mode=pcqat',
    'PCQAT w8a8, 50% sparse + 16 clusters (digits_pcqat.py)',
  ),
  'pcqat_fb': (
    'digits_pcqat',
    'mode=pcqat,quant=fracbits,bits=6',
    'PCQAT FracBits 6-bit budget, 50% + 16 clusters (digits_pcqat.py)',
  ),
}


def _pcqat_rows(out):
  path = os.path.join(out, 'digits_pcqat.json')
  if not os.path.exists(path):
    return []
  return [
    dict(r, point=r['row'])
    for r in _runner.load_rows(path)
    if r['row'] in PCQAT_ROWS
  ]


def _float_bytes(workdir):
  import tempfile
  from safetensors.numpy import save_file
  from fracq.train import checkpoint as ckpt_lib
  import jax

  raw = ckpt_lib.restore_raw(workdir)
  flat = {}
  for group in ('trainable', 'state'):
    for kp, v in jax.tree_util.tree_leaves_with_path(raw.get(group, {})):
      flat['/'.join(str(getattr(k, 'key', k)) for k in kp)] = np.asarray(
        v, np.float32
      )
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'float.safetensors')
    save_file(flat, path)
    return os.path.getsize(path)


def _point(name, seed, overrides):
  config, arg, _ = POINTS[name]
  if name == 'float':
    m = _runner.float_start(seed, **overrides)
    m['float32_bytes'] = _float_bytes(m['workdir'])
  else:
    m = _runner.from_float(config, arg, seed, **overrides)
  m.pop('bits', None)
  return _runner.public(m)


def _size(r):
  """The shipped artifact's bytes: program for F8Net, packed weights for
  QAT methods, float32 for float."""
  for k in ('float32_bytes', 'artifact_bytes', 'program_bytes'):
    if k in r:
      return r[k]
  return None


def _pareto(points):
  """Indices of (size, acc) points not dominated (smaller and better)."""
  order = sorted(
    range(len(points)), key=lambda i: (points[i][0], -points[i][1])
  )
  front, best = [], -1.0
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


def write(rows, out, overrides=None):
  """Writes the table (md) and the plot (png) under ``out``; returns the
  table."""
  rows = list(rows) + _pcqat_rows(out)
  table = {**POINTS, **PCQAT_ROWS}
  names = [n for n in table if any(r['point'] == n for r in rows)]
  lines = [
    '| point | config | test acc. % (mean) | min-max | seeds | '
    'artifact KiB | integer program KiB | cost / target | '
    'integer = fake-quant |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  summary = []
  for n in names:
    rs = [r for r in rows if r['point'] == n]
    acc = np.array([r['eval_accuracy'] for r in rs]) * 100
    size = np.mean([_size(r) for r in rs]) / 1024
    prog = [r['program_bytes'] for r in rs if 'program_bytes' in r]
    match = [
      r['integer_prediction_match']
      for r in rs
      if 'integer_prediction_match' in r
    ]
    ratio = [
      r['cost_integer'] / r['cost_target']
      for r in rs
      if 'cost_target' in r and 'cost_integer' in r
    ]
    config, arg, label = table[n]
    cfg = f'`{config}.py{":" + arg if arg else ""}`'
    prog_kib = f'{np.mean(prog) / 1024:.1f}' if prog else '-'
    lines.append(
      f'| {label} | {cfg} | {acc.mean():.2f} | '
      f'{acc.min():.2f}-{acc.max():.2f} | {len(rs)} | {size:.1f} | '
      f'{prog_kib} | {f"{max(ratio):.3f}" if ratio else "-"} '
    )
    lines[-1] += f'| {100 * np.mean(match):.1f}% |' if match else '| - |'
    summary.append((n, label, size, acc))
  text = (
    f'Shared by every point: {_runner.schedule_text(overrides)} and '
    'seeds; every quantized point (PCQAT rows: see '
    'digits_pcqat.md) fine-tunes the trained float model of the same '
    'seed (`init_from`). Artifact: the file a user ships (float32 '
    'safetensors for float; packed weights for QAT methods; the '
    'integer-only program for F8Net). "cost / target": integer weight '
    'bits over the size budget, largest across seeds (budgeted points '
    'only; above 1.000 is over budget). "integer = fake-quant": share '
    'of one eval batch where the integer-only program predicts what '
    'the fake-quantized model predicts.\n\n' + '\n'.join(lines)
  )
  _runner.write_md(os.path.join(out, 'digits_tradeoff.md'), text)
  if summary:
    _plot(summary, os.path.join(out, 'digits_tradeoff.png'))
  return text


def _dodge(sizes, rel=0.035):
  """Horizontal factors that spread points of (nearly) equal size apart, so
  their markers and error bars do not hide each other: within a group of
  sizes closer than ``rel``, factors 1 +- rel / 2, 1 +- 1.5 rel, ..."""
  factors = [1.0] * len(sizes)
  order = sorted(range(len(sizes)), key=lambda i: sizes[i])
  groups, current = [], [order[0]] if order else []
  for i in order[1:]:
    if sizes[i] <= sizes[current[0]] * (1 + rel):
      current.append(i)
    else:
      groups.append(current)
      current = [i]
  if current:
    groups.append(current)
  for group in groups:
    for k, i in enumerate(group):
      factors[i] = 1 + rel * (k - (len(group) - 1) / 2)
  return factors


def _plot(summary, path):
  """Accuracy (mean, seed min-max as error bars) against artifact size. Each
  point is named in the legend (text labels next to close points would
  overlap) and points of equal size are spread sideways; Pareto-front
  points are ringed in red."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  fig, ax = plt.subplots(figsize=(11, 5))
  pts = [(s, a.mean()) for _, _, s, a in summary]
  front = _pareto(pts)
  dodge = _dodge([s for s, _ in pts])
  colors = plt.get_cmap('tab20').colors
  markers = 'osD^v<>phX*Pd8H'
  for i, (_, label, size, acc) in enumerate(summary):
    mean = acc.mean()
    ax.errorbar(
      size * dodge[i],
      mean,
      yerr=[[mean - acc.min()], [acc.max() - mean]],
      fmt=markers[i % len(markers)],
      color=colors[i % len(colors)],
      mec='C3' if i in front else colors[i % len(colors)],
      mew=2 if i in front else 1,
      ms=7,
      capsize=3,
      zorder=3,
      label=f'{label} ({len(acc)} seeds)',
    )
  fx = sorted((pts[i][0] * dodge[i], pts[i][1]) for i in front)
  ax.plot(
    [p[0] for p in fx],
    [p[1] for p in fx],
    'C3--',
    lw=1,
    label='Pareto front (red rings)',
  )
  ax.set_xscale('log')
  # Plain tick labels at powers of two (log-axis defaults overlap here).
  ax.xaxis.set_major_locator(
    ticker.FixedLocator([2.0**k for k in range(4, 12)])
  )
  ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  sizes = [s for s, _ in pts]
  ax.set_xlim(min(sizes) / 1.25, max(sizes) * 1.25)
  ax.set_xlabel('artifact size on disk (KiB, log scale)')
  ax.set_ylabel('digits test accuracy (%)')
  ax.set_title('digits: accuracy vs actual size (mean; bars: seed min-max)')
  ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--only', default='', help='comma-separated point names')
  p.add_argument('--list', action='store_true')
  _runner.add_flags(p)
  args = p.parse_args(argv)
  if args.list:
    for n, (c, a, label) in POINTS.items():
      print(f'{n:<18} configs/{c}.py{":" + a if a else ""}  ({label})')
    return
  logging.set_verbosity(logging.WARNING)
  overrides = _runner.parse_overrides(args.set)
  seeds = [int(s) for s in args.seeds.split(',')]
  only = [n for n in args.only.split(',') if n] or list(POINTS)
  bad = [n for n in only if n not in POINTS]
  if bad:
    raise SystemExit(f'unknown points {bad}; --list shows them.')
  path = os.path.join(args.out, 'digits_tradeoff.json')
  # --only refreshes some points and keeps the others.
  rows = _runner.load_rows(path) if args.only and os.path.exists(path) else []
  for n in only:
    if not os.path.exists(
      os.path.join(_runner.ROOT, 'configs', POINTS[n][0] + '.py')
    ):
      print(f'skipping {n}: configs/{POINTS[n][0]}.py does not exist')
      continue
    for s in seeds:
      m = _point(n, s, overrides)
      rows = [r for r in rows if not (r['point'] == n and r['seed'] == s)]
      rows.append(dict(point=n, seed=s, **m))
      print(n, s, f'{100 * m["eval_accuracy"]:.2f}%', _size(m), flush=True)
  _runner.write_json(path, rows)
  print(write(rows, args.out, overrides))


if __name__ == '__main__':
  main()
