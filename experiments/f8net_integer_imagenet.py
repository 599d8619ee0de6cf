"""F8Net integer-only programs of the ImageNet model layouts, checked.

For each model (ImageNet layout: 7x7/2 stem, 3x3/2 max pool, 1000 classes)
at a resolution whose final global pool is a power of two: F8Net with
fixed-point PACT (where the model allows it: not through ReLU6), a few
train-mode passes on random images (BN statistics
and activation formats move off their init), then the integer lowering
(which raises unless the program's logits equal the simulated model's) and
the ONNX export run in onnxruntime. No accuracy is measured (no ImageNet
here): this checks that the full-size graphs lower exactly.

  python experiments/f8net_integer_imagenet.py [--models resnet18,resnet50]
      [--size 64] [--batch 4]

Writes experiments/results/f8net_integer_imagenet.{md,json}. MobileNet-V2
(ReLU6) and 224 px inputs (7x7 final pool) are refused by the lowering; the
refusal is recorded.
"""

import argparse
import os
import time


import jax
import numpy as np

from fracq import export
from fracq import models
from fracq.export import onnx_export as ox
from fracq.methods.f8net import F8NetModel, F8NetOptions
import _runner

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def check(name: str, size: int, batch: int, steps: int = 2) -> dict:
  t0 = time.time()
  x = jax.random.uniform(
    jax.random.key(3), (batch, size, size, 3), minval=-1, maxval=1
  )
  module = models.get_model(name, num_classes=1000)
  try:
    w = F8NetModel(module, x[:2], options=F8NetOptions(pact=True))
  except ValueError:  # ReLU6 models take no folded clip (F8Net says why)
    w = F8NetModel(module, x[:2], options=F8NetOptions(pact=False))
  v = w.init(jax.random.key(0), x[:2])
  step = jax.jit(
    lambda v, x: w.apply(
      v,
      x,
      train=True,
      mutable=['batch_stats', 'quant_stats'],
      rngs={'dropout': jax.random.key(1)},
    )[1]
  )
  for _ in range(steps):
    v = {**v, **step(v, x)}
  row = {
    'model': name,
    'size': size,
    'images': batch,
    'clips': len(set(w.pact_src.values())),
  }
  try:
    prog = export.lower_f8net(w, v, x)  # raises unless bit-exact on x
  except ValueError as e:
    row.update(status='refused', reason=str(e).split(';')[0])
    return row
  got = np.asarray(prog.logits(x))
  sim = np.asarray(w.apply(v, x, train=False))
  row.update(
    status='lowered',
    ops=len(prog.layers),
    adds=sum(isinstance(op, export.IntAdd) for op in prog.layers),
    max_pools=sum(op.maxpool is not None for op in prog.layers),
    bit_exact=bool(np.array_equal(got, sim)),
  )
  try:
    info = {}
    out = ox.run_onnx(ox.program_to_onnx(prog, report=info), np.asarray(x))
    row['onnx_bit_exact'] = bool(np.array_equal(out, got))
  except ImportError:
    row['onnx_bit_exact'] = None
  row['seconds'] = round(time.time() - t0, 1)
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default='resnet18,resnet50,mobilenet_v2')
  ap.add_argument('--size', type=int, default=64)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--out', default=OUT)
  a = ap.parse_args()
  rows = [check(m, a.size, a.batch) for m in a.models.split(',') if m]
  os.makedirs(a.out, exist_ok=True)
  _runner.write_json(os.path.join(a.out, 'f8net_integer_imagenet.json'), rows)
  lines = [
    'Random images, F8Net + fixed-point PACT after train-mode passes.',
    '',
    '| model | input | PACT clips | status | ops | adds | max pools '
    '| program = simulation | ONNX = program |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    if r['status'] == 'lowered':
      lines.append(
        f'| {r["model"]} | {r["size"]}x{r["size"]} | {r["clips"]} '
        f'| lowered | {r["ops"]} | {r["adds"]} | {r["max_pools"]} '
        f'| {r["bit_exact"]} | {r["onnx_bit_exact"]} |'
      )
    else:
      lines.append(
        f'| {r["model"]} | {r["size"]}x{r["size"]} | {r["clips"]} '
        f'| refused: {r["reason"]} | | | | | |'
      )
  text = '\n'.join(lines) + '\n'
  _runner.write_md(os.path.join(a.out, 'f8net_integer_imagenet.md'), text)
  print(text)


if __name__ == '__main__':
  main()
