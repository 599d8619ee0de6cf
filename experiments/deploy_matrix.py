"""Deploy matrix: which zoo model lowers to an integer program and ONNX,
under which method, and how closely the deployed model follows the
fake-quantized one.

Rows: the zoo models at a small input (digits CNN 8x8, ResNet-20 / ResNet-18
/ ResNet-50 / MobileNet-V1 / MobileNet-V2 at 32x32, Inception-V3 at 75x75,
the smallest it accepts (without its train-only auxiliary head), ViT on
8x8 digits, the tiny GPT on 16 tokens).
Columns: uniform QAT w8a8 and w4a8 (LSQ, per-channel weights), FracBits
(weights learned under a 4-bit size budget, hard-assigned to per-layer
integer bits), F8Net (8-bit fixed point, fixed-point PACT where the model
allows it) and PCQAT (50 % pruning + 16 clusters + 8-bit QAT, per-tensor
weights). First conv and classifier stay at 8 bits (the zoo's defaults).

The models are NOT trained: each is built with the method's factory (the
one ``config.quant`` builds, ``fracq.train.quant_config.build``) from a
random init, calibrated on the batch (quantizer ranges; PCQAT prunes and
clusters here) and run in train mode ``--passes`` times (BatchNorm
statistics and observers move off their init), so the matrix measures
deployability, not accuracy. Each cell then:

* lowers the model to an integer program (``fracq.export.lower``) and
  compares it with the fake-quantized model on a fixed batch (real digits
  for the digits models, random images / tokens otherwise): prediction
  agreement and max |logit difference| / logit range; for the real-
  multiplier lowering (uniform QAT, FracBits, PCQAT) also what its
  teacher-forced check found: the input codes, of all layers, that differ
  from the model's by one at rounding ties when every layer reads the
  model's own input codes;
* writes the program as ONNX QDQ (``program_to_onnx``) and runs it in
  onnxruntime: max |logit difference| / range against the program, and the
  layers written as integer kernels; again with ``round_bias=True``
  (integer kernels for layers whose bias has fractional accumulator bits,
  the bias rounded): prediction agreement and max |logit difference|;
* writes the packed artifact (``fracq.export.export_model``): bytes on disk
  against the theoretical size (codes at their bits + scales + float parts);
  F8Net, which has no packed artifact, reports its integer program file
  (``save_program``) against the program's theoretical size instead.

A cell the lowering refuses records the first line of the refusal (which
names the operation), and still reports the packed artifact.

  python experiments/deploy_matrix.py [--models digits_cnn,resnet20]
      [--methods 'uniform w8a8,F8Net'] [--batch 8] [--passes 2]
      [--json experiments/results/deploy_matrix.json]

Writes ``deploy_matrix.{json,md}`` next to ``--json``.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fracq import export
from fracq import models
from fracq.data import digits
from fracq.export import onnx_export
from fracq.export import serialization
from fracq.train import quant_config
import _runner

# Model -> (input: ('image', side, channels) or ('tokens', length, vocab),
# constructor arguments).
MODELS = {
  'digits_cnn': (('image', 8, 1), {}),
  'resnet20': (('image', 32, 3), {}),
  'mobilenet_v2': (('image', 32, 3), {'num_classes': 10}),
  'resnet18': (('image', 32, 3), {'num_classes': 10}),
  'vit_digits': (('image', 8, 1), {}),
  'gpt_tiny': (('tokens', 16, 256), {}),
  'mobilenet_v1': (('image', 32, 3), {'num_classes': 10}),
  'resnet50': (('image', 32, 3), {'num_classes': 10}),
  # Without the auxiliary head: it runs in train mode only (not deployed)
  # and pools its 3x3 input with a 5x5 window, empty at 75x75.
  'inception_v3': (('image', 75, 3), {'num_classes': 10, 'aux_logits': False}),
}

# Column -> config.quant fields (block -> fields).
METHODS = {
  'uniform w8a8': {
    'method': 'uniform',
    'uniform': {'weight_bits': 8.0, 'act_bits': 8.0},
  },
  'uniform w4a8': {
    'method': 'uniform',
    'uniform': {'weight_bits': 4.0, 'act_bits': 8.0},
  },
  'FracBits': {
    'method': 'fracbits',
    'fracbits': {'act_bits': 8.0, 'hard_assign_step': 1},
    'budget': {'uniform_bits': 4.0},
  },
  'F8Net': {'method': 'f8net', 'f8net': {'pact': True}},
  'PCQAT': {
    'method': 'uniform',
    'uniform': {
      'weight_bits': 8.0,
      'act_bits': 8.0,
      'weight_granularity': 'tensor',
    },
    'preserve': {'mode': 'prune_cluster', 'sparsity': 0.5, 'clusters': 16},
  },
}


def first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:400]


def batch_for(name: str, size: int, seed: int = 0):
  """The fixed batch a model is checked on."""
  (kind, side, channels), _ = MODELS[name]
  if kind == 'tokens':
    return jax.random.randint(
      jax.random.key(seed), (size, side), 0, channels, jnp.int32
    )
  if side == 8 and channels == 1:  # the digits models: real test digits
    _, _, xte, _ = digits.load_digits_split()
    return jnp.asarray(xte[:size], jnp.float32)
  return jax.random.normal(jax.random.key(seed), (size, side, side, channels))


def quant_block(name: str, method: str):
  """``config.quant`` of ``method`` on model ``name``."""
  spec = METHODS[method]
  quant = quant_config.default_quant_config(spec['method'])
  if MODELS[name][0][0] == 'tokens':
    # As the LM configs (configs/common.py text_quant): the byte embedding,
    # also the tied output head, weight-only at 8 bits per row.
    quant.layers.fixed = ''
    quant.layers.embed = '^embed$'
  else:
    quant.layers.fixed = models.default_fixed_layers(name)
  for block, fields in spec.items():
    if block == 'method':
      continue
    for field, value in fields.items():
      quant[block][field] = value
  return quant


def build(name: str, method: str, x, kwargs=None):
  """The float module ``name`` (``kwargs``: its constructor arguments,
  default :data:`MODELS`') and the wrapper of ``method`` on it."""
  if kwargs is None:
    _, kwargs = MODELS[name]
  module = models.get_model(name, **kwargs)
  quant = quant_block(name, method)
  try:
    wrapper = quant_config.build(quant, module, x[:2], total_steps=2)
  except ValueError as e:
    if method != 'F8Net' or 'PACT' not in str(e):
      raise
    # Models that clip activations (ReLU6) take no folded PACT clip.
    quant.f8net.pact = False
    wrapper = quant_config.build(quant, module, x[:2], total_steps=2)
  return module, wrapper


def settle(wrapper, x, passes: int):
  """Initialised, calibrated variables after ``passes`` train-mode passes
  (hard-assigned bits for FracBits)."""
  variables = jax.jit(lambda k, x: wrapper.init(k, x, train=False))(
    jax.random.key(0), x[:2]
  )
  variables = wrapper.calibrate(variables, x)
  mutable = [c for c in variables if c not in ('params', 'quant')]
  step = jax.jit(
    lambda v, x: wrapper.apply(
      v, x, train=True, mutable=mutable, rngs={'dropout': jax.random.key(1)}
    )[1]
  )
  for _ in range(passes):
    variables = {**variables, **step(variables, x)}
  hard = wrapper.for_step(10**9)
  return hard, hard.prepare(variables)


def relative(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / (np.ptp(ref) or 1.0))


def cell(name: str, method: str, x, passes: int) -> dict:
  t0 = time.time()
  row = {'model': name, 'method': method}
  try:
    _, wrapper = build(name, method, x)
    wrapper, variables = settle(wrapper, x, passes)
  except Exception as e:  # pylint: disable=broad-except
    row.update(status='not built', reason=first_line(e))
    row['seconds'] = round(time.time() - t0, 1)
    return row
  row['status'] = 'refused'
  try:
    program = export.lower(wrapper, variables, x)
  except (ValueError, NotImplementedError, KeyError, TypeError) as e:
    row['reason'] = first_line(e)
    program = None
  if program is not None:
    got = np.asarray(program.logits(x))
    ref = np.asarray(
      jax.jit(lambda v, x: wrapper.apply(v, x, train=False))(variables, x)
    )
    row.update(
      status='lowered',
      ops=len(program.layers),
      program_agreement=float(np.mean(got.argmax(-1) == ref.argmax(-1))),
      program_max_diff_rel=relative(got, ref),
    )
    check = program.verification
    if check is not None and check.layers:  # the lowering's teacher forcing
      row.update(
        replay_tied_codes=check.flipped_codes,
        replay_codes=check.checked_codes,
        replay_max_code_diff=max(e['max_diff'] for e in check.layers.values()),
        replay_max_diff_rel=check.replay_max_diff_rel,
      )
    try:
      for key, round_bias in (('onnx', False), ('onnx_rounded', True)):
        info = {}
        out = onnx_export.run_onnx(
          onnx_export.program_to_onnx(
            program, report=info, round_bias=round_bias
          ),
          np.asarray(x),
        )
        row.update(
          {
            f'{key}_agreement': float(
              np.mean(out.argmax(-1) == got.argmax(-1))
            ),
            f'{key}_max_diff_rel': relative(out, got),
            f'{key}_integer_kernel_layers': info['integer_kernel_layers'],
            f'{key}_rounded_bias_layers': info['rounded_bias_layers'],
          }
        )
    except (ValueError, ImportError) as e:
      row['onnx_reason'] = first_line(e)
  with tempfile.TemporaryDirectory() as tmp:
    if program is not None:
      program_path = os.path.join(tmp, 'model.int.safetensors')
      row.update(
        program_bytes=int(export.save_program(program, program_path)),
        program_theoretical_bytes=float(
          serialization.theoretical_bytes(program)
        ),
      )
    path = os.path.join(tmp, 'model.fracq.safetensors')
    try:
      if not hasattr(wrapper, 'facts'):
        raise ValueError(
          f'{type(wrapper).__name__} writes no packed artifact (its '
          'deployable file is the integer program)'
        )
      rep = export.export_model(wrapper, variables, path)
      row.update(
        artifact_bytes=int(os.path.getsize(path)),
        theoretical_bytes=float(rep.theoretical_bytes),
        float32_bytes=int(rep.float32_bytes),
        mean_kernel_bits=float(rep.mean_kernel_bits),
      )
    except Exception as e:  # pylint: disable=broad-except
      row['artifact_reason'] = first_line(e)
  row['seconds'] = round(time.time() - t0, 1)
  return row


def _cell_text(r: dict, notes: list) -> str:
  """A cell of the markdown table; refusals become numbered notes."""

  def note(text):
    if text not in notes:
      notes.append(text)
    return f'refused [{notes.index(text) + 1}]'

  if r['status'] == 'not built':
    return note(r['reason']).replace('refused', 'not built')
  parts = []
  if r['status'] == 'lowered':
    text = (
      f'program {100 * r["program_agreement"]:.0f}% / '
      f'{r["program_max_diff_rel"]:.1e}'
    )
    if 'replay_tied_codes' in r:
      text += f' ({r["replay_tied_codes"]} ties)'
    parts.append(text)
    if 'onnx_max_diff_rel' in r:
      text = f'ORT {r["onnx_max_diff_rel"]:.1e}'
      if 'onnx_integer_kernel_layers' in r:
        text += f' ({r["onnx_integer_kernel_layers"]} int. kernels)'
      if r.get('onnx_rounded_rounded_bias_layers'):
        text += (
          f', rounded biases {100 * r["onnx_rounded_agreement"]:.0f}% / '
          f'{r["onnx_rounded_max_diff_rel"]:.1e} '
          f'({r["onnx_rounded_integer_kernel_layers"]} int. kernels)'
        )
      parts.append(text)
    else:
      parts.append(f'ONNX {note(r.get("onnx_reason", ""))}')
  else:
    parts.append(note(r['reason']))
  if 'artifact_bytes' in r:
    parts.append(
      f'{r["artifact_bytes"] / 1024:.0f} KiB = '
      f'{r["artifact_bytes"] / r["theoretical_bytes"]:.2f}x theor. '
      f'({r["mean_kernel_bits"]:.1f} b)'
    )
  elif 'program_bytes' in r:
    parts.append(
      f'program file {r["program_bytes"] / 1024:.0f} KiB = '
      f'{r["program_bytes"] / r["program_theoretical_bytes"]:.2f}x theor.'
    )
  else:
    parts.append(f'artifact {note(r.get("artifact_reason", ""))}')
  return '; '.join(parts)


def render(rows, methods, names, args, seconds: float) -> str:
  by = {(r['model'], r['method']): r for r in rows}
  lines = [
    'Untrained models (random init, calibration on the batch, '
    f'{args.passes} train-mode passes; no gradient steps): the matrix '
    'checks deployability, not accuracy. Batch: '
    f'{args.batch} real test digits for the 8x8 models, random images / '
    f'tokens otherwise. The cells took {seconds:.0f} s in all '
    '(sum of their times).',
    '',
    'Each cell: **program**: prediction agreement of the integer program '
    'with the fake-quantized model / max |logit diff| over the logit '
    "range, and (uniform QAT, FracBits, PCQAT) how many of all layers' "
    "input codes the lowering's teacher-forced check found off by one at "
    "rounding ties (each layer reading the model's own input codes; a "
    "code off by more than one, or more than 0.1% of a layer's codes off "
    'by one, is a refusal): in deep untrained nets a few ties grow into '
    'the free-running logit difference; **ORT**: onnxruntime running the QDQ export vs the program, '
    'max |logit diff| / range, with the number of layers it runs as '
    'integer kernels (QLinearConv / QGemm: those whose bias is whole '
    'accumulator units); where biases have fractional bits, the export '
    'with them rounded (`round_bias=True`, every fusable layer an integer '
    'kernel): its prediction agreement / max |logit diff| with the '
    'program; the packed artifact on disk, its ratio to '
    'the theoretical size (below 1: sparse / codebook encodings) and the '
    'mean kernel bits; or the refusal, numbered below (first line of the '
    'error).',
    '',
    '| model | input | ' + ' | '.join(methods) + ' |',
    '|---|---|' + '---|' * len(methods),
  ]
  notes = []
  for name in names:
    (kind, side, channels), _ = MODELS[name]
    shape = (
      f'{side} tokens' if kind == 'tokens' else f'{side}x{side}x{channels}'
    )
    cells = [
      _cell_text(by[(name, m)], notes) if (name, m) in by else ''
      for m in methods
    ]
    lines.append(f'| {name} | {shape} | ' + ' | '.join(cells) + ' |')
  lowered = sum(r['status'] == 'lowered' for r in rows)
  lines += ['', f'{lowered} of {len(rows)} cells lower to an integer program.']
  if notes:
    lines += ['', 'Refusals:', '']
    lines += [f'{i + 1}. {text}' for i, text in enumerate(notes)]
  return '\n'.join(lines) + '\n'


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default=','.join(MODELS))
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--passes', type=int, default=2)
  ap.add_argument('--json', default='experiments/results/deploy_matrix.json')
  ap.add_argument(
    '--render',
    default='',
    help='comma-separated result JSONs of earlier runs (e.g. of disjoint '
    '--models): redraw one table from their cells, run nothing',
  )
  args = ap.parse_args()
  if args.render:  # drawn with this call's --batch / --passes
    return render_files(args, args.render.split(','))
  names = [m for m in args.models.split(',') if m]
  methods = [m for m in args.methods.split(',') if m]
  for n in names:
    if n not in MODELS:
      ap.error(f'--models: unknown {n!r}; choose from {list(MODELS)}')
  for m in methods:
    if m not in METHODS:
      ap.error(f'--methods: unknown {m!r}; choose from {list(METHODS)}')
  rows = []
  planned = len(names) * len(methods)
  for name in names:
    x = batch_for(name, args.batch)
    for method in methods:
      row = cell(name, method, x, args.passes)
      print(row, flush=True)
      rows.append(row)
      # Written after every cell: an interrupted run keeps what it measured.
      seconds = sum(r['seconds'] for r in rows)
      write(args, rows, methods, names, seconds, planned)


def render_files(args, paths) -> None:
  """One table from the cells of earlier runs' result files."""
  cells, measured = {}, []
  for path in paths:
    for row in _runner.load_rows(path):
      cells.setdefault((row['model'], row['method']), row)
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, dict):
      for run in data.get('measured', [data.get('provenance')]):
        if run and run not in measured:
          measured.append(run)
  # Every model and method: those no file measured show as empty cells.
  names, methods = list(MODELS), list(METHODS)
  rows = [cells[(n, m)] for n in names for m in methods if (n, m) in cells]
  seconds = sum(r.get('seconds', 0.0) for r in rows)
  write(
    args, rows, methods, names, seconds, len(names) * len(methods), measured
  )


def write(args, rows, methods, names, seconds, planned, measured=None):
  """Writes the JSON and markdown results (``measured``: the provenance of
  the runs whose cells a ``--render`` call redraws)."""
  text = render(rows, methods, names, args, seconds)
  if measured:
    runs = '; '.join(
      f'`{run["command"]}` at commit `{run["commit"][:7]}` '
      f'({run["written_utc"]})'
      for run in measured
    )
    text = f'Redrawn from the cells of: {runs}.\n\n' + text
  if len(rows) < planned:
    text += (
      f'\nPartial: {len(rows)} of {planned} cells measured when this file '
      'was written (empty cells were not run).\n'
    )
  else:
    print(text)
  _runner.write_json(
    args.json,
    {
      'args': {
        k: v for k, v in vars(args).items() if k not in ('json', 'render')
      },
      'seconds': seconds,
      'complete': len(rows) == planned,
      'rows': rows,
      **({'measured': measured} if measured else {}),
    },
  )
  _runner.write_md(os.path.splitext(args.json)[0] + '.md', text)


if __name__ == '__main__':
  main()
