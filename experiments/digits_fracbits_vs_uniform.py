"""Digits: FracBits vs uniform QAT at equal integer model size, and vs float.

For each budget K (the size of a uniform K-bit model whose first conv and
classifier stay at 8 bits), fine-tunes uniform QAT at K bits and FracBits
with that size budget from the same trained float model of each seed
(``_runner.float_start``), with the same range method (LSQ), schedule and
seeds. Runs are shared with digits_tradeoff.py and hawq_vs_fracbits.py
through the run cache (``_runner.run``): the same setting is the same run.
Writes digits_fracbits_vs_uniform.{md,json} under ``--out``.

  python experiments/digits_fracbits_vs_uniform.py [--seeds 0,1,2] [--bits 3,2]
"""

import argparse
import os


import numpy as np
from absl import logging

import _runner

METHODS = (('uniform QAT', 'digits_uniform'), ('FracBits', 'digits_fracbits'))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--bits', default='3,2')
  _runner.add_flags(p)
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  overrides = _runner.parse_overrides(args.set)
  seeds = [int(s) for s in args.seeds.split(',')]
  bits = [int(b) for b in args.bits.split(',')]
  rows = []
  for s in seeds:
    m = _runner.float_start(s, **overrides)
    rows.append(dict(method='float', bits=32, seed=s, **_runner.public(m)))
    for b in bits:
      for method, config in METHODS:
        m = _runner.from_float(config, f'bits={b}', s, **overrides)
        m.pop('bits', None)  # per-layer bits: in hawq_vs_fracbits.json
        rows.append(dict(method=method, bits=b, seed=s, **_runner.public(m)))
        print(
          method,
          b,
          s,
          m['eval_accuracy'],
          m['compression_over_int8'],
          flush=True,
        )
  _runner.write_json(
    os.path.join(args.out, 'digits_fracbits_vs_uniform.json'), rows
  )
  text = table(rows, bits, seeds, overrides)
  _runner.write_md(
    os.path.join(args.out, 'digits_fracbits_vs_uniform.md'), text
  )
  print(text)


def table(rows, bits, seeds, overrides=None):
  """The markdown table and its notes."""
  lines = [
    f'Shared by every quantized row: the trained float model of the same '
    f'seed as start (`init_from`), {_runner.schedule_text(overrides)}, '
    f'LSQ ranges, 8-bit activations, first conv and '
    f'classifier at 8 bits, seeds {",".join(map(str, seeds))}. '
    '"cost / target": integer weight bits over the budget (a uniform '
    "K-bit model's size); above 1.000 is over budget.",
    '',
    f'| method | budget | test acc. % (mean of {len(seeds)}) | min-max | '
    'integer size vs INT8 | cost / target | wall s / run |',
    '|---|---|---|---|---|---|---|',
  ]
  notes = []
  for b in [32] + bits:
    group = {}
    target = next(
      (r['cost_target'] for r in rows if r['bits'] == b and 'cost_target' in r),
      None,
    )
    for method in ('float',) if b == 32 else [m for m, _ in METHODS]:
      rs = [r for r in rows if r['method'] == method and r['bits'] == b]
      acc = np.array([r['eval_accuracy'] for r in rs]) * 100
      group[method] = acc
      comp = [r.get('compression_over_int8') for r in rs]
      comp = f'{np.mean(comp):.2f}x' if comp[0] is not None else '-'
      cost = [r.get('cost_integer') for r in rs]
      ratio = (
        f'{max(cost) / target:.3f}' if target and cost[0] is not None else '-'
      )
      label = 'float' if b == 32 else f'uniform {b}-bit size'
      lines.append(
        f'| {method} | {label} | {acc.mean():.2f} | '
        f'{acc.min():.2f}-{acc.max():.2f} | {comp} | {ratio} | '
        f'{np.mean([r["wall_s"] for r in rs]):.0f} |'
      )
    if b != 32:
      notes.append(_runner.separation_note(f'uniform {b}-bit size', group))
  return '\n'.join(lines + [''] + notes)


if __name__ == '__main__':
  main()
