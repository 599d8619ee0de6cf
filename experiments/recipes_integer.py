"""The ImageNet FracBits recipes lower to integer programs, checked.

For each recipe config (``configs/<name>.py`` as a user runs it: the
config's model, dtype (bfloat16 where ``half_precision``), rules, PACT
activation ranges and size budget), on random images at ``--size``: the
model wrapper the config builds, calibrated, one train-mode pass
(BatchNorm statistics), hard assignment of the learned bits, then the
integer lowering (``fracq.export.lower``: its teacher-forced check raises
unless every layer reproduces the model's codes up to rounding ties) and
the ONNX export run in onnxruntime. The models are untrained (no ImageNet
here), so this checks that the recipes deploy, not their accuracy.

  python experiments/recipes_integer.py
      [--configs resnet50_fracbits,resnet18_fracbits,mobilenet_v2_fracbits,
      inception_v3_fracbits] [--size 64] [--batch 4]

Inception-V3 runs at 107 px at least (its auxiliary head, run in train
mode, pools a 5x5 window).

Writes experiments/results/recipes_integer.{md,json}.
"""

import argparse
import importlib
import os
import sys
import time

import jax
import numpy as np

from fracq import export
from fracq.export import onnx_export
from fracq.train import quant_config
from fracq.train import train as train_lib
import _runner

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
# The smallest input a model takes in train mode (Inception-V3's auxiliary
# head pools a 5x5 window); others run at --size.
MIN_SIZE = {'inception_v3': 107}
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(name: str, size: int, batch: int) -> dict:
  """One recipe: build, settle, lower, export to ONNX; the row."""
  t0 = time.time()
  config = importlib.import_module(f'configs.{name}').get_config()
  size = max(size, MIN_SIZE.get(config.model, 0))
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  module = train_lib.build_module(config, axis_name=None)
  wrapper = quant_config.build_model_wrapper(config, module, x[:2], 10)
  variables = jax.jit(lambda k, x: wrapper.init(k, x, train=False))(
    jax.random.key(0), x[:2]
  )
  variables = wrapper.calibrate(variables, x)
  mutable = [c for c in variables if c not in ('params', 'quant')]
  _, updates = jax.jit(
    lambda v, x: wrapper.apply(
      v, x, train=True, mutable=mutable, rngs={'dropout': jax.random.key(1)}
    )
  )(variables, x)
  hard = wrapper.for_step(10**9)
  variables = hard.prepare({**variables, **updates})
  row = {
    'config': name,
    'model': config.model,
    'dtype': jax.numpy.dtype(getattr(module, 'dtype', 'float32')).name,
    'act_range': config.quant.fracbits.act_range,
    'size': size,
  }
  try:
    program = export.lower(hard, variables, x)
  except ValueError as e:
    row.update(status='refused', reason=str(e).splitlines()[0][:400])
    row['seconds'] = round(time.time() - t0, 1)
    return row
  check_ = program.verification
  got = np.asarray(program.logits(x))
  ort = onnx_export.run_onnx(
    onnx_export.program_to_onnx(program), np.asarray(x)
  )
  bits = sorted(
    {
      int(b)
      for op in program.layers
      if isinstance(op, export.IntLayer)
      for b in np.atleast_1d(op.kernel_bits or 8)
    }
  )
  row.update(
    status='lowered',
    ops=len(program.layers),
    kernel_bits=bits,
    tied_codes=check_.flipped_codes,
    checked_codes=check_.checked_codes,
    replay_max_diff_rel=check_.replay_max_diff_rel,
    agreement=check_.agreement,
    max_diff_rel=check_.max_diff_rel,
    onnx_agreement=float(np.mean(ort.argmax(-1) == got.argmax(-1))),
    onnx_max_diff_rel=float(np.max(np.abs(ort - got)) / (np.ptp(got) or 1.0)),
    seconds=round(time.time() - t0, 1),
  )
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument(
    '--configs',
    default='resnet50_fracbits,resnet18_fracbits,mobilenet_v2_fracbits,'
    'inception_v3_fracbits',
  )
  ap.add_argument('--size', type=int, default=64)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--out', default=OUT)
  args = ap.parse_args()
  rows = [check(n, args.size, args.batch) for n in args.configs.split(',') if n]
  os.makedirs(args.out, exist_ok=True)
  _runner.write_json(os.path.join(args.out, 'recipes_integer.json'), rows)
  lines = [
    'Untrained (random init, calibration and one train-mode pass on random '
    'images), each config as configured (dtype, PACT activations, size '
    'budget), bits hard-assigned. "ties": layer input codes the '
    'teacher-forced check found off by one at rounding ties, of all '
    'checked; "program": prediction agreement / max |logit diff| over the '
    'logit range against the float32 fake-quantized model, free running; '
    '"ONNX": onnxruntime against the program.',
    '',
    '| config | model | dtype | activations | input | status | ops | '
    'kernel bits | ties | program | ONNX | s |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    head = (
      f'| {r["config"]} | {r["model"]} | {r["dtype"]} | {r["act_range"]} | '
      f'{r["size"]}x{r["size"]} '
    )
    if r['status'] != 'lowered':
      lines.append(
        head + f'| refused: {r["reason"]} | | | | | | {r["seconds"]} |'
      )
      continue
    lines.append(
      head
      + f'| lowered | {r["ops"]} | {", ".join(map(str, r["kernel_bits"]))} '
      f'| {r["tied_codes"]} of {r["checked_codes"]:,} '
      f'| {100 * r["agreement"]:.0f}% / {r["max_diff_rel"]:.1e} '
      f'| {100 * r["onnx_agreement"]:.0f}% / {r["onnx_max_diff_rel"]:.1e} '
      f'| {r["seconds"]} |'
    )
  text = '\n'.join(lines) + '\n'
  _runner.write_md(os.path.join(args.out, 'recipes_integer.md'), text)
  print(text)


if __name__ == '__main__':
  main()
