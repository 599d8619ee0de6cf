"""Digits: float vs uniform QAT vs HAWQ-style + QAT vs FracBits, same budget.

Compares time / accuracy / compression against HAWQ on embedded data. Per
seed, every quantized method fine-tunes the same trained float model
(``_runner.float_start``): uniform QAT, HAWQ (Hessian traces + ILP, then
uniform QAT at the chosen bits) and FracBits, with the same schedule and
optimizer. Budgets: the size of a uniform K-bit model (first conv and
classifier at 8). Runs are shared with digits_fracbits_vs_uniform.py and
digits_tradeoff.py through the run cache (``_runner.run``).

Writes hawq_vs_fracbits.{md,json,png} under ``--out``.

  python experiments/hawq_vs_fracbits.py [--seeds 0,1,2] [--bits 4,3]
"""

import argparse
import os


import numpy as np
from absl import logging

import _runner

METHODS = (
  ('uniform QAT', 'digits_uniform'),
  ('HAWQ + QAT', 'digits_hawq'),
  ('FracBits', 'digits_fracbits'),
)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--bits', default='4,3')
  _runner.add_flags(p)
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  overrides = _runner.parse_overrides(args.set)
  seeds = [int(s) for s in args.seeds.split(',')]
  budgets = [int(b) for b in args.bits.split(',')]
  rows = []
  for s in seeds:
    m = _runner.float_start(s, **overrides)
    rows.append(dict(method='float', budget=32, seed=s, **_runner.public(m)))
    for b in budgets:
      for method, config in METHODS:
        r = _runner.from_float(config, f'bits={b}', s, **overrides)
        rows.append(dict(method=method, budget=b, seed=s, **_runner.public(r)))
        print(
          method,
          b,
          s,
          r['eval_accuracy'],
          r.get('compression_over_int8'),
          flush=True,
        )
  _runner.write_json(os.path.join(args.out, 'hawq_vs_fracbits.json'), rows)
  text = table(rows, budgets, seeds, overrides)
  _runner.write_md(os.path.join(args.out, 'hawq_vs_fracbits.md'), text)
  plot(rows, budgets, os.path.join(args.out, 'hawq_vs_fracbits.png'))
  print(text)


def table(rows, budgets, seeds, overrides=None):
  """The markdown tables (results, then the seed-0 bit maps) and notes."""
  lines = [
    f'Shared by every quantized row: the trained float model of the same '
    f'seed as start (`init_from`), {_runner.schedule_text(overrides)}, '
    f'LSQ ranges, 8-bit activations, first conv and '
    f'classifier at 8 bits, seeds {",".join(map(str, seeds))}. '
    '"cost / target": the largest integer weight bits over the budget '
    'across seeds (above 1.000 is over budget). "search s": HAWQ\'s '
    'Hessian traces + ILP (a phase before its QAT run); for FracBits the '
    'fractional 80% of its single run (0.8 x its wall time). "run s": '
    'the whole run, search included; "run / uniform": its ratio to uniform '
    "QAT's run at the same budget.",
    '',
    f'| budget | method | test acc. % (mean of {len(seeds)}) | min-max | '
    'integer size (bits) | vs INT8 | cost / target | search s | run s | '
    'run / uniform |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  notes = []
  for b in [32] + budgets:
    group = {}
    target = next(
      (
        r['cost_target']
        for r in rows
        if r['budget'] == b and 'cost_target' in r
      ),
      None,
    )
    uniform_s = np.mean(
      [
        r['wall_s']
        for r in rows
        if r['method'] == 'uniform QAT' and r['budget'] == b
      ]
      or [np.nan]
    )
    for method in ('float',) if b == 32 else [m for m, _ in METHODS]:
      rs = [r for r in rows if r['method'] == method and r['budget'] == b]
      run_s = np.mean([r['wall_s'] for r in rs])
      acc = np.array([r['eval_accuracy'] for r in rs]) * 100
      group[method] = acc
      size = [r.get('cost_integer') for r in rs]
      comp = [r.get('compression_over_int8') for r in rs]
      search = [r.get('search_seconds', np.nan) for r in rs]
      if method == 'FracBits':
        search = [0.8 * r['wall_s'] for r in rs]
      ratio = (
        f'{max(size) / target:.3f}' if target and size[0] is not None else '-'
      )
      lines.append(
        f'| {"float" if b == 32 else f"uniform {b}-bit size"} | {method} | '
        f'{acc.mean():.2f} | {acc.min():.2f}-{acc.max():.2f} | '
        f'{"-" if size[0] is None else f"{np.mean(size):,.0f}"} | '
        f'{"-" if comp[0] is None else f"{np.mean(comp):.2f}x"} | {ratio} | '
        f'{"-" if np.isnan(np.mean(search)) else f"{np.mean(search):.1f}"} '
        f'| {run_s:.0f} | '
        f'{"-" if np.isnan(uniform_s) else f"{run_s / uniform_s:.2f}x"} |'
      )
    if b != 32:
      notes.append(_runner.separation_note(f'uniform {b}-bit size', group))
  names = [m for m, _ in METHODS]
  bitmaps = [
    '',
    '| budget | layer | '
    + ' | '.join(f'{m} (seed {seeds[0]})' for m in names)
    + ' |',
    '|---|---|' + '---|' * len(names),
  ]
  for b in budgets:
    sel = {
      m: next(
        r
        for r in rows
        if r['method'] == m and r['budget'] == b and r['seed'] == seeds[0]
      )
      for m in names
    }
    for layer in sel['FracBits']['bits']:
      bitmaps.append(
        f'| {b} | {layer} | '
        + ' | '.join(f'{sel[m]["bits"][layer]:.0f}' for m in names)
        + ' |'
      )
  return '\n'.join(lines + [''] + notes + bitmaps)


def plot(rows, budgets, path):
  """Per-layer weight bits of each method, mean over seeds, with the seeds'
  min-max as error bars (one panel per budget)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  names = [m for m, _ in METHODS]
  fig, axes = plt.subplots(
    1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False
  )
  width = 0.8 / len(names)
  for ax, b in zip(axes[0], budgets):
    layers = None
    for i, method in enumerate(names):
      rs = [
        r
        for r in rows
        if r['budget'] == b and r['method'] == method and 'bits' in r
      ]
      if not rs:
        continue
      layers = layers or list(rs[0]['bits'])
      bits = np.array([[r['bits'][layer] for layer in layers] for r in rs])
      mean = bits.mean(0)
      x = np.arange(len(layers)) + (i - (len(names) - 1) / 2) * width
      ax.bar(
        x,
        mean,
        width,
        label=f'{method} ({len(rs)} seeds)',
        yerr=[mean - bits.min(0), bits.max(0) - mean],
        capsize=2,
      )
    if layers:
      ax.set_xticks(np.arange(len(layers)))
      ax.set_xticklabels(layers, rotation=45, ha='right', fontsize=8)
    ax.set_ylabel('weight bit-width (bits)')
    ax.set_title(
      f'uniform {b}-bit size budget: mean bits, bars = seed min-max', fontsize=9
    )
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
