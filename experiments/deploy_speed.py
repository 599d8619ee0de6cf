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

A row the integer lowering refuses records the refusal (first line).

  python experiments/deploy_speed.py [--models digits_cnn,resnet18,mobilenet_v2]
      [--rounds 5] [--threads 2]
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


def measure_row(spec, batch_sizes, rounds, threads, target_s, tmp) -> dict:
  name, side, channels, kwargs, method = spec
  row = {'model': name, 'size': side, 'method': method}
  t0 = time.time()
  module, float_vars, program = build(name, side, channels, kwargs, method)
  if isinstance(program, str):
    row.update(status='refused', reason=program)
    row['seconds'] = round(time.time() - t0, 1)
    return row
  row['status'] = 'lowered'
  tag = f'{name}_{side}_{method.replace(" ", "_")}'
  qdq_path = os.path.join(tmp, f'{tag}_qdq.onnx')
  float_path = os.path.join(tmp, f'{tag}_float.onnx')
  onnx_export.program_to_onnx(program, qdq_path)
  sample = np.asarray(
    jax.random.normal(jax.random.key(1), (1, side, side, channels))
  )
  onnx_float.float_to_onnx(module, float_vars, sample, float_path)
  row['qdq_bytes'] = os.path.getsize(qdq_path)
  row['float_onnx_bytes'] = os.path.getsize(float_path)
  sessions = {}
  for kind, path in (('qdq', qdq_path), ('float', float_path)):
    optimized = path.replace('.onnx', '_optimized.onnx')
    sessions[kind] = session(path, threads, optimized)
    row[f'{kind}_kernels'] = op_types(optimized)
  row['qdq_integer_kernels'] = {
    k: v
    for k, v in row['qdq_kernels'].items()
    if k.split(':')[-1] in INTEGER_KERNELS
  }
  float_fn = jax.jit(lambda x: module.apply(float_vars, x, train=False))
  int_fn = jax.jit(program.logits)
  calls = {}
  for batch in batch_sizes:
    x = np.asarray(
      jax.random.normal(jax.random.key(2), (batch, side, side, channels))
    )
    xj = jax.device_put(x)
    for kind, sess in sessions.items():
      input_name = sess.get_inputs()[0].name
      calls[f'ort {kind} b{batch}'] = lambda s=sess, n=input_name, x=x: s.run(
        None, {n: x}
      )
    calls[f'jax float b{batch}'] = lambda x=xj: float_fn(x).block_until_ready()
    calls[f'jax int b{batch}'] = lambda x=xj: int_fn(x).block_until_ready()
  times = time_interleaved(calls, rounds, target_s)
  row['latency_s'] = {k: _runner.spread(v) for k, v in times.items()}
  row['round_latency_s'] = times
  row['ratios'] = {}
  for batch in batch_sizes:
    row['ratios'][f'ort qdq / float b{batch}'] = _runner.ratio(
      times, f'ort qdq b{batch}', f'ort float b{batch}'
    )
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
    'Which QDQ Conv forms onnxruntime fuses into QLinearConv (a probe: '
    'one Conv in the form the program export writes, unit-scale codes in, '
    'optional Relu, requantizing QuantizeLinear):',
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
    f'{len(fused)} of {len(probe)} forms fuse. The program export '
    "writes each layer's per-channel requantization multiplier as the "
    "output QuantizeLinear's per-channel scale (axis 1), after a Relu, "
    'with unit-scale kernels (INT4 where codes fit): the forms above that '
    'stay Conv in float32, so the QDQ model does the float work plus the '
    '(de)quantizations. What would make it faster: the multiplier as the '
    "kernel DequantizeLinear's per-channel scale (int8 kernels) and a "
    'per-tensor output scale, unsigned codes after ReLU (the Relu is then '
    'the clamp at zero and is dropped), so onnxruntime selects '
    'QLinearConv / QGemm (MLAS integer GEMM).',
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


def render(rows, probe, args, load_before, load_after, seconds) -> str:
  lines = [
    f'onnxruntime CPU execution provider, {args.threads} intra-op threads, '
    'ORT_ENABLE_ALL; JAX jitted on the CPU. Untrained models (latency does '
    f'not depend on the weights). {args.rounds} interleaved rounds after a '
    'warm-up call; latency: median over rounds (min-max) in ms; ratios: '
    'median (min-max) of the per-round ratios. Load average (1 min) '
    f'{_load(load_before)} before, {_load(load_after)} after, on '
    f'{os.cpu_count()} CPUs{" (shared: read the spreads)" if max(load_before or 0, load_after or 0) > 0.5 * (os.cpu_count() or 1) else ""}. '
    f'Whole run: {seconds:.0f} s.',
    '',
    '| model | method | batch | ORT QDQ ms | ORT float32 ms | QDQ / float '
    '| JAX int program ms | JAX float ms | int / float |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    label = f'{r["model"]} {r["size"]}'
    if r['status'] != 'lowered':
      lines.append(
        f'| {label} | {r["method"]} | | refused: '
        f'{r["reason"].replace("|", "/")} | | | | | |'
      )
      continue
    for batch in args.batch_sizes:
      lat, rat = r['latency_s'], r['ratios']
      lines.append(
        f'| {label} | {r["method"]} | {batch} '
        f'| {_fmt(lat[f"ort qdq b{batch}"])} '
        f'| {_fmt(lat[f"ort float b{batch}"])} '
        f'| {_fmt(rat[f"ort qdq / float b{batch}"], 1)}x '
        f'| {_fmt(lat[f"jax int b{batch}"])} '
        f'| {_fmt(lat[f"jax float b{batch}"])} '
        f'| {_fmt(rat[f"jax int / float b{batch}"], 1)}x |'
      )
  lines += [
    '',
    'Kernels onnxruntime ran after graph optimization (op counts of the '
    'saved optimized model):',
    '',
    '| model | method | QDQ model | float32 model |',
    '|---|---|---|---|',
  ]
  for r in rows:
    if r['status'] == 'lowered':
      lines.append(
        f'| {r["model"]} {r["size"]} | {r["method"]} '
        f'| {_kernels(r["qdq_kernels"])} | {_kernels(r["float_kernels"])} |'
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
    )
    return
  t0 = time.time()
  load_before = os.getloadavg()[0]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for spec in specs:
      try:
        row = measure_row(
          spec, args.batch_sizes, args.rounds, args.threads, args.target_s, tmp
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


def write(args, rows, load_before, load_after, seconds, planned):
  probe = fusion_probe()
  text = render(rows, probe, args, load_before, load_after, seconds)
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
    },
  )
  _runner.write_md(os.path.splitext(args.json)[0] + '.md', text)


if __name__ == '__main__':
  main()
