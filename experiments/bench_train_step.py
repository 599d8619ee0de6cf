"""Benchmark: train-step time and peak memory of QAT variants vs float.

On one model and batch (ResNet-20, CIFAR shape, batch 128 by default),
measures a full jitted training step (forward, backward, SGD update) for:
float; fracq uniform QAT w8a8 and w4a4 (LSQ, per-channel weights); FracBits
weights-only and weights+activations; the uniform w8a8 and FracBits
weights+activations models with the other ``recompute`` setting of their
specs (keep the quantized operands for the backward pass in a float32
model, recompute them in a bfloat16 one: the opposite of the default); and
qwix's QAT (QtProvider) at w8a8 and w4a4 on the same model. A language model (``--model gpt_small``, the
byte-level LM of configs/lm_float.py; ``--size`` is then its window in
bytes) is quantized as configs/lm_uniform.py and configs/lm_fracbits.py
quantize it. Every time is printed as a ratio to the float
step measured in the same process, plus the ratios the README reports.
Peak memory is XLA's compiled estimate (arguments + outputs + temporaries
of the step), which is deterministic.

Timing: every variant is compiled and run once first (warm-up, not
timed); then ``--rounds`` rounds each time ``--reps`` steps of every
variant, interleaved (the order rotates from round to round, so no variant
always runs first or right after another). A variant's time is the median
over rounds of its mean step time in a round, printed with the spread
(min-max over rounds); a ratio to float is the median over rounds of the
ratio measured within the same round, with its min-max. The machine's load
average before and after the timing is printed: on shared cores the
spread, not only the median, says how far the ratios can be trusted.

Export: the uniform QAT (w8a8, w4a4) and FracBits (weights) models are
frozen to integer codes, bit-packed and written (``fracq.export.export_model``)
at their initial quantizer state (FracBits hard-assigned under its budget);
the table gives the time of freeze + pack + write (warm: a second export of
the same model; the first, cold one includes JAX's eager compilation), the
bytes on disk against the theoretical ``params x bits / 8 + scales + float
parts``, and the INT8 and float32 sizes. ``export_model`` also writes the
INT8 and float32 comparison files into a temporary directory; their time is
included in "export s" and excluded from "freeze s". The models are
untrained, so the structure encodings (codebook / sparse kernels, see
``fracq/export/artifact.py``) can save more than on a trained model: "on
disk / theoretical" below 1 means they did; the bytes they saved are listed.

  python experiments/bench_train_step.py [--model resnet20] [--batch 128]
      [--rounds 5] [--reps 5] [--half_precision]
      [--json experiments/results/bench_train_step.json] [--skip_export]
"""

import argparse
import functools
import os
import platform
import tempfile
import time


import jax
import jax.numpy as jnp
import optax

import fracq
from fracq import export
from fracq import models
from fracq.train import quant_config
from fracq.train.model_wrapper import PlainModel
import _runner


def _rules(
  model_name, w_bits, a_bits, learn_w=False, learn_a=False, recompute=None
):
  fixed = models.default_fixed_layers(model_name)
  w_spec = fracq.FracBitsSpec if learn_w else fracq.TensorSpec
  a_spec = fracq.FracBitsSpec if learn_a else fracq.TensorSpec
  w = w_spec(
    bits=w_bits + (0.5 if learn_w else 0),
    granularity='channel',
    recompute=recompute,
  )
  a = a_spec(bits=a_bits + (0.5 if learn_a else 0), recompute=recompute)
  return [fracq.fixed_bits(fixed), fracq.Rule(weight=w, act=a)]


class _Qwix:
  trainable_collections = ('params',)

  def __init__(self, module, bits):
    import qwix

    qt = {8: jnp.int8, 4: jnp.int4}[bits]
    self.module = qwix.quantize_model(
      module,
      qwix.QtProvider(
        [qwix.QtRule(module_path='.*', weight_qtype=qt, act_qtype=qt)]
      ),
    )

  def init(self, rng, x, train=False):
    return self.module.init(rng, x, train=train)

  def apply(self, v, x, train=False, mutable=False):
    return self.module.apply(v, x, train=train, mutable=mutable)

  def penalty(self, v, step):
    return jnp.zeros(()), {}


def is_language_model(model_name: str) -> bool:
  """Whether ``model_name`` is a byte-level decoder (``gpt_*``)."""
  return model_name.startswith('gpt')


def make_batch(model_name: str, batch: int, size: int):
  """A random training batch ``(x, y)``: images ``size`` x ``size`` x 3 with
  10-class labels, or for a language model ``size`` byte tokens per window
  with their next-byte targets."""
  if is_language_model(model_name):
    x = jax.random.randint(jax.random.key(1), (batch, size), 0, 256)
    y = jax.random.randint(jax.random.key(2), (batch, size), 0, 256)
    return x, y
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
  return x, y


def batch_text(model_name: str, batch: int, size: int) -> str:
  """The shape of :func:`make_batch`'s input, in words."""
  if is_language_model(model_name):
    return f'{batch} windows of {size} bytes'
  return f'{batch}x{size}x{size}x3'


# The language model is quantized as configs/lm_uniform.py and
# configs/lm_fracbits.py do (the byte embedding, also the tied output head,
# weight-only at 8 bits per row; every attention and MLP Dense quantized):
# variant -> (config, its arg, fields set in the method's block).
LM_VARIANTS = {
  'fracq uniform w8a8': ('lm_uniform', 'bits=8', {}),
  'fracq uniform w4a4': ('lm_uniform', 'bits=4', {'act_bits': 4.0}),
  'FracBits weights': ('lm_fracbits', 'bits=4', {}),
  'FracBits weights+acts': (
    'lm_fracbits',
    'bits=4,bitops',
    {'act_bits': 4.0},
  ),
}


def _lm_wrapper(config_name, arg, fields, module, sample, hard_assign_step):
  config = _runner.config_module(config_name).get_config(arg)
  block = config.quant[config.quant.method]
  for key, value in fields.items():
    block[key] = value
  if hard_assign_step is not None and 'hard_assign_step' in block:
    block.hard_assign_step = hard_assign_step
  return quant_config.build(
    config.quant, module, sample, total_steps=config.num_train_steps
  )


def variant_builders(
  model_name: str,
  module,
  sample,
  *,
  qwix: bool = True,
  hard_assign_step: int | None = None,
) -> dict:
  """The benchmarked variants of ``module``: name -> a function building its
  model wrapper.

  Image models: the first conv and the classifier at 8 bits
  (``models.default_fixed_layers``), the rest as the name says (LSQ,
  per-channel weights; FracBits starts at the budget + 0.5 bits). Language
  models (``gpt_*``): as their configs quantize them (``LM_VARIANTS``).
  ``hard_assign_step``: the FracBits variants' hard-assignment step (None:
  never within a benchmark).
  """
  if is_language_model(model_name):
    builders = {'float': lambda: PlainModel(module)}
    for name, (config_name, arg, fields) in LM_VARIANTS.items():
      builders[name] = functools.partial(
        _lm_wrapper, config_name, arg, fields, module, sample, hard_assign_step
      )
  else:
    hard = (
      {} if hard_assign_step is None else {'hard_assign_step': hard_assign_step}
    )

    def quantized(w_bits, a_bits, budget_kind=None, **rule_kwargs):
      budget = {}
      if budget_kind is not None:
        budget = {'budget': fracq.Budget(kind=budget_kind, uniform_bits=4)}
      return lambda: fracq.quantize(
        module,
        _rules(model_name, w_bits, a_bits, **rule_kwargs),
        sample,
        call_kwargs={'train': False},
        **budget,
        **(hard if budget else {}),
      )

    both = {'learn_w': True, 'learn_a': True}
    # The other side of the specs' memory/time trade-off (TensorSpec's
    # recompute: by default float32 models recompute the quantized
    # operands in the backward pass, 16-bit ones keep them).
    other = not fracq.TensorSpec().resolved_recompute(
      getattr(module, 'dtype', jnp.float32)
    )
    builders = {
      'float': lambda: PlainModel(module),
      'fracq uniform w8a8': quantized(8, 8),
      'fracq uniform w4a4': quantized(4, 4),
      'FracBits weights': quantized(4, 8, 'size', learn_w=True),
      'FracBits weights+acts': quantized(4, 4, 'bitops', **both),
      f'fracq uniform w8a8, recompute={other}': quantized(
        8, 8, recompute=other
      ),
      f'FracBits weights+acts, recompute={other}': quantized(
        4, 4, 'bitops', recompute=other, **both
      ),
    }
  if qwix:
    builders['qwix QAT w8a8'] = lambda: _Qwix(module, 8)
    builders['qwix QAT w4a4'] = lambda: _Qwix(module, 4)
  return builders


def make_step(wrapper, x, y):
  # Jitted, as the training loop initialises (eagerly, every operation of
  # the init would compile on its own).
  variables = jax.jit(functools.partial(wrapper.init, train=False))(
    jax.random.key(0), x
  )
  trainable = {
    c: variables[c] for c in wrapper.trainable_collections if c in variables
  }
  state = {c: v for c, v in variables.items() if c not in trainable}
  tx = optax.sgd(0.01, momentum=0.9)
  opt = tx.init(trainable)

  def step(trainable, state, opt, x, y):
    def loss_fn(tr):
      out, new_state = wrapper.apply(
        {**tr, **state}, x, train=True, mutable=list(state)
      )
      ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
      return ce + wrapper.penalty({**tr, **state}, 0)[0], new_state

    (loss, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    upd, opt = tx.update(g, opt, trainable)
    return optax.apply_updates(trainable, upd), new_state, opt, loss

  jitted = jax.jit(step)
  args = (trainable, state, opt, x, y)
  compiled = jitted.lower(*args).compile()
  return compiled, args, memory(compiled)


def memory(compiled) -> dict:
  """XLA's compiled memory statistics of a step, in bytes: ``peak`` is
  arguments + outputs + temporaries (NaN where the backend has none)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {'peak': float('nan')}
  parts = {
    'arguments': mem.argument_size_in_bytes,
    'outputs': mem.output_size_in_bytes,
    'temporaries': mem.temp_size_in_bytes,
  }
  return {'peak': sum(parts.values()), **parts}


def run_steps(compiled, args, reps: int) -> float:
  """Mean seconds per step over ``reps`` steps."""
  t = time.perf_counter()
  for _ in range(reps):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def time_interleaved(steps: dict, rounds: int, reps: int, run=run_steps):
  """Per variant, its mean step time in each of ``rounds`` rounds.

  ``steps`` maps a name to the arguments of ``run`` before ``reps`` (by
  default :func:`run_steps`: ``(compiled, args)``). Each is run once first
  (warm-up, not timed); then every round times ``reps`` steps of each
  variant, starting one variant later than the round before.
  """
  names = list(steps)
  for name in names:
    run(*steps[name], 1)
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      times[name].append(run(*steps[name], reps))
  return times


def _fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
  return (
    f'{scale * s["median"]:.{digits}f} '
    f'({scale * s["min"]:.{digits}f}-{scale * s["max"]:.{digits}f})'
  )


def export_sizes(qmodel, sample, hard_step=None):
  """Times freeze + pack + write of ``qmodel`` and measures the artifact.

  A model that learns bits is hard-assigned first (``for_step`` +
  ``prepare``): the artifact stores integer bits.
  """
  variables = qmodel.init(jax.random.key(0), sample, train=False)
  if hard_step is not None:
    qmodel = qmodel.for_step(hard_step)
    variables = qmodel.prepare(variables)
  variables = jax.device_get(variables)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.fracq.safetensors')
    t = time.perf_counter()
    rep = export.export_model(qmodel, variables, path)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    rep = export.export_model(qmodel, variables, path, overwrite=True)
    warm = time.perf_counter() - t
    on_disk = os.path.getsize(path)
    t = time.perf_counter()
    export.freeze(qmodel, variables)
    freeze_s = time.perf_counter() - t
  return {
    'export_s': warm,
    'export_cold_s': cold,
    'freeze_s': freeze_s,
    'artifact_bytes': int(on_disk),
    'theoretical_bytes': float(rep.theoretical_bytes),
    'artifact_over_theoretical': on_disk / rep.theoretical_bytes,
    'int8_artifact_bytes': int(rep.int8_artifact_bytes),
    'float32_bytes': int(rep.float32_bytes),
    'structure_saved_bytes': int(rep.structure_saved_bytes),
    'compression_over_int8': rep.int8_artifact_bytes / on_disk,
    'mean_kernel_bits': float(rep.mean_kernel_bits),
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='resnet20')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument(
    '--size',
    type=int,
    default=32,
    help='image side in pixels; bytes per window for a language model',
  )
  p.add_argument(
    '--reps', type=int, default=5, help='steps per variant and round'
  )
  p.add_argument(
    '--rounds', type=int, default=5, help='interleaved timing rounds'
  )
  p.add_argument(
    '--half_precision',
    action='store_true',
    help="build the model in bfloat16 (the configs' half_precision)",
  )
  p.add_argument('--json', default='')
  p.add_argument('--skip_qwix', action='store_true')
  p.add_argument(
    '--skip_export',
    action='store_true',
    help='do not time the export or measure artifact sizes',
  )
  a = p.parse_args()
  module = models.get_model(
    a.model, **({'dtype': jnp.bfloat16} if a.half_precision else {})
  )
  x, y = make_batch(a.model, a.batch, a.size)
  sample = x[:1]
  variants = variant_builders(a.model, module, sample, qwix=not a.skip_qwix)
  results, failed, steps = {}, {}, {}
  for name, build in variants.items():
    try:
      compiled, args, mem = make_step(build(), x, y)
    except Exception as e:  # pylint: disable=broad-except
      # e.g. qwix's int4 convolution does not compile on the XLA CPU backend.
      failed[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
      continue
    steps[name] = (compiled, args)
    results[name] = {'memory_bytes': mem, 'peak_bytes': mem['peak']}
  load_before = os.getloadavg()
  times = time_interleaved(steps, a.rounds, a.reps)
  load_after = os.getloadavg()
  for name, r in results.items():
    r['round_step_s'] = times[name]
    r['step_s'] = _runner.spread(times[name])
    r['vs_float'] = _runner.ratio(times, name, 'float')
    r['peak_vs_float'] = r['peak_bytes'] / results['float']['peak_bytes']
  device = jax.devices()[0]
  lines = [
    f'model {a.model}, batch {batch_text(a.model, a.batch, a.size)}, device '
    f'{device.platform} ({device.device_kind}), {platform.machine()}, '
    f'jax {jax.__version__}, '
    f'{"bfloat16" if a.half_precision else "float32"} model; '
    f'{a.rounds} interleaved rounds of {a.reps} '
    'steps per variant after one warm-up step; load average (1 min) '
    f'{load_before[0]:.2f} before, {load_after[0]:.2f} after the timing on '
    f'{os.cpu_count()} CPUs.',
    '',
    *(
      [
        'The machine was shared (load average above half its CPUs): step '
        'times are noisy, read the spreads; peak memory is unaffected.',
        '',
      ]
      if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
      else []
    ),
    'Step time: median over rounds (min-max); ratios are per round, to the '
    'float step of the same round. Peak memory: XLA compiled statistics '
    '(arguments + outputs + temporaries), deterministic.',
    '',
    '| variant | step ms | vs float | peak MB | peak vs float | '
    'temporaries MB |',
    '|---|---|---|---|---|---|',
  ]
  for name, r in results.items():
    lines.append(
      f'| {name} | {_fmt(r["step_s"], 1e3, 1)} | {_fmt(r["vs_float"])}x | '
      f'{r["peak_bytes"] / 2**20:.1f} | {r["peak_vs_float"]:.2f}x | '
      f'{r["memory_bytes"].get("temporaries", float("nan")) / 2**20:.1f} |'
    )
  for name, why in failed.items():
    lines.append(f'| {name} | failed | - | - | - | - |')
  pairs = [
    ('fracq uniform-QAT w8a8 / float', 'fracq uniform w8a8', 'float'),
    ('FracBits (weights) / float', 'FracBits weights', 'float'),
    (
      'FracBits (weights) / uniform QAT w4a8-equivalent (w8a8 rules)',
      'FracBits weights',
      'fracq uniform w8a8',
    ),
    (
      'FracBits (weights+acts) / uniform QAT w4a4',
      'FracBits weights+acts',
      'fracq uniform w4a4',
    ),
    ('fracq / qwix, w8a8', 'fracq uniform w8a8', 'qwix QAT w8a8'),
    ('fracq / qwix, w4a4', 'fracq uniform w4a4', 'qwix QAT w4a4'),
  ]
  ratios = {}
  lines.append('')
  for label, name, base in pairs:
    if name in times and base in times:
      ratios[label] = _runner.ratio(times, name, base)
      lines.append(f'{label}: {_fmt(ratios[label])}x')
  for name, why in failed.items():
    lines.append(f'{name} failed: {why}')
  exports = {}
  if not a.skip_export:
    to_export = {
      'fracq uniform w8a8': (variants['fracq uniform w8a8'], None),
      'fracq uniform w4a4': (variants['fracq uniform w4a4'], None),
      'FracBits weights': (
        variant_builders(a.model, module, sample, hard_assign_step=1)[
          'FracBits weights'
        ],
        1,
      ),
    }
    for name, (build, hard_step) in to_export.items():
      try:
        exports[name] = export_sizes(build(), sample, hard_step)
      except Exception as e:  # pylint: disable=broad-except
        failed[f'export {name}'] = (
          f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
        )
    lines += [
      '',
      'Export (freeze + bit-pack + write of the packed artifact):',
      '| model | export s | cold s | freeze s | bytes on disk | '
      'theoretical bytes | on disk / theoretical | structure saved | '
      'INT8 bytes | '
      'float32 bytes | vs INT8 | mean kernel bits |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for name, e in exports.items():
      lines.append(
        f'| {name} | {e["export_s"]:.2f} | {e["export_cold_s"]:.2f} | '
        f'{e["freeze_s"]:.3f} | {e["artifact_bytes"]:,} | '
        f'{e["theoretical_bytes"]:,.0f} | '
        f'{e["artifact_over_theoretical"]:.4f} | '
        f'{e["structure_saved_bytes"]:,} | '
        f'{e["int8_artifact_bytes"]:,} | {e["float32_bytes"]:,} | '
        f'{e["compression_over_int8"]:.2f}x | '
        f'{e["mean_kernel_bits"]:.2f} |'
      )
    for name, why in failed.items():
      if name.startswith('export '):
        lines.append(f'{name} failed: {why}')
  text = '\n'.join(lines)
  print(text)
  if a.json:
    # The arguments as given (a relative --json stays relative: no machine
    # paths in results).
    _runner.write_json(
      a.json,
      {
        'args': vars(a),
        'device': str(device),
        'load_average_before': list(load_before),
        'load_average_after': list(load_after),
        'results': results,
        'ratios': ratios,
        'export': exports,
        'failed': failed,
      },
    )
    _runner.write_md(a.json.replace('.json', '.md'), text)


if __name__ == '__main__':
  main()
