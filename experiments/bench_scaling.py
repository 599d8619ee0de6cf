"""Benchmark: how a training step scales with batch, model size and devices.

Three measurements of the jitted training step (forward, backward, update)
of float, fracq uniform QAT w8a8 and FracBits (weights; the variants and
the step of experiments/bench_train_step.py), every quantized time a ratio
to the float step measured in the same process:

* batch size: ResNet-20 at 32 px, batch 32 to 256 (time per step and per
  example, peak compiled memory);
* model size: ResNet-20 (32 px, batch 128), ResNet-50 at 64 px (batch
  16), the byte-level LM (gpt_small, batch 32 windows of 128 bytes, as
  configs/lm_float.py trains it) and gpt_tiny;
* devices: the data-parallel step of the training loop
  (``fracq.train.train.make_train_step``: ``shard_map`` over a mesh,
  gradients and BatchNorm statistics averaged over devices) on 1 and on 8
  devices of one process started with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, at the same batch
  per device (weak scaling: 8x the global batch on 8 devices). The
  weak-scaling efficiency is t(1 device, batch b) / t(8 devices, batch 8b):
  1.0 is perfect scaling. On a CPU the 8 devices are fake: they share the
  machine's cores, so 8 devices do 8x the work on the same cores; on C
  cores the efficiency is at most 1/8 when the 1-device step keeps every
  core busy and C/8 when it keeps one busy. It measures the data-parallel
  step's overhead, not a speed-up.

Timing, as in bench_train_step.py: every step compiled and run once
(warm-up, not timed), then ``--rounds`` interleaved rounds (the variants of
one measurement in a rotating order), each timing ``reps`` steps of every
variant; a time is the median over rounds (min-max), a ratio the median of
the per-round ratios (min-max). ``reps`` adapts to the model: enough steps
for about ``--round_s`` seconds of the float step per round, at least 1 and
at most ``--reps`` (fewer for the big models). The machine's load average
is recorded before and after each measurement: on shared cores, read the
spreads.

  python experiments/bench_scaling.py [--batches 32,64,128,256]
      [--models resnet20:32:128,resnet50:64:16,gpt_small:128:32,gpt_tiny:32:32]
      [--devices 8] [--device_batch 16] [--rounds 5] [--reps 3]
      [--json experiments/results/bench_scaling.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import Mesh

from fracq import models
from fracq.train import train as train_lib
import _runner
import bench_train_step

__all__ = [
  'VARIANTS',
  'measure_model',
  'measure_devices',
  'weak_scaling_worker',
  'main',
]

# The variants every measurement compares (names of
# bench_train_step.variant_builders).
VARIANTS = ('float', 'fracq uniform w8a8', 'FracBits weights')
SHORT = {
  'float': 'float',
  'fracq uniform w8a8': 'uniform w8a8',
  'FracBits weights': 'FracBits (weights)',
}
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def _reps(run, args, max_reps: int, round_s: float) -> int:
  """Steps per round: about ``round_s`` seconds of the step's first run
  (an estimate, not a timing; the timing warms up on its own), between 1
  and ``max_reps``."""
  t = run(*args, 1)
  return int(min(max_reps, max(1, round(round_s / max(t, 1e-9)))))


def _param_count(tree) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def _summary(times: dict, memory: dict, names: dict) -> dict:
  """Per variant: step time and its ratio to float (over rounds), peak
  memory and its ratio to float. ``names`` maps a variant to its key in
  ``times`` / ``memory``."""
  out = {}
  float_key = names['float']
  for variant, key in names.items():
    out[variant] = {
      'round_step_s': times[key],
      'step_s': _runner.spread(times[key]),
      'vs_float': _runner.ratio(times, key, float_key),
      'peak_bytes': memory[key]['peak'],
      'peak_vs_float': memory[key]['peak'] / memory[float_key]['peak'],
    }
  return out


def measure_model(
  model_name: str,
  size: int,
  batch: int,
  *,
  rounds: int,
  max_reps: int,
  round_s: float,
  variants=VARIANTS,
) -> dict:
  """Step time and peak memory of ``variants`` of one model and batch
  (``size``: image side, or window in bytes for a language model)."""
  module = models.get_model(model_name)
  x, y = bench_train_step.make_batch(model_name, batch, size)
  builders = bench_train_step.variant_builders(
    model_name, module, x[:1], qwix=False
  )
  steps, memory = {}, {}
  for name in variants:
    compiled, args, memory[name] = bench_train_step.make_step(
      builders[name](), x, y
    )
    steps[name] = (compiled, args)
  params = _param_count(steps['float'][1][0].get('params', {}))
  reps = _reps(bench_train_step.run_steps, steps['float'], max_reps, round_s)
  load_before = os.getloadavg()
  times = bench_train_step.time_interleaved(steps, rounds, reps)
  load_after = os.getloadavg()
  return {
    'model': model_name,
    'input': bench_train_step.batch_text(model_name, batch, size),
    'size': size,
    'batch': batch,
    'params': params,
    'reps': reps,
    'rounds': rounds,
    'load_average_before': list(load_before),
    'load_average_after': list(load_after),
    'variants': _summary(times, memory, {n: n for n in variants}),
  }


class _TrainLoop:
  """The training loop's data-parallel step on one mesh, its state fed
  back from step to step (the step donates it)."""

  def __init__(self, config, wrapper, images, labels, mesh):
    first = {'image': images, 'label': labels}
    state, tx = train_lib.create_train_state(
      config, wrapper, first, jax.random.key(0), total=10**6, mesh=mesh
    )
    self.state = train_lib.replicate(state, mesh)
    self.batch = train_lib.to_global(first, mesh)
    step = train_lib.make_train_step(config, wrapper, tx, mesh)
    self.compiled = step.lower(self.state, self.batch).compile()
    self.memory = bench_train_step.memory(self.compiled)

  def run(self, reps: int) -> float:
    """Mean seconds per step over ``reps`` steps."""
    t = time.perf_counter()
    for _ in range(reps):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - t) / reps


def _run_loop(loop: _TrainLoop, reps: int) -> float:
  return loop.run(reps)


def weak_scaling_worker(a) -> dict:
  """In a process with ``a.devices`` (fake) devices: the training loop's
  step on 1 device at batch ``a.device_batch`` and on ``a.devices`` devices
  at ``a.devices`` times that batch, every variant, interleaved."""
  devices = jax.devices()
  if len(devices) < a.devices:
    raise RuntimeError(
      f'{a.devices} devices asked for, JAX sees {len(devices)}; start the '
      f'process with XLA_FLAGS={DEVICE_COUNT_FLAG}={a.devices} (on a CPU) '
      'or lower --devices.'
    )
  config = _runner.config_module('cifar10_resnet20').get_config()
  config.model = a.device_model
  module = train_lib.build_module(config)
  counts = (1, a.devices)
  global_batch = a.devices * a.device_batch
  images, labels = (
    np.asarray(v)
    for v in bench_train_step.make_batch(
      a.device_model, global_batch, a.device_input
    )
  )
  builders = bench_train_step.variant_builders(
    a.device_model, module, images[:1], qwix=False
  )
  loops = {}
  for name in a.device_variants:
    wrapper = builders[name]()
    for count in counts:
      mesh = Mesh(np.array(devices[:count]), (train_lib.AXIS,))
      local = count * a.device_batch
      loops[(name, count)] = _TrainLoop(
        config, wrapper, images[:local], labels[:local], mesh
      )
  keys = {key: f'{key[0]} / {key[1]} devices' for key in loops}
  steps = {keys[key]: (loop,) for key, loop in loops.items()}
  reps = _reps(_run_loop, (loops[('float', a.devices)],), a.reps, a.round_s)
  load_before = os.getloadavg()
  times = bench_train_step.time_interleaved(
    steps, a.rounds, reps, run=_run_loop
  )
  load_after = os.getloadavg()
  memory = {keys[key]: loop.memory for key, loop in loops.items()}
  by_count = {
    count: _summary(
      times,
      memory,
      {name: keys[(name, count)] for name in a.device_variants},
    )
    for count in counts
  }
  return {
    'model': a.device_model,
    'input': bench_train_step.batch_text(
      a.device_model, a.device_batch, a.device_input
    ),
    'devices': a.devices,
    'device_kinds': sorted({f'{d.platform}:{d.device_kind}' for d in devices}),
    'size': a.device_input,
    'batch_per_device': a.device_batch,
    'reps': reps,
    'rounds': a.rounds,
    'load_average_before': list(load_before),
    'load_average_after': list(load_after),
    'variants': {
      name: {
        'one_device': by_count[1][name],
        'all_devices': by_count[a.devices][name],
        'weak_scaling_efficiency': _runner.ratio(
          times, keys[(name, 1)], keys[(name, a.devices)]
        ),
      }
      for name in a.device_variants
    },
  }


def measure_devices(a) -> dict:
  """:func:`weak_scaling_worker` in a subprocess with ``a.devices`` fake
  CPU devices (``XLA_FLAGS``; its other flags are kept)."""
  env = dict(os.environ)
  flags = [
    flag
    for flag in env.get('XLA_FLAGS', '').split()
    if not flag.startswith(DEVICE_COUNT_FLAG)
  ]
  env['XLA_FLAGS'] = ' '.join(flags + [f'{DEVICE_COUNT_FLAG}={a.devices}'])
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'devices.json')
    command = [
      sys.executable,
      os.path.abspath(__file__),
      '--device_worker',
      out,
      '--devices',
      str(a.devices),
      '--device_model',
      a.device_model,
      '--device_input',
      str(a.device_input),
      '--device_batch',
      str(a.device_batch),
      '--rounds',
      str(a.rounds),
      '--reps',
      str(a.reps),
      '--round_s',
      str(a.round_s),
      '--variants',
      ','.join(a.variants),
      '--device_variants',
      ','.join(a.device_variants),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(
        f'the {a.devices}-device measurement failed:\n{done.stderr[-4000:]}'
      )
    with open(out) as f:
      return json.load(f)


def _fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
  return (
    f'{scale * s["median"]:.{digits}f} '
    f'({scale * s["min"]:.{digits}f}-{scale * s["max"]:.{digits}f})'
  )


def _load(row) -> str:
  return (
    f'{row["load_average_before"][0]:.1f} / {row["load_average_after"][0]:.1f}'
  )


def _variant_cells(row, variants) -> list:
  cells = []
  for name in variants:
    r = row['variants'][name]
    cells.append(f'{_fmt(r["step_s"], 1e3, 1)}')
    if name != 'float':
      cells.append(f'{_fmt(r["vs_float"])}x')
  return cells


def _peak_cells(row, variants) -> list:
  return [
    f'{row["variants"][n]["peak_bytes"] / 2**20:.1f}'
    + ('' if n == 'float' else f' ({row["variants"][n]["peak_vs_float"]:.2f}x)')
    for n in variants
  ]


def _time_header(variants) -> tuple:
  names, rule = [], []
  for name in variants:
    names.append(f'{SHORT.get(name, name)} ms')
    if name != 'float':
      names.append('vs float')
  rule = ['---'] * len(names)
  return names, rule


def render(result: dict) -> str:
  """The markdown of a result (without the provenance line)."""
  variants = result['args']['variants']
  cpus = os.cpu_count() or 1
  load = result['load_average']
  lines = [
    f'Device {result["device"]}, {cpus} CPUs; load average (1 min) '
    f'{load["before"][0]:.2f} before, {load["after"][0]:.2f} after the whole '
    'run (the machine is shared: read the spreads). Step time: median over '
    'rounds (min-max), warm-up excluded; "vs float": per-round ratio to the '
    'float step of the same round (min-max). Peak memory: XLA compiled '
    'statistics of the step (arguments + outputs + temporaries), '
    'deterministic, with its ratio to float.',
    '',
  ]
  time_names, time_rule = _time_header(variants)
  peak_names = [f'{SHORT.get(n, n)} peak MB' for n in variants]
  if result['batch']:
    first = result['batch'][0]
    lines += [
      f'### Batch size ({first["model"]}, {first["size"]} px)',
      '',
      '| batch | '
      + ' | '.join(time_names)
      + ' | float ms per example | '
      + ' | '.join(peak_names)
      + ' | reps x rounds | load before / after |',
      '|---|'
      + '|'.join(time_rule)
      + '|---|'
      + '---|' * len(variants)
      + '---|---|',
    ]
    for row in result['batch']:
      per_example = row['variants']['float']['step_s']['median'] / row['batch']
      lines.append(
        f'| {row["batch"]} | '
        + ' | '.join(_variant_cells(row, variants))
        + f' | {1e3 * per_example:.2f} | '
        + ' | '.join(_peak_cells(row, variants))
        + f' | {row["reps"]} x {row["rounds"]} | {_load(row)} |'
      )
    lines.append('')
  if result['models']:
    lines += [
      '### Model size',
      '',
      '| model | batch | parameters | '
      + ' | '.join(time_names)
      + ' | '
      + ' | '.join(peak_names)
      + ' | reps x rounds | load before / after |',
      '|---|---|---|'
      + '|'.join(time_rule)
      + '|'
      + '---|' * len(variants)
      + '---|---|',
    ]
    for row in result['models']:
      lines.append(
        f'| {row["model"]} | {row["input"]} | {row["params"]:,} | '
        + ' | '.join(_variant_cells(row, variants))
        + ' | '
        + ' | '.join(_peak_cells(row, variants))
        + f' | {row["reps"]} x {row["rounds"]} | {_load(row)} |'
      )
    lines.append('')
  dev = result['devices']
  if dev:
    n = dev['devices']
    lines += [
      f'### Devices: 1 vs {n} ({dev["model"]}, {dev["input"]} per device, '
      'weak scaling)',
      '',
      f"The training loop's data-parallel step (fracq.train.train."
      f'make_train_step) on 1 device at batch {dev["batch_per_device"]} and '
      f'on {n} devices at batch {n * dev["batch_per_device"]}, in one '
      f'process with {n} fake CPU devices '
      f'(XLA_FLAGS={DEVICE_COUNT_FLAG}={n}; devices '
      f'{", ".join(dev["device_kinds"])}). Weak-scaling efficiency = '
      f't(1 device, batch {dev["batch_per_device"]}) / t({n} devices, batch '
      f'{n * dev["batch_per_device"]}), per round (1.0: perfect). The {n} '
      f"devices are fake: they share this machine's {cpus} cores, so the "
      f'{n} devices do {n}x the work of one on the same cores and cannot be '
      f'faster: the efficiency is at most 1/{n} = {1 / n:.3f} when the '
      f'1-device step keeps all {cpus} cores busy, {min(cpus, n)}/{n} = '
      f'{min(cpus, n) / n:.3f} when it keeps one busy, and lower on a loaded '
      'machine. It measures the overhead of the data-parallel step '
      '(sharding, gradient and BatchNorm all-reduce) and how well the '
      'devices share the cores, not a speed-up; on real devices the same '
      'command measures the real thing.',
      '',
      f'| variant | 1 device ms | {n} devices ms | weak-scaling efficiency | '
      f'vs float, {n} devices | peak MB per device, 1 / {n} devices |',
      '|---|---|---|---|---|---|',
    ]
    for name in dev['variants']:
      r = dev['variants'][name]
      one, many = r['one_device'], r['all_devices']
      lines.append(
        f'| {SHORT.get(name, name)} | {_fmt(one["step_s"], 1e3, 1)} | '
        f'{_fmt(many["step_s"], 1e3, 1)} | '
        f'{_fmt(r["weak_scaling_efficiency"], digits=3)} | '
        f'{_fmt(many["vs_float"])}x | '
        f'{one["peak_bytes"] / 2**20:.1f} / {many["peak_bytes"] / 2**20:.1f} |'
      )
    lines += [
      '',
      f'{dev["reps"]} steps x {dev["rounds"]} rounds per variant and device '
      f'count; load average (1 min) {_load(dev)} before / after.',
    ]
    lines += _same_global_batch(result, dev)
  return '\n'.join(lines)


def _same_global_batch(result: dict, dev: dict) -> list:
  """A sentence comparing the float step on all devices with the
  single-device float step of the batch or model table at the same global
  batch, where one was measured."""
  n = dev['devices']
  global_batch = n * dev['batch_per_device']
  for row in result['batch'] + result['models']:
    if (row['model'], row['size'], row['batch']) == (
      dev['model'],
      dev.get('size'),
      global_batch,
    ):
      one = row['variants']['float']['step_s']['median']
      many = dev['variants']['float']['all_devices']['step_s']['median']
      per_example = ', '.join(
        f'{1e3 * r["variants"]["float"]["step_s"]["median"] / r["batch"]:.2f}'
        f' at batch {r["batch"]}'
        for r in result['batch']
      )
      return [
        '',
        f'The same global batch on one device (the float step of the batch '
        f'table, batch {global_batch}, measured in the main process): '
        f'{1e3 * one:.1f} ms against {1e3 * many:.1f} ms on the {n} fake '
        f"devices ({one / many:.2f}x). On this CPU the float step's time per "
        f'example (ms) depends on the batch: {per_example}; {n} devices at '
        f'batch {dev["batch_per_device"]} each run the small-batch case.',
      ]
  return []


def _model_specs(text: str) -> list:
  specs = []
  for item in filter(None, text.split(',')):
    parts = item.split(':')
    if len(parts) != 3:
      raise ValueError(
        f'--models takes name:input:batch items (input: image side or window '
        f'in bytes), e.g. resnet50:64:32; got {item!r}.'
      )
    if not (parts[1].isdigit() and parts[2].isdigit()):
      raise ValueError(
        f'--models: input and batch of {item!r} must be integers, e.g. '
        'resnet50:64:32.'
      )
    specs.append((parts[0], int(parts[1]), int(parts[2])))
  return specs


def _ints(text: str) -> list:
  try:
    return [int(v) for v in filter(None, text.split(','))]
  except ValueError:
    raise ValueError(
      f'--batches takes comma-separated integers, e.g. 32,64; got {text!r}.'
    ) from None


def _variants(parser, flag: str, text: str) -> list:
  names = [v for v in text.split(',') if v]
  if set(names) - set(VARIANTS) or 'float' not in names:
    parser.error(
      f'{flag} must name float and any of {list(VARIANTS)}, comma-separated; '
      f'got {names}.'
    )
  return names


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    '--batches',
    default='32,64,128,256',
    help='batch sizes of the batch-size sweep (empty: skip it)',
  )
  p.add_argument('--batch_model', default='resnet20')
  p.add_argument(
    '--batch_input', type=int, default=32, help='image side of the sweep'
  )
  p.add_argument(
    '--models',
    default='resnet20:32:128,resnet50:64:16,gpt_small:128:32,gpt_tiny:32:32',
    help='name:input:batch items of the model-size sweep (empty: skip it)',
  )
  p.add_argument(
    '--devices',
    type=int,
    default=8,
    help='fake CPU devices of the weak-scaling measurement (0: skip it)',
  )
  p.add_argument('--device_model', default='resnet20')
  p.add_argument('--device_input', type=int, default=32)
  p.add_argument(
    '--device_batch', type=int, default=16, help='batch per device'
  )
  p.add_argument(
    '--rounds', type=int, default=5, help='interleaved timing rounds'
  )
  p.add_argument(
    '--reps', type=int, default=3, help='at most this many steps per round'
  )
  p.add_argument(
    '--round_s',
    type=float,
    default=1.0,
    help='seconds of float steps per round that reps aims at',
  )
  p.add_argument(
    '--variants',
    default=','.join(VARIANTS),
    help='comma-separated subset of ' + ', '.join(VARIANTS),
  )
  p.add_argument(
    '--device_variants',
    default='',
    help='the variants of the device measurement (default: --variants)',
  )
  p.add_argument('--json', default='')
  p.add_argument('--device_worker', default='', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.variants = _variants(p, '--variants', a.variants)
  a.device_variants = _variants(
    p, '--device_variants', a.device_variants or ','.join(a.variants)
  )
  try:
    a.model_specs = _model_specs(a.models)
    a.batch_sizes = _ints(a.batches)
  except ValueError as e:
    p.error(str(e))
  if bench_train_step.is_language_model(a.device_model):
    p.error(
      '--device_model must be an image model (the weak-scaling step runs '
      'the image training config); got ' + a.device_model
    )
  return a


def main(argv=None):
  a = parse_args(argv)
  if a.device_worker:
    result = weak_scaling_worker(a)
    with open(a.device_worker, 'w') as f:
      json.dump(result, f)
    return
  load_before = os.getloadavg()
  timing = dict(rounds=a.rounds, max_reps=a.reps, round_s=a.round_s)
  done = {}

  def measure(model_name, size, batch):
    key = (model_name, size, batch)
    if key not in done:
      print(f'measuring {model_name}, input {size}, batch {batch}', flush=True)
      done[key] = measure_model(
        model_name, size, batch, variants=a.variants, **timing
      )
    return done[key]

  batch_rows = [measure(a.batch_model, a.batch_input, b) for b in a.batch_sizes]
  model_rows = [measure(*spec) for spec in a.model_specs]
  devices = None
  if a.devices:
    print(f'measuring 1 vs {a.devices} devices', flush=True)
    devices = measure_devices(a)
  load_after = os.getloadavg()
  device = jax.devices()[0]
  result = {
    'args': vars(a),
    'device': f'{device.platform} ({device.device_kind})',
    'load_average': {'before': list(load_before), 'after': list(load_after)},
    'batch': batch_rows,
    'models': model_rows,
    'devices': devices,
  }
  text = render(result)
  print(text)
  if a.json:
    # The command that ran: sys.argv, or the script and ``argv`` when called
    # as a function.
    command = None if argv is None else [os.path.abspath(__file__), *argv]
    _runner.write_json(a.json, result, command)
    _runner.write_md(a.json.replace('.json', '.md'), text, command)


if __name__ == '__main__':
  main()
