"""Inference speed of the deployed models: onnxruntime (CPU) latency of
each ONNX QDQ export against the same model exported in float32 ONNX, and
the JAX integer program against the jitted float JAX model.

Rows: the digits CNN (8x8), ResNet-18 and MobileNet-V2 at 224x224 (1000
classes), each under uniform QAT w8a8 and F8Net, batch 1 and batch 8 (and
ResNet-18 F8Net at 256x256, whose final 8x8 pool is a power of two, where the
224 one is refused). The models are untrained (random init, calibration, two
train-mode passes: see ``deploy_matrix.py``); speed does not depend on the
weights' values. The float32 ONNX model is the float Flax model with the
same weights exported by :mod:`fracq.export.onnx_float` (BatchNorm folded
into the convolutions), so both files compute the same network.

Timing: every session / jitted function runs once first (warm-up, not
timed); then ``--rounds`` rounds time ``reps`` calls of every variant of a
model, interleaved (the order rotates from round to round). A variant's
latency is the median over rounds of its mean call time in a round, with the
min-max; a ratio is the median over rounds of the ratio measured within the
same round. onnxruntime runs with its default graph optimizations
(``ORT_ENABLE_ALL``) and ``--threads`` intra-op threads; the optimized graph
is saved (``SessionOptions.optimized_model_filepath``) and its op types are
counted: whether the QDQ pairs became integer kernels (``QLinearConv``,
``QLinearMatMul``, ``QGemm``) or stayed ``DequantizeLinear`` -> float
``Conv`` (then the QDQ model can only be slower than the float one).

The QDQ export is written in its integer-kernel form
(``program_to_onnx(integer_kernels=True)``): layers whose bias is whole
accumulator units (every F8Net layer) become ``QLinearConv`` / ``QGemm``,
bit-exact; uniform-QAT layers keep fractional bias bits, so their exact
export stays float ``Conv``, and a second QDQ model with ``round_bias=True``
(every such layer an integer kernel, biases rounded to whole accumulator
units) is timed beside it with its agreement with the program on the timed
batch.

The JAX integer program runs XLA's integer convolutions, which are slow on
CPUs: rows larger than ``--jax_side`` are lowered a second time at that side
for the JAX columns (integer program against the float model, both at the
smaller size; the table says so).

A row the integer lowering refuses records the refusal (first line).

  python experiments/deploy_speed.py [--models digits_cnn,resnet18,mobilenet_v2]
      [--rounds 5] [--threads 2] [--jax_side 64]
      [--json experiments/results/deploy_speed.json]
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from fracq import export
from fracq.export import onnx_export
from fracq.export import onnx_float
import _runner
import deploy_matrix

# (model, input side, channels, constructor arguments, method)
ROWS = (
  ('digits_cnn', 8, 1, {}, 'uniform w8a8'),
  ('digits_cnn', 8, 1, {}, 'F8Net'),
  ('resnet18', 224, 3, {}, 'uniform w8a8'),
  ('resnet18', 224, 3, {}, 'F8Net'),
  ('resnet18', 256, 3, {}, 'F8Net'),
  ('mobilenet_v2', 224, 3, {}, 'uniform w8a8'),
  ('mobilenet_v2', 224, 3, {}, 'F8Net'),
)
INTEGER_KERNELS = (
  'QLinearConv',
  'QLinearMatMul',
  'QGemm',
  'ConvInteger',
  'MatMulInteger',
  'QLinearAdd',
  'QLinearGlobalAveragePool',
  'QLinearConcat',
)


def first_line(error: Exception) -> str:
  return deploy_matrix.first_line(error)


def build(name, side, channels, kwargs, method):
  """(float module, its variables, the integer program or the refusal's
  first line) of one row."""
  x = jax.random.normal(jax.random.key(0), (2, side, side, channels))
  module, wrapper = deploy_matrix.build(name, method, x, kwargs)
  wrapper, variables = deploy_matrix.settle(wrapper, x, passes=2)
  float_vars = {
    c: variables[c] for c in ('params', 'batch_stats') if c in variables
  }
  try:
    program = export.lower(wrapper, variables, x)
  except (ValueError, NotImplementedError, KeyError, TypeError) as e:
    program = first_line(e)
  return module, float_vars, program


def session(path: str, threads: int, optimized: str):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  opts = ort.SessionOptions()
  opts.intra_op_num_threads = threads
  opts.inter_op_num_threads = 1
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  opts.optimized_model_filepath = optimized
  return ort.InferenceSession(
    path, sess_options=opts, providers=['CPUExecutionProvider']
  )


def op_types(path: str) -> dict:
  """Op type -> count of an ONNX file (``domain:op`` outside the default
  domain)."""
  import onnx  # pylint: disable=g-import-not-at-top

  model = onnx.load(path, load_external_data=False)
  out = {}
  for node in model.graph.node:
    key = f'{node.domain}:{node.op_type}' if node.domain else node.op_type
    out[key] = out.get(key, 0) + 1
  return dict(sorted(out.items()))


def time_interleaved(calls: dict, rounds: int, target_s: float) -> dict:
  """Per variant, its mean call time in each of ``rounds`` rounds.

  Each call runs once first (warm-up, not timed) and once more to pick
  ``reps`` (calls per round, about ``target_s`` seconds each); every round
  then starts one variant later than the round before."""
  names = list(calls)
  reps = {}
  for name in names:
    calls[name]()
    t = time.perf_counter()
    calls[name]()
    reps[name] = max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t = time.perf_counter()
      for _ in range(reps[name]):
        calls[name]()
      times[name].append((time.perf_counter() - t) / reps[name])
  return times


def _qdq_exports(program, tag, tmp, row) -> dict:
  """QDQ kind -> ONNX path: the exact integer-kernel export ('qdq') and,
  where it keeps float layers for their fractional bias bits, the export
  with rounded biases ('qdq rounded'); their export reports go to ``row``."""
  paths = {}
  for kind, round_bias in (('qdq', False), ('qdq rounded', True)):
    path = os.path.join(tmp, f'{tag}_{kind.replace(" ", "_")}.onnx')
    info = {}
    onnx_export.program_to_onnx(
      program, path, report=info, round_bias=round_bias
    )
    if round_bias and not info['rounded_bias_layers']:
      break  # the same graph as 'qdq'
    paths[kind] = path
    row[f'{kind} export'] = {
      'bytes': os.path.getsize(path),
      'integer_kernel_layers': info['integer_kernel_layers'],
      'rounded_bias_layers': info['rounded_bias_layers'],
      'exact_accumulation': info['exact_accumulation'],
    }
  return paths


def measure_row(spec, batch_sizes, rounds, threads, target_s, tmp, jax_side):
  name, side, channels, kwargs, method = spec
  row = {'model': name, 'size': side, 'method': method}
  t0 = time.time()
  module, float_vars, program = build(name, side, channels, kwargs, method)
  if isinstance(program, str):
    row.update(status='refused', reason=program)
    row['seconds'] = round(time.time() - t0, 1)
    return row
  row['status'] = 'lowered'
  row['layers'] = len(program.layers)
  tag = f'{name}_{side}_{method.replace(" ", "_")}'
  paths = _qdq_exports(program, tag, tmp, row)
  float_path = os.path.join(tmp, f'{tag}_float.onnx')
  sample = np.asarray(
    jax.random.normal(jax.random.key(1), (1, side, side, channels))
  )
  onnx_float.float_to_onnx(module, float_vars, sample, float_path)
  paths['float'] = float_path
  row['float_onnx_bytes'] = os.path.getsize(float_path)
  sessions = {}
  for kind, path in paths.items():
    optimized = path.replace('.onnx', '_optimized.onnx')
    sessions[kind] = session(path, threads, optimized)
    row[f'{kind}_kernels'] = op_types(optimized)
  # The QDQ exports against the program on two images (the JAX integer
  # program is slow at 224 px).
  check = np.asarray(
    jax.random.normal(jax.random.key(3), (2, side, side, channels))
  )
  ref = np.asarray(program.logits(check))
  for kind, sess in sessions.items():
    if kind == 'float':
      continue
    out = sess.run(None, {sess.get_inputs()[0].name: check})[0]
    row[f'{kind} export'].update(
      agreement=float(np.mean(out.argmax(-1) == ref.argmax(-1))),
      max_diff_rel=float(np.max(np.abs(out - ref)) / (np.ptp(ref) or 1.0)),
    )
  # The JAX pair, at a smaller size for large inputs (see the docstring).
  row['jax_size'] = min(side, jax_side)
  if side > jax_side:
    module, float_vars, program = build(
      name, jax_side, channels, kwargs, method
    )
    if isinstance(program, str):
      row['jax_reason'] = program
  float_fn = jax.jit(lambda x: module.apply(float_vars, x, train=False))
  int_fn = None if isinstance(program, str) else jax.jit(program.logits)
  calls = {}
  for batch in batch_sizes:
    x = np.asarray(
      jax.random.normal(jax.random.key(2), (batch, side, side, channels))
    )
    for kind, sess in sessions.items():
      input_name = sess.get_inputs()[0].name
      calls[f'ort {kind} b{batch}'] = lambda s=sess, n=input_name, x=x: s.run(
        None, {n: x}
      )
    xj = jax.device_put(
      jax.random.normal(
        jax.random.key(2), (batch, row['jax_size'], row['jax_size'], channels)
      )
    )
    if int_fn is not None:
      calls[f'jax float b{batch}'] = lambda x=xj: float_fn(
        x
      ).block_until_ready()
      calls[f'jax int b{batch}'] = lambda x=xj: int_fn(x).block_until_ready()
  times = time_interleaved(calls, rounds, target_s)
  row['latency_s'] = {k: _runner.spread(v) for k, v in times.items()}
  row['round_latency_s'] = times
  row['ratios'] = {}
  for batch in batch_sizes:
    for kind in sessions:
      if kind != 'float':
        row['ratios'][f'ort {kind} / float b{batch}'] = _runner.ratio(
          times, f'ort {kind} b{batch}', f'ort float b{batch}'
        )
    if int_fn is not None:
      row['ratios'][f'jax int / float b{batch}'] = _runner.ratio(
        times, f'jax int b{batch}', f'jax float b{batch}'
      )
  row['seconds'] = round(time.time() - t0, 1)
  return row


def _probe_graph(signed: bool, relu: bool, per_channel: bool):
  """One QDQ Conv as the program export writes it: unit-scale codes in,
  ``[Relu]``, requantizing QuantizeLinear (per channel: ``axis=1``)."""
  import onnx  # pylint: disable=g-import-not-at-top

  helper, arrays = onnx.helper, onnx.numpy_helper
  channels = 8
  code = np.int8 if signed else np.uint8
  rng = np.random.default_rng(0)
  out_scale = np.full(channels, 0.01, np.float32)
  out_zero = np.zeros(channels, code)
  inits = [
    arrays.from_array(np.array(1.0, np.float32), 'one'),
    arrays.from_array(np.array(0, code), 'act_zero'),
    arrays.from_array(np.array(0, np.int8), 'kernel_zero'),
    arrays.from_array(
      rng.integers(-7, 8, (channels, 4, 3, 3)).astype(np.int8), 'kernel'
    ),
    arrays.from_array(np.zeros(channels, np.int32), 'bias'),
    arrays.from_array(out_scale if per_channel else out_scale[0], 'out_scale'),
    arrays.from_array(out_zero if per_channel else out_zero[0], 'out_zero'),
  ]
  axis = {'axis': 1} if per_channel else {}
  nodes = [
    helper.make_node('QuantizeLinear', ['x', 'one', 'act_zero'], ['xq']),
    helper.make_node('DequantizeLinear', ['xq', 'one', 'act_zero'], ['xd']),
    helper.make_node(
      'DequantizeLinear', ['kernel', 'one', 'kernel_zero'], ['wd']
    ),
    helper.make_node('DequantizeLinear', ['bias', 'one'], ['bd']),
    helper.make_node('Conv', ['xd', 'wd', 'bd'], ['acc'], pads=[1, 1, 1, 1]),
  ]
  last = 'acc'
  if relu:
    nodes.append(helper.make_node('Relu', ['acc'], ['relu']))
    last = 'relu'
  nodes += [
    helper.make_node(
      'QuantizeLinear', [last, 'out_scale', 'out_zero'], ['q'], **axis
    ),
    helper.make_node(
      'DequantizeLinear', ['q', 'out_scale', 'out_zero'], ['y'], **axis
    ),
  ]
  graph = helper.make_graph(
    nodes,
    'probe',
    [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
    [helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, None)],
    initializer=inits,
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
  model.ir_version = min(model.ir_version, 10)
  return model


def fusion_probe() -> list:
  """Which one-Conv QDQ graphs onnxruntime turns into ``QLinearConv``:
  signed / unsigned activation codes, with / without a Relu between the
  Conv and the requantizing QuantizeLinear, per-tensor / per-channel output
  scale."""
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for signed in (True, False):
      for relu in (False, True):
        for per_channel in (False, True):
          path = os.path.join(tmp, 'probe.onnx')
          with open(path, 'wb') as f:
            f.write(_probe_graph(signed, relu, per_channel).SerializeToString())
          session(path, 1, os.path.join(tmp, 'optimized.onnx'))
          kernels = op_types(os.path.join(tmp, 'optimized.onnx'))
          out.append(
            {
              'activations': 'int8' if signed else 'uint8',
              'relu': relu,
              'output_scale': 'per channel' if per_channel else 'per tensor',
              'qlinear_conv': any(
                k.split(':')[-1] == 'QLinearConv' for k in kernels
              ),
              'kernels': kernels,
            }
          )
  return out


def probe_text(probe) -> list:
  fused = [p for p in probe if p['qlinear_conv']]
  lines = [
    'Why the float form of the export runs float kernels (a probe: one '
    'Conv in that form, unit-scale codes and kernel, optional Relu, the '
    "layer's multiplier in the requantizing QuantizeLinear):",
    '',
    '| activation codes | Relu before QuantizeLinear | output scale '
    '| QLinearConv |',
    '|---|---|---|---|',
  ]
  lines += [
    f'| {p["activations"]} | {"yes" if p["relu"] else "no"} '
    f'| {p["output_scale"]} | {"yes" if p["qlinear_conv"] else "no"} |'
    for p in probe
  ]
  lines += [
    '',
    f'{len(fused)} of {len(probe)} forms fuse; the export writes a '
    'layer followed by ReLU with a per-channel multiplier (the last row), '
    'which does not. Besides, onnxruntime fuses only int8 (not INT4) '
    'kernels and only an int32 bias whose scale is the input scale times '
    "the kernel's. The export's integer-kernel form meets all of these "
    '(multiplier in the kernel scale, output scale 1, uint8 after ReLU, '
    'int8 kernels), but a bias with fractional accumulator bits (uniform '
    'QAT, FracBits) has no exact place in it: those layers stay float '
    'unless the biases are rounded (the "rounded" model).',
  ]
  return lines


def _fmt(s, scale=1e3, digits=2):
  return (
    f'{scale * s["median"]:.{digits}f} '
    f'({scale * s["min"]:.{digits}f}-{scale * s["max"]:.{digits}f})'
  )


def _kernels(counts: dict) -> str:
  keep = {
    k: v
    for k, v in counts.items()
    if k.split(':')[-1]
    in INTEGER_KERNELS
    + (
      'Conv',
      'FusedConv',
      'NhwcFusedConv',
      'Gemm',
      'FusedGemm',
      'MatMul',
      'DequantizeLinear',
      'QuantizeLinear',
    )
  }
  return ', '.join(f'{k.split(":")[-1]} {v}' for k, v in keep.items())


def _load(value) -> str:
  return 'not recorded' if value is None else f'{value:.2f}'


def _ratio_cell(ratios, key) -> str:
  return f'{_fmt(ratios[key], 1)}x' if key in ratios else ''


def _latency_cell(latency, key) -> str:
  return _fmt(latency[key]) if key in latency else ''


def _export_cell(row, kind) -> str:
  info = row.get(f'{kind} export')
  if info is None:
    return ''
  text = (
    f'{info["integer_kernel_layers"]} integer-kernel layers, '
    f'{info["rounded_bias_layers"]} rounded biases'
  )
  if 'agreement' in info:
    text += (
      f'; vs program: {100 * info["agreement"]:.0f}% / '
      f'{info["max_diff_rel"]:.1e}'
    )
  return text


def render(rows, probe, args, load_before, load_after, seconds) -> str:
  shared = max(load_before or 0, load_after or 0) > 0.5 * (os.cpu_count() or 1)
  lines = [
    f'onnxruntime CPU execution provider, {args.threads} intra-op threads, '
    'ORT_ENABLE_ALL; JAX jitted on the CPU. Untrained models (latency does '
    f'not depend on the weights). {args.rounds} interleaved rounds after a '
    'warm-up call; latency: median over rounds (min-max) in ms; ratios: '
    'median (min-max) of the per-round ratios. Load average (1 min) '
    f'{_load(load_before)} before, {_load(load_after)} after, on '
    f'{os.cpu_count()} CPUs{" (shared: read the spreads)" if shared else ""}. '
    f'Whole run: {seconds:.0f} s.',
    '',
    '**QDQ**: the exact export (integer kernels where the bias allows); '
    '**rounded**: every fusable layer an integer kernel, biases rounded to '
    'whole accumulator units (uniform QAT rows only; its agreement with '
    'the program below). **JAX px**: the input side of the JAX columns.',
    '',
    '| model | method | batch | ORT QDQ ms | ORT rounded ms | ORT float32 ms '
    '| QDQ / float | rounded / float | JAX px | JAX int program ms '
    '| JAX float ms | int / float |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    label = f'{r["model"]} {r["size"]}'
    if r['status'] != 'lowered':
      lines.append(
        f'| {label} | {r["method"]} | | refused: '
        f'{r["reason"].replace("|", "/")} | | | | | | | | |'
      )
      continue
    jax_note = ''
    if 'jax_reason' in r:
      jax_note = (
        f'refused at {r["jax_size"]} px: '
        f'{r["jax_reason"].split(":")[0]} (the lowering verification; '
        'no JAX timing)'
      )
    for batch in args.batch_sizes:
      lat, rat = r['latency_s'], r['ratios']
      lines.append(
        f'| {label} | {r["method"]} | {batch} '
        f'| {_latency_cell(lat, f"ort qdq b{batch}")} '
        f'| {_latency_cell(lat, f"ort qdq rounded b{batch}")} '
        f'| {_latency_cell(lat, f"ort float b{batch}")} '
        f'| {_ratio_cell(rat, f"ort qdq / float b{batch}")} '
        f'| {_ratio_cell(rat, f"ort qdq rounded / float b{batch}")} '
        f'| {r.get("jax_size", r["size"])} '
        f'| {jax_note or _latency_cell(lat, f"jax int b{batch}")} '
        f'| {_latency_cell(lat, f"jax float b{batch}")} '
        f'| {_ratio_cell(rat, f"jax int / float b{batch}")} |'
      )
  lines += [
    '',
    'Kernels onnxruntime ran after graph optimization (op counts of the '
    'saved optimized model) and the QDQ exports (layers in the '
    'integer-kernel form, rounded biases; prediction agreement / max '
    '|logit diff| over the range against the integer program on 2 images):',
    '',
    '| model | method | QDQ model | rounded model | float32 model |',
    '|---|---|---|---|---|',
  ]
  for r in rows:
    if r['status'] == 'lowered':
      rounded = (
        _kernels(r['qdq rounded_kernels']) if 'qdq rounded_kernels' in r else ''
      )
      lines.append(
        f'| {r["model"]} {r["size"]} | {r["method"]} '
        f'| {_kernels(r["qdq_kernels"])}; {_export_cell(r, "qdq")} '
        f'| {rounded}{"; " if rounded else ""}'
        f'{_export_cell(r, "qdq rounded")} '
        f'| {_kernels(r["float_kernels"])} |'
      )
  lines += ['', *probe_text(probe)]
  return '\n'.join(lines) + '\n'


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default='digits_cnn,resnet18,mobilenet_v2')
  ap.add_argument('--methods', default='uniform w8a8,F8Net')
  ap.add_argument('--batch_sizes', default='1,8')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument(
    '--target_s',
    type=float,
    default=0.2,
    help='seconds of calls per variant and round (at least one call)',
  )
  ap.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  ap.add_argument(
    '--jax_side',
    type=int,
    default=64,
    help='the JAX integer program and float model of larger rows are '
    'measured at this input side',
  )
  ap.add_argument('--json', default='experiments/results/deploy_speed.json')
  ap.add_argument(
    '--render',
    default='',
    help='a result JSON (its rows, load averages and time) to redraw the '
    'table from; runs no model',
  )
  args = ap.parse_args()
  models_wanted = [m for m in args.models.split(',') if m]
  methods = [m for m in args.methods.split(',') if m]
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]
  specs = [s for s in ROWS if s[0] in models_wanted and s[4] in methods]
  if args.render:
    with open(args.render) as f:
      data = json.load(f)
    write(
      args,
      data['rows'],
      data['load_average_before'],
      data['load_average_after'],
      data['seconds'],
      len(data['rows']),
      measured=data.get('measured', data.get('provenance')),
    )
    return
  t0 = time.time()
  load_before = os.getloadavg()[0]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for spec in specs:
      try:
        row = measure_row(
          spec,
          args.batch_sizes,
          args.rounds,
          args.threads,
          args.target_s,
          tmp,
          args.jax_side,
        )
      except Exception as e:  # pylint: disable=broad-except
        row = {
          'model': spec[0],
          'size': spec[1],
          'method': spec[4],
          'status': 'failed',
          'reason': first_line(e),
        }
      print({k: v for k, v in row.items() if k != 'round_latency_s'})
      rows.append(row)
      # Written after every row: an interrupted run keeps what it measured.
      write(
        args,
        rows,
        load_before,
        os.getloadavg()[0],
        time.time() - t0,
        len(specs),
      )


def write(args, rows, load_before, load_after, seconds, planned, measured=None):
  """Writes the JSON and markdown results (``measured``: the provenance of
  the run whose rows a ``--render`` call redraws)."""
  probe = fusion_probe()
  text = render(rows, probe, args, load_before, load_after, seconds)
  if measured is not None:
    text = (
      f'Redrawn from the rows measured at commit `{measured["commit"]}` '
      f'({measured["written_utc"]}, `{measured["command"]}`).\n\n' + text
    )
  if len(rows) < planned:
    text += (
      f'\nPartial: {len(rows)} of {planned} rows measured when this file '
      'was written.\n'
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
      'load_average_before': load_before,
      'load_average_after': load_after,
      'rows': rows,
      'fusion_probe': probe,
      **({} if measured is None else {'measured': measured}),
    },
  )
  _runner.write_md(os.path.splitext(args.json)[0] + '.md', text)


if __name__ == '__main__':
  main()
