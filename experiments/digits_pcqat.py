"""Digits: pruning, clustering and QAT that keeps them — accuracy and size.

For each seed: takes the trained float digits model (``configs/digits_float.py``,
``_runner.float_start``: the same float start as every other digits table),
then fine-tunes it with ``configs/digits_pcqat.py`` (same schedule for every
row, 10 epochs at lr 0.02) into

  pruned    float, one-shot 50% magnitude pruning, mask kept (quant=none)
  clustered float, 16 clusters (k-means++), centroids trained (quant=none)
  qat       uniform QAT w8a8 (per-tensor LSQ), no structure
  pqat      QAT w8a8 keeping the 50% sparsity
  cqat      QAT w8a8 keeping the 16 clusters
  pcqat     QAT w8a8 keeping both (the zero is one of the 16 values)
  pcqat_fb  PCQAT under FracBits (learned bits, 6-bit size budget, never
            below log2(16) = 4 bits; with the codebook encoding the stored
            indices take 4 bits whatever the learned bits)

and records test accuracy and the bytes of what a user ships: float rows the
float32 safetensors (and its ``gzip -9`` size, where pruning/clustering
show up); QAT rows the packed artifact (``model.fracq.safetensors``, sparse
and codebook encodings where they are smaller) beside the dense size at the
same bits (the theoretical size) and its gzip size, plus whether the
integer-only program and the ONNX export predict what the fake-quantized
model predicts. Also checks every exported kernel's sparsity and number of
distinct values.

Writes digits_pcqat.{md,json} under ``--out``. Runs come from the run cache
(``_runner.run``); ``--only`` refreshes some rows and keeps the others
already in the JSON.

  python experiments/digits_pcqat.py [--seeds 0,1,2] [--only pcqat,qat]
"""

import argparse
import os


import numpy as np
from absl import logging

import _runner

# The project's accuracy target for PCQAT: at most this many points below
# plain QAT w8a8 at the same schedule.
MAX_DROP_POINTS = 1.5

# name -> (digits_pcqat arg, label); 'float' is configs/digits_float.py.
ROWS = {
  'float': (None, 'float32'),
  'pruned': ('mode=pqat,quant=none', 'pruned 50% (float)'),
  'clustered': ('mode=cqat,quant=none', 'clustered 16 (float)'),
  'qat': ('mode=qat', 'QAT w8a8'),
  'pqat': ('mode=pqat', 'PQAT w8a8, 50% sparse'),
  'cqat': ('mode=cqat', 'CQAT w8a8, 16 clusters'),
  'pcqat': ('mode=pcqat', 'PCQAT w8a8, 50% sparse + 16 clusters'),
  'pcqat_fb': (
    'mode=pcqat,quant=fracbits,bits=6',
    'PCQAT FracBits (6-bit size budget), 50% + 16 clusters',
  ),
}


def _structure(workdir):
  """Max sparsity deviation from 50% and max distinct values per kernel."""
  from fracq.export import artifact
  from safetensors.numpy import load_file

  q = os.path.join(workdir, 'model.fracq.safetensors')
  if os.path.exists(q):
    kernels = artifact.read_artifact(q)[0]
  else:
    f = load_file(os.path.join(workdir, 'model.float.safetensors'))
    kernels = {k: v for k, v in f.items() if k.endswith('/kernel')}
  sp = [float(np.mean(np.asarray(v) == 0)) for v in kernels.values()]
  dv = [int(np.unique(np.asarray(v)).size) for v in kernels.values()]
  return {
    'min_sparsity': min(sp),
    'max_sparsity': max(sp),
    'max_distinct': max(dv),
    'kernels': len(kernels),
  }


def _float_file(workdir):
  from fracq.export import sizes
  from fracq.train import checkpoint as ckpt_lib

  v = ckpt_lib.load_variables(workdir, 'params,batch_stats')
  path = os.path.join(workdir, 'model.float.safetensors')
  n = sizes.save_float_variables(v, path, overwrite=True)
  return {'float32_bytes': n, 'float32_gzip_bytes': sizes.gzip_bytes(path)}


def _seed(names, seed, overrides):
  start = _runner.float_start(seed, **overrides)
  m = dict(start)
  m.update(_float_file(start['workdir']))
  m.update(_structure(start['workdir']))
  yield 'float', _runner.public(m)
  for name in names:
    if name == 'float':
      continue
    arg, _ = ROWS[name]
    # The workdir is kept: the exported kernels are measured below.
    m = _runner.run(
      'digits_pcqat',
      f'{arg},seed={seed}',
      init_from=start,
      keep_workdir=True,
      export=True,
      **overrides,
    )
    m.pop('bits', None)
    m.update(_structure(m['workdir']))
    yield name, _runner.public(m)


def _size_cols(r):
  if 'artifact_bytes' in r:
    return (
      r['artifact_bytes'],
      r['artifact_theoretical_bytes'],
      r['artifact_gzip_bytes'],
    )
  return r['float32_bytes'], r['float32_bytes'], r['float32_gzip_bytes']


def write(rows, out):
  lines = [
    '| row | config | test acc. % (mean) | min-max | seeds | '
    'artifact KiB | dense at same bits KiB | gzip -9 KiB | '
    'kernel sparsity | max distinct values | integer / ONNX = '
    'fake-quant |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  means = {}
  for n, (arg, label) in ROWS.items():
    rs = [r for r in rows if r['row'] == n]
    if not rs:
      continue
    acc = np.array([r['eval_accuracy'] for r in rs]) * 100
    means[n] = acc.mean()
    art, dense, gz = (np.mean(x) / 1024 for x in zip(*map(_size_cols, rs)))
    sp = (
      f'{min(r["min_sparsity"] for r in rs):.3f}-'
      f'{max(r["max_sparsity"] for r in rs):.3f}'
    )
    dv = max(r['max_distinct'] for r in rs)
    im = [
      r['integer_prediction_match']
      for r in rs
      if 'integer_prediction_match' in r
    ]
    om = [
      r['onnx_prediction_match'] for r in rs if 'onnx_prediction_match' in r
    ]
    match = (
      f'{100 * np.mean(im):.1f}% / {100 * np.mean(om):.1f}%'
      if im and om
      else '-'
    )
    cfg = '`digits_float.py`' if arg is None else f'`digits_pcqat.py:{arg}`'
    lines.append(
      f'| {label} | {cfg} | {acc.mean():.2f} | {acc.min():.2f}-'
      f'{acc.max():.2f} | {len(rs)} | {art:.1f} | {dense:.1f} | '
      f'{gz:.1f} | {sp} | {dv} | {match} |'
    )
  text = '\n'.join(lines)
  notes = []
  if 'qat' in means and 'pcqat' in means:
    gap = means['qat'] - means['pcqat']
    met = 'met' if gap <= MAX_DROP_POINTS else 'NOT met'
    notes.append(
      f'PCQAT - QAT: {-gap:+.2f} points (target: a drop of at '
      f'most {MAX_DROP_POINTS}: {met}).'
    )
  _runner.write_md(
    os.path.join(out, 'digits_pcqat.md'),
    'Every non-float row fine-tunes the float '
    'model of the same seed for 10 epochs (lr 0.02). "artifact": the '
    'file a user ships (float32 safetensors for the float rows; the '
    'packed artifact for QAT rows, sparse/codebook encodings where '
    'smaller). "dense at same bits": the theoretical size with every '
    'kernel stored densely at its bits. "integer / ONNX = fake-quant": '
    'share of one eval batch where the integer-only program / '
    'onnxruntime on the ONNX export predict what the fake-quantized '
    'model predicts. Sparsity and distinct values are measured on the '
    'exported kernels (integer codes for QAT rows).\n\n'
    + text
    + '\n\n'
    + '\n'.join(notes),
  )
  return text + '\n' + '\n'.join(notes)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument(
    '--only',
    default='',
    help='comma-separated row names '
    '(the float model is always trained, and recorded)',
  )
  _runner.add_flags(p)
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  overrides = _runner.parse_overrides(args.set)
  names = [n for n in args.only.split(',') if n] or list(ROWS)
  bad = [n for n in names if n not in ROWS]
  if bad:
    raise SystemExit(f'unknown rows {bad}; choose from {list(ROWS)}.')
  path = os.path.join(args.out, 'digits_pcqat.json')
  # --only refreshes some rows and keeps the others.
  rows = _runner.load_rows(path) if args.only and os.path.exists(path) else []
  for s in (int(x) for x in args.seeds.split(',')):
    for name, m in _seed(names, s, overrides):
      rows = [r for r in rows if not (r['row'] == name and r['seed'] == s)]
      rows.append(dict(row=name, seed=s, **m))
      print(
        name,
        s,
        f'{100 * m["eval_accuracy"]:.2f}%',
        _size_cols(rows[-1])[0],
        flush=True,
      )
  _runner.write_json(path, rows)
  print(write(rows, args.out))


if __name__ == '__main__':
  main()
