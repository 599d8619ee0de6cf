"""Byte-level LM: float vs uniform QAT vs FracBits vs HAWQ at equal size.

The benchmark where bit allocation can matter: the gpt_small decoder (4
pre-LN blocks, d_model 128, tied byte embedding; 0.86M parameters) on the
standard-library corpus (``fracq.data.text``). One float model
(``configs/lm_float.py``, seed 0, 600 steps) is the start of every row;
each row then fine-tunes it with the same schedule (``--steps`` steps of
AdamW 5e-4, cosine; ``configs/lm_uniform.py``), for seeds 0,1,2 (the seed
sets the data order and the quantizer's randomness, so the min-max
measures the fine-tuning's spread around one float start):

* float: the float model fine-tuned the same way (no quantizer);
* uniform QAT at 8/4/3/2-bit weights (``configs/lm_uniform.py``);
* FracBits under the size of a uniform 4/3/2-bit model
  (``configs/lm_fracbits.py``);
* HAWQ (Hessian traces + ILP, then uniform QAT at the chosen bits) under
  the same budgets (``configs/lm_hawq.py``).

Every quantized row: LSQ ranges, 8-bit LSQ inputs, the byte embedding (also
the tied output head) at 8 bits per row, weights per output channel; each
run is exported and its packed artifact's bytes on disk reported.

Writes lm_bits.{json,md} and lm_bits_bitmap.png (per-layer bits, by
depth) and lm_bits_pareto.png (validation bits per byte vs artifact size)
under ``--out``, the JSON after every run. Runs are cached
(``_runner.run``): rerunning reuses them; ``--render`` rewrites the table
and plots from the JSON alone.

  python experiments/lm_bits.py [--seeds 0,1,2] [--groups 0,1,2]
"""

import argparse
import os
import re

import numpy as np
from absl import logging

import _runner

# method -> (config, label)
METHODS = {
  'float': ('lm_float', 'float'),
  'uniform': ('lm_uniform', 'uniform QAT'),
  'fracbits': ('lm_fracbits', 'FracBits'),
  'hawq': ('lm_hawq', 'HAWQ + QAT'),
}
# FracBits variants: name -> (config arg, label). '' is the authors' recipe
# (bits start at the budget + 0.5, SGD at lr 0.05); the others test why its
# allocation ends uniform (see lm_bits.md): 'init+3' starts the bits at the
# budget + 3, 'bitlr10' trains them at 10x the learning rate.
VARIANTS = {
  '': ('', ''),
  'init+3': ('init=3.0', ' (bits start at budget + 3)'),
  'bitlr10': ('bitlr=0.5', ' (bit learning rate x10)'),
}
# Runs in priority order: (method, budget bits, variant) groups, each run
# for every seed before the next group, so an interrupted sweep has whole
# settings. The 3-bit group first: the claim under test.
GROUPS = (
  (
    ('float', None, ''),
    ('uniform', 3, ''),
    ('fracbits', 3, ''),
    ('hawq', 3, ''),
    ('fracbits', 3, 'init+3'),
    ('fracbits', 3, 'bitlr10'),
  ),
  (('uniform', 2, ''), ('fracbits', 2, ''), ('hawq', 2, '')),
  (
    ('uniform', 8, ''),
    ('uniform', 4, ''),
    ('fracbits', 4, ''),
    ('hawq', 4, ''),
  ),
)
# Column order of the bit maps (module names of fracq.models.gpt).
KINDS = (
  'attn/query',
  'attn/key',
  'attn/value',
  'attn/out',
  'mlp_up',
  'mlp_down',
)


def _row(method, budget, variant, seed, m, float_bytes=None):
  bits = m.get('bits') or {}
  by_step = m.get('bits_by_step') or {}
  # FracBits: the learned fractional bits at the hard-assignment step (the
  # first of its two bit tables).
  fractional = by_step[min(by_step, key=int)] if len(by_step) > 1 else None
  return {
    'method': method,
    'budget_bits': budget,
    'variant': variant,
    'seed': seed,
    'val_bits_per_byte': m['eval_bits_per_byte'],
    'artifact_bytes': float_bytes if float_bytes else m.get('artifact_bytes'),
    'artifact_compression_over_int8': m.get('artifact_compression_over_int8'),
    'cost_integer_bits': m.get('cost_integer'),
    'cost_target_bits': m.get('cost_target'),
    'bits': {layer: int(round(b)) for layer, b in bits.items()},
    'fractional_bits': fractional,
    'seconds': m['wall_s'],
    'search_seconds': m.get('search_seconds'),
    'eval_accuracy': m['eval_accuracy'],
    'run_key': m['run_key'],
  }


def _run(method, budget, variant, seed, steps, start, overrides):
  arg = f'seed={seed},steps={steps}'
  if method == 'float':
    # The float model fine-tuned with the quantized rows' schedule.
    return _runner.run(
      'lm_float',
      arg,
      init_from=start,
      keep_workdir=True,
      learning_rate=5e-4,
      warmup_epochs=0.0,
      **overrides,
    )
  arg = ','.join(a for a in (arg, f'bits={budget}', VARIANTS[variant][0]) if a)
  return _runner.run(
    METHODS[method][0], arg, init_from=start, export=True, **overrides
  )


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument(
    '--groups',
    default=','.join(str(i) for i in range(len(GROUPS))),
    help='which run groups (indices into GROUPS, in priority order)',
  )
  p.add_argument('--steps', type=int, default=150)
  p.add_argument(
    '--render',
    action='store_true',
    help='only rewrite the table and plots from --out/lm_bits.json',
  )
  _runner.add_flags(p)
  args = p.parse_args(argv)
  if args.render:
    render(os.path.join(args.out, 'lm_bits.json'), args.out)
    return
  logging.set_verbosity(logging.WARNING)
  overrides = _runner.parse_overrides(args.set)
  seeds = [int(s) for s in args.seeds.split(',')]
  groups = [GROUPS[int(g)] for g in args.groups.split(',')]
  start = _runner.run('lm_float', 'seed=0', keep_workdir=True, **overrides)
  from digits_tradeoff import _float_bytes
  from fracq.data import text as text_lib

  corpus = text_lib.load('stdlib_text')
  rows = []

  def payload():
    return {
      'rows': rows,
      'corpus_sha256': corpus.sha256,
      'corpus_bytes': int(corpus.train.size + corpus.validation.size),
      'float_start': {
        'val_bits_per_byte': start['eval_bits_per_byte'],
        'seconds': start['wall_s'],
        'run_key': start['run_key'],
      },
      'steps': args.steps,
      'seeds': seeds,
    }

  for group in groups:
    for seed in seeds:
      for method, budget, variant in group:
        m = _run(method, budget, variant, seed, args.steps, start, overrides)
        float_bytes = _float_bytes(m['workdir']) if method == 'float' else None
        row = _row(method, budget, variant, seed, m, float_bytes)
        rows.append(row)
        print(
          method,
          budget,
          variant,
          seed,
          f'{row["val_bits_per_byte"]:.4f} bits/byte',
          row['artifact_bytes'],
          f'{row["seconds"]:.0f}s',
          flush=True,
        )
        # Written after every run: an interrupted sweep keeps its rows.
        _runner.write_json(os.path.join(args.out, 'lm_bits.json'), payload())
  text = table(payload())
  _runner.write_md(os.path.join(args.out, 'lm_bits.md'), text)
  budgets = sorted(
    {b for g in groups for _, b, _ in g if b and b < 8}, reverse=True
  )
  plot_bitmap(rows, budgets, os.path.join(args.out, 'lm_bits_bitmap.png'))
  plot_pareto(rows, os.path.join(args.out, 'lm_bits_pareto.png'))
  print(text)


def _select(rows, method, budget, variant=''):
  return [
    r
    for r in rows
    if r['method'] == method
    and r['budget_bits'] == budget
    and r.get('variant', '') == variant
  ]


def _settings(rows):
  """(method, budget, variant) triples in table order."""
  order = {'float': 0, 'uniform': 1, 'fracbits': 2, 'hawq': 3}
  triples = {
    (r['method'], r['budget_bits'], r.get('variant', '')) for r in rows
  }
  return sorted(triples, key=lambda t: (-(t[1] or 99), order[t[0]], t[2]))


def _label(method, budget, variant=''):
  if method == 'float':
    return 'float'
  if method == 'uniform':
    return f'uniform QAT w{budget}a8'
  return f'{METHODS[method][1]}{VARIANTS[variant][1]}, {budget}-bit size budget'


def _is_uniform(bits: dict) -> bool:
  """Whether every searched (non-embedding) layer has the same bits."""
  searched = {b for layer, b in bits.items() if layer != 'embed'}
  return len(searched) <= 1


def _kind_of(layer):
  return 'attention' if '/attn/' in layer else 'MLP' if 'mlp' in layer else None


def separation(rows, budget) -> str:
  """Each mixed-precision setting at one budget against uniform QAT: the
  difference of mean validation bits per byte against the widest seed
  range of the two."""
  base = np.array(
    [r['val_bits_per_byte'] for r in _select(rows, 'uniform', budget)]
  )
  if not len(base):
    return ''
  parts = []
  for method, b, variant in _settings(rows):
    if b != budget or method in ('uniform', 'float'):
      continue
    rs = _select(rows, method, budget, variant)
    v = np.array([r['val_bits_per_byte'] for r in rs])
    widest = max(float(np.ptp(v)), float(np.ptp(base)))
    diff = base.mean() - v.mean()
    verdict = (
      'better than uniform'
      if diff > widest
      else 'worse than uniform'
      if -diff > widest
      else 'not separable from uniform'
    )
    nonuniform = sum(not _is_uniform(r['bits']) for r in rs)
    parts.append(
      f'{_label(method, budget, variant)}: mean {-diff:+.4f} bits/byte '
      f'against uniform QAT (lower is better; {verdict}: widest seed range '
      f'{widest:.4f}); integer allocation '
      f'non-uniform in {nonuniform} of {len(rs)} seeds.'
    )
  return '\n'.join(f'- {p}' for p in parts)


def learned_spread(row) -> float:
  """Max minus min of a FracBits run's learned (fractional) weight bits at
  the hard-assignment step, over its searched layers (the fixed 8-bit
  embedding excluded).

  At a budget equal to a uniform K-bit model's size, hard assignment's one
  global offset ``delta`` (``fracq.methods.fracbits.penalty.hard_assign``)
  can only round a layer up to K+1 bits (``b + delta >= K + 0.5``) if
  another goes down to K-1 (``b' + delta < K - 0.5``) to pay for it, which
  needs ``b - b' > 1``: with a spread of at most one bit the result is
  uniform K bits whatever the learned ordering.
  """
  bits = [b for layer, b in row['fractional_bits'].items() if layer != 'embed']
  return max(bits) - min(bits)


def diagnosis(rows) -> str:
  """FracBits' learned fractional bits at the hard-assignment step, mean
  over layers of each kind and over seeds, the integer bits they were
  rounded to, and their spread (:func:`learned_spread`)."""
  lines = [
    '| setting | attention bits (fractional -> integer) | '
    'MLP bits (fractional -> integer) | first block - last block '
    '(fractional) | spread max - min (fractional; seed min-max) |',
    '|---|---|---|---|---|',
  ]
  for method, budget, variant in _settings(rows):
    if method != 'fracbits':
      continue
    rs = [
      r for r in _select(rows, method, budget, variant) if r['fractional_bits']
    ]
    if not rs:
      continue
    cells = []
    for kind in ('attention', 'MLP'):
      frac = [
        b
        for r in rs
        for layer, b in r['fractional_bits'].items()
        if _kind_of(layer) == kind
      ]
      ints = [
        b
        for r in rs
        for layer, b in r['bits'].items()
        if _kind_of(layer) == kind
      ]
      cells.append(
        f'{np.mean(frac):.2f} ({min(frac):.2f}-{max(frac):.2f}) -> '
        f'{np.mean(ints):.2f} ({min(ints)}-{max(ints)})'
      )

    def depth_mean(rows_, pick):
      depth = {
        int(layer.split('/')[0][len('block_') :])
        for layer in rows_[0]['fractional_bits']
        if layer.startswith('block_')
      }
      d = pick(depth)
      return np.mean(
        [
          b
          for r in rows_
          for layer, b in r['fractional_bits'].items()
          if layer.startswith(f'block_{d}/')
        ]
      )

    depth = [depth_mean(rs, min), depth_mean(rs, max)]
    spread = [learned_spread(r) for r in rs]
    lines.append(
      f'| {_label(method, budget, variant)} | {cells[0]} | {cells[1]} | '
      f'{depth[0] - depth[1]:+.3f} | {np.mean(spread):.2f} '
      f'({min(spread):.2f}-{max(spread):.2f}) |'
    )
  return '\n'.join(lines)


def table(payload) -> str:
  rows = payload['rows']
  start = payload['float_start']
  seeds = payload['seeds']
  run_s = sum(r['seconds'] for r in rows)
  lines = [
    f'Every row fine-tunes one float gpt_small (configs/lm_float.py seed 0, '
    f'{start["val_bits_per_byte"]:.4f} validation bits/byte) for '
    f'{payload["steps"]} steps (AdamW 5e-4, cosine), seeds '
    f'{",".join(map(str, seeds))} (the seed sets the data order: the '
    "min-max is the fine-tuning's spread from one float start); corpus: "
    f'{payload["corpus_bytes"]:,} bytes, SHA-256 {payload["corpus_sha256"]}. '
    'Quantized rows: LSQ ranges, weights per output channel, 8-bit LSQ '
    'inputs, byte embedding / tied head at 8 bits per row. "artifact": the '
    'packed model on disk (float: float32 parameters as safetensors); "vs '
    'INT8": the INT8 artifact\'s bytes over this one\'s; "mean bits": mean '
    'integer weight bits of the attention / MLP kernels (unweighted). '
    '"s": wall seconds of a run (HAWQ: its search included), mean over the '
    'seeds. Run time of the whole table: the float start '
    f'{start["seconds"]:.0f} s and the {len(rows)} runs {run_s:,.0f} s, '
    f'{(start["seconds"] + run_s) / 60:.1f} minutes '
    'in all (on 2 CPU cores; more where the machine was shared).',
    '',
  ]
  runs = payload.get('provenance')
  if runs:
    # A table redrawn with --render names the run that measured the rows.
    lines += [
      f'Rows measured by `{runs["command"]}` at commit `{runs["commit"]}` '
      f'({runs["written_utc"]}).',
      '',
    ]
  lines += [
    '| setting | val bits/byte (mean) | min-max | seeds | artifact KiB | '
    'vs INT8 | mean bits | s |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for method, budget, variant in _settings(rows):
    rs = _select(rows, method, budget, variant)
    v = np.array([r['val_bits_per_byte'] for r in rs])
    size = np.mean([r['artifact_bytes'] for r in rs]) / 1024
    comp = [r['artifact_compression_over_int8'] for r in rs]
    comp_text = f'{np.mean(comp):.2f}x' if comp[0] is not None else '-'
    mean_bits = '-'
    if method != 'float' and rs[0]['bits']:
      searched = [
        np.mean([b for layer, b in r['bits'].items() if layer != 'embed'])
        for r in rs
      ]
      mean_bits = f'{np.mean(searched):.2f}'
    lines.append(
      f'| {_label(method, budget, variant)} | {v.mean():.4f} | '
      f'{v.min():.4f}-{v.max():.4f} | {len(rs)} | {size:,.1f} | '
      f'{comp_text} | {mean_bits} | '
      f'{np.mean([r["seconds"] for r in rs]):.0f} |'
    )
  budgets = sorted(
    {r['budget_bits'] for r in rows if r['method'] == 'fracbits'}, reverse=True
  )
  lines += ['', 'Mixed precision against uniform QAT at equal budget:', '']
  lines += [separation(rows, b) for b in budgets if separation(rows, b)]
  lines += [
    '',
    "FracBits' learned bits at the hard-assignment step (mean over the "
    'layers of a kind and the seeds, min-max in brackets) and the integer '
    'bits after hard assignment. "spread": the largest minus the smallest '
    "learned bits of a run; at a budget equal to a uniform model's size, "
    "hard assignment's one global rounding offset can only move a layer up a "
    'bit if another moves down one to pay for it, which takes a spread above '
    "1 bit: below that every layer rounds to the budget's bits, whatever "
    'their order:',
    '',
    diagnosis(rows),
  ]
  lines += ['', bitmap_table(rows, budgets, seeds[0])]
  return '\n'.join(lines)


def _layer_grid(bits: dict):
  """(depths, bits[depth, kind]) of the transformer blocks' layers."""
  depth_of = {}
  for layer in bits:
    match = re.match(r'block_(\d+)/(.+)$', layer)
    if match:
      depth_of.setdefault(int(match.group(1)), {})[match.group(2)] = bits[layer]
  depths = sorted(depth_of)
  grid = np.array([[depth_of[d].get(k, np.nan) for k in KINDS] for d in depths])
  return depths, grid


def _panels(rows, budgets):
  """(method, budget, variant) of the mixed-precision settings present."""
  return [
    t
    for t in _settings(rows)
    if t[0] in ('fracbits', 'hawq') and t[1] in budgets
  ]


def bitmap_table(rows, budgets, seed) -> str:
  """Markdown: per block and layer kind, each mixed-precision setting's
  integer bits (one seed)."""
  panels = [
    t
    for t in _panels(rows, budgets)
    if any(r['seed'] == seed for r in _select(rows, *t))
  ]
  lines = [
    f'Per-layer integer weight bits, seed {seed} (the embedding is at 8 bits '
    'in every row):',
    '',
    '| setting | block | ' + ' | '.join(KINDS) + ' |',
    '|---|---|' + '---|' * len(KINDS),
  ]
  for method, budget, variant in panels:
    r = next(
      r for r in _select(rows, method, budget, variant) if r['seed'] == seed
    )
    depths, grid = _layer_grid(r['bits'])
    for i, depth in enumerate(depths):
      cells = ' | '.join(f'{b:.0f}' for b in grid[i])
      lines.append(f'| {_label(method, budget, variant)} | {depth} | {cells} |')
  return '\n'.join(lines)


def plot_bitmap(rows, budgets, path):
  """Heat maps of the integer bits per (block, layer kind), mean over seeds,
  one panel per mixed-precision setting; each cell names the mean and, when
  the seeds differ, their min-max."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  panels = _panels(rows, budgets)
  if not panels:
    return
  cols = min(3, len(panels))
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(
    nrows, cols, figsize=(4.6 * cols, 4.2 * nrows), squeeze=False
  )
  # Room for each panel's rotated layer names above the next row's title.
  fig.subplots_adjust(hspace=0.75, wspace=0.35)
  image = None
  for ax, (method, budget, variant) in zip(axes.flat, panels):
    rs = [r for r in _select(rows, method, budget, variant) if r['bits']]
    grids = np.stack([_layer_grid(r['bits'])[1] for r in rs])
    depths = _layer_grid(rs[0]['bits'])[0]
    mean = grids.mean(0)
    image = ax.imshow(mean, cmap='viridis', vmin=0, vmax=8, aspect='auto')
    for d in range(mean.shape[0]):
      for k in range(mean.shape[1]):
        lo, hi = grids[:, d, k].min(), grids[:, d, k].max()
        spread = '' if lo == hi else f'\n({lo:.0f}-{hi:.0f})'
        ax.text(
          k,
          d,
          f'{mean[d, k]:.1f}{spread}',
          ha='center',
          va='center',
          fontsize=7,
          color='white' if mean[d, k] < 5 else 'black',
        )
    ax.set_xticks(range(len(KINDS)))
    ax.set_xticklabels(KINDS, rotation=35, ha='right', fontsize=7)
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f'block {d}' for d in depths], fontsize=7)
    ax.set_title(
      f'{_label(method, budget, variant)}\n'
      f'integer weight bits, mean of {len(rs)} seeds (min-max)',
      fontsize=7,
    )
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis('off')
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.8, label='weight bits')
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


_STYLES = {
  ('float', ''): ('black', 's'),
  ('uniform', ''): ('tab:blue', 'o'),
  ('fracbits', ''): ('tab:red', '^'),
  ('fracbits', 'init+3'): ('tab:orange', 'v'),
  ('fracbits', 'bitlr10'): ('tab:purple', '<'),
  ('hawq', ''): ('tab:green', 'D'),
}


def _legend_label(method, variant):
  if method in ('float', 'uniform'):
    return METHODS[method][1]
  return _label(method, 0, variant).split(',')[0]


def plot_pareto(rows, path):
  """Left: validation bits per byte against artifact size (mean per setting,
  seed min-max as error bars on both axes; dotted: the Pareto front of the
  means). Right: the same bits per byte side by side at each budget, where
  the quantized settings have (nearly) equal sizes."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax, bx) = plt.subplots(
    1, 2, figsize=(13, 5), gridspec_kw={'width_ratios': [1.1, 1]}
  )
  points = []
  seen = set()
  for method, budget, variant in _settings(rows):
    rs = _select(rows, method, budget, variant)
    x = np.array([r['artifact_bytes'] for r in rs]) / 1024
    y = np.array([r['val_bits_per_byte'] for r in rs])
    color, marker = _STYLES[(method, variant)]
    label = None
    if (method, variant) not in seen:
      seen.add((method, variant))
      label = _legend_label(method, variant)
    ax.errorbar(
      x.mean(),
      y.mean(),
      xerr=[[x.mean() - x.min()], [x.max() - x.mean()]],
      yerr=[[y.mean() - y.min()], [y.max() - y.mean()]],
      fmt=marker,
      color=color,
      capsize=3,
      label=label,
    )
    points.append((x.mean(), y.mean()))
  front = []
  for x, y in sorted(points):
    if not front or y < front[-1][1]:
      front.append((x, y))
  ax.plot(*zip(*front), ':', color='gray', label='Pareto front (means)')
  ax.set_xscale('log')
  ax.set_xlabel('artifact size on disk (KiB, log scale)')
  ax.set_ylabel('validation bits per byte (lower is better)')
  ax.set_title('quality vs size (seed min-max bars)', fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  # Right panel: one slot per budget, the settings side by side.
  budgets = sorted(
    {
      r['budget_bits']
      for r in rows
      if r['budget_bits'] and r['budget_bits'] < 8
    },
    reverse=True,
  )
  kinds = [k for k in _STYLES if k[0] != 'float']
  width = 0.8 / len(kinds)
  for i, budget in enumerate(budgets):
    for j, (method, variant) in enumerate(kinds):
      rs = _select(rows, method, budget, variant)
      if not rs:
        continue
      y = np.array([r['val_bits_per_byte'] for r in rs])
      color, marker = _STYLES[(method, variant)]
      bx.errorbar(
        i + (j - (len(kinds) - 1) / 2) * width,
        y.mean(),
        yerr=[[y.mean() - y.min()], [y.max() - y.mean()]],
        fmt=marker,
        color=color,
        capsize=3,
      )
  floats = _select(rows, 'float', None)
  if floats:
    bx.axhline(
      np.mean([r['val_bits_per_byte'] for r in floats]),
      color='black',
      ls='--',
      lw=1,
      label='float (mean)',
    )
    bx.legend(fontsize=8)
  bx.set_xticks(range(len(budgets)))
  bx.set_xticklabels([f'{b}-bit size budget' for b in budgets])
  bx.set_ylabel('validation bits per byte (lower is better)')
  bx.set_title(
    'at each budget (markers as left; seed min-max bars)', fontsize=10
  )
  bx.grid(alpha=0.3, axis='y')
  fig.suptitle('byte-level LM (gpt_small) on the standard-library corpus')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render(json_path, out):
  """Rewrites lm_bits.md and the two PNGs from an existing lm_bits.json."""
  import json

  with open(json_path) as f:
    payload = json.load(f)
  rows = payload['rows']
  _runner.write_md(os.path.join(out, 'lm_bits.md'), table(payload))
  budgets = sorted(
    {
      r['budget_bits']
      for r in rows
      if r['budget_bits'] and r['budget_bits'] < 8
    },
    reverse=True,
  )
  plot_bitmap(rows, budgets, os.path.join(out, 'lm_bits_bitmap.png'))
  plot_pareto(rows, os.path.join(out, 'lm_bits_pareto.png'))


if __name__ == '__main__':
  main()
