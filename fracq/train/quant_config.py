"""From ``config.quant`` (an ``ml_collections`` block) to a model wrapper.

``config.quant.method`` names a method of :data:`fracq.train.registry.METHODS`;
its block (``config.quant.<method>``, e.g. ``config.quant.fracbits``) holds the
keyword arguments of that method's factory, so any field can be overridden
from the command line (``--config.quant.fracbits.penalty_weight=2``). Blocks
shared by several methods:

* ``config.quant.layers``: ``fixed`` (regex of layers kept at fixed bits, ''
  = none) at ``fixed_bits`` / ``fixed_act_bits``, ``embed`` (regex of the
  ``nn.Embed`` tables quantized weight-only, per row, at ``embed_bits``;
  '' = embeddings stay float), ``attention`` (regex of the attention
  modules whose ``q . k^T`` and ``probs . v`` operands are quantized at
  ``attention_bits`` with the range method ``attention_range``, '' = the
  activations'; '' = float), ``keep_float`` (regex of
  layers left float), ``on_unused`` (what a rule matching no layer does)
  and ``recompute`` ('auto', 'always', 'never': whether layers re-quantize
  their operands in the backward pass instead of keeping the quantized
  copies, see ``fracq.TensorSpec``; 'auto': float32 models do).
* ``config.quant.budget``: ``kind`` ('size' or 'bitops') and exactly one of
  ``uniform_bits``, ``compression``, ``absolute`` (FracBits and HAWQ).
* ``config.quant.preserve``: pruning / clustering kept through training, on
  top of any method but F8Net (``mode`` '' is off).

The keys of the former flat layout (``config.quant.weight_bits``, ...) are
refused with the key that replaced them (:func:`moved_key`).
"""

from __future__ import annotations

import difflib

import ml_collections
from flax import nnx
from ml_collections import config_dict

from fracq import data as data_lib
from fracq.methods import cost as cost_lib
from fracq.methods.context import Context
from fracq.methods.preserve import factory as preserve_factory
from fracq.nnx.training import loop_model
from fracq.train import checkpoint as ckpt_lib
from fracq.train import registry


def _layers_defaults() -> dict:
  return dict(
    fixed='',
    fixed_bits=8,
    fixed_act_bits=8,
    embed='',
    embed_bits=8,
    attention='',
    attention_bits=8,
    attention_range='',
    keep_float='',
    on_unused='error',
    recompute='auto',
  )


def _budget_defaults() -> dict:
  return dict(
    kind='size',
    uniform_bits=config_dict.placeholder(float),
    compression=config_dict.placeholder(float),
    absolute=config_dict.placeholder(float),
  )


def method_blocks() -> dict[str, dict]:
  """``{method: its block's defaults}`` for the methods that have one."""
  out = {}
  for name, method in registry.METHODS.items():
    fields = registry.block_defaults(method.factory)
    if fields:
      out[name] = fields
  return out


def default_quant_config(method: str = 'none') -> ml_collections.ConfigDict:
  """The ``config.quant`` block: ``method`` and every block, with defaults."""
  registry.get(method)
  c = ml_collections.ConfigDict()
  c.method = method
  c.layers = _layers_defaults()
  c.budget = _budget_defaults()
  for name, fields in method_blocks().items():
    c[name] = fields
  c.preserve = registry.block_defaults(preserve_factory.preserve_transform)
  return c


_QUANTIZERS = ('uniform', 'fracbits', 'hawq')

# The former flat layout: key -> its place under config.quant now (a tuple
# when several method blocks hold the field).
OLD_KEYS: dict[str, str | tuple[str, ...]] = {
  'weight_bits': ('uniform.weight_bits', 'fracbits.weight_bits'),
  'act_bits': tuple(f'{m}.act_bits' for m in _QUANTIZERS),
  'quantize_acts': tuple(f'{m}.quantize_acts' for m in _QUANTIZERS),
  'weight_range': tuple(f'{m}.weight_range' for m in _QUANTIZERS),
  'act_range': tuple(f'{m}.act_range' for m in _QUANTIZERS),
  'weight_granularity': tuple(f'{m}.weight_granularity' for m in _QUANTIZERS),
  'act_granularity': tuple(f'{m}.act_granularity' for m in _QUANTIZERS),
  **{
    key: f'fracbits.{key}'
    for key in (
      'init_bits',
      'learn_weight_bits',
      'learn_act_bits',
      'weight_bit_bounds',
      'act_bit_bounds',
      'bits_per_channel',
      'penalty',
      'penalty_weight',
      'penalty_unit',
      'penalty_power',
      'penalty_warmup_steps',
      'penalty_schedule_steps',
      'hard_assign_fraction',
      'hard_assign_step',
      'hard_assign_tolerance',
    )
  },
  'fixed_layers': 'layers.fixed',
  'fixed_bits': 'layers.fixed_bits',
  'fixed_act_bits': 'layers.fixed_act_bits',
  'keep_float': 'layers.keep_float',
  'on_unused': 'layers.on_unused',
  'budget_kind': 'budget.kind',
  'budget_uniform_bits': 'budget.uniform_bits',
  'budget_compression': 'budget.compression',
  'budget_absolute': 'budget.absolute',
  'hawq_candidates': 'hawq.candidates',
  'hawq_probes': 'hawq.probes',
  'hawq_batches': 'hawq.batches',
  **{
    f'f8_{key}': f'f8net.{key}'
    for key in (
      'weight_format',
      'act_format',
      'weight_granularity',
      'momentum',
      'weight_fl_range',
      'fold_bn',
      'pact',
      'pact_init',
    )
  },
  # config.quant.preserve itself is now a block: its mode is preserve.mode.
  'preserve_layers': 'preserve.layers',
  **{
    key: f'preserve.{key}'
    for key in (
      'sparsity',
      'prune_structure',
      'prune_schedule',
      'prune_initial_sparsity',
      'prune_begin_step',
      'prune_end_step',
      'prune_frequency',
      'clusters',
      'cluster_grad',
      'cluster_init',
      'cluster_per_channel',
      'cluster_min_bits',
    )
  },
}


def moved_key(key: str, method: str | None = None) -> str | None:
  """The message for an old flat ``config.quant.<key>``, or ``None``.

  ``key`` is the field under ``config.quant`` (``'penalty_weight'``); with
  ``method``, a field several methods have names that method's block.
  """
  places = OLD_KEYS.get(key)
  if places is None:
    return None
  if isinstance(places, str):
    places = (places,)
  mine = [p for p in places if p.split('.')[0] == method]
  new = ' or '.join(f'config.quant.{p}' for p in (mine or places))
  return (
    f'config.quant.{key} moved to {new} (config.quant holds one block '
    'per method plus the shared layers, budget and preserve blocks; see '
    'the README, "Config fields").'
  )


def _check_block(name: str, block, defaults: dict) -> None:
  if not isinstance(block, ml_collections.ConfigDict):
    hint = ''
    if name == 'preserve':
      hint = " (config.quant.preserve='prune' is now preserve.mode='prune')"
    raise ValueError(
      f'config.quant.{name} must be a block of fields, got {block!r}{hint}.'
    )
  for key in block.keys():
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
      hint = (
        f'did you mean {" or ".join(close)}?'
        if close
        else f'its fields are: {", ".join(sorted(defaults))}.'
      )
      raise ValueError(f'config.quant.{name}.{key} is unknown; {hint}')


def check_layout(quant) -> None:
  """Clear errors for keys ``config.quant`` does not have: an unknown
  method, an old flat key, a block set to a value, an unknown field of a
  block.

  Raises:
    ValueError: naming the key and how to fix it.
  """
  registry.get(quant.method)
  blocks = {
    'layers': _layers_defaults(),
    'budget': _budget_defaults(),
    'preserve': registry.block_defaults(preserve_factory.preserve_transform),
    **method_blocks(),
  }
  for key in quant.keys():
    if key == 'method':
      continue
    if key in blocks:
      _check_block(key, quant[key], blocks[key])
      continue
    message = moved_key(key, quant.method)
    if message:
      raise ValueError(message)
    raise ValueError(
      f'config.quant.{key} is unknown; config.quant holds method and the '
      f'blocks {", ".join(blocks)}.'
    )


def check(quant) -> None:
  """:func:`check_layout`, then the values: bad preservation fields, a
  preserve mode the method does not take, a missing or doubled budget.

  Raises:
    ValueError: naming the key and how to fix it.
  """
  check_layout(quant)
  method = registry.get(quant.method)
  preserve_factory.check_preserve(**quant.preserve)
  if quant.preserve.mode and not method.preserve:
    raise ValueError(
      f'config.quant.preserve.mode={quant.preserve.mode!r} does not apply to '
      f"method={quant.method!r}; set it to '' or choose uniform, fracbits or "
      'none.'
    )
  if method.uses_budget:
    budget_from_config(quant)


def is_float(quant) -> bool:
  """The run trains the plain float model (no quantization, no pruning or
  clustering)."""
  return not registry.get(quant.method).quantized and not quant.preserve.mode


def budget_from_config(quant) -> cost_lib.Budget | None:
  """The budget of ``config.quant.budget`` for the methods that use one."""
  if not registry.get(quant.method).uses_budget:
    return None
  b = quant.budget
  forms = {
    'uniform_bits': b.uniform_bits,
    'compression': b.compression,
    'absolute': b.absolute,
  }
  given = {k: v for k, v in forms.items() if v is not None}
  if len(given) != 1:
    raise ValueError(
      f'method={quant.method!r} needs exactly one of '
      'config.quant.budget.uniform_bits, .compression, .absolute '
      f'(got {given or "none"}).'
    )
  return cost_lib.Budget(kind=b.kind, **given)


# config.quant.layers.recompute -> Context.recompute (TensorSpec.recompute).
RECOMPUTE = {'auto': None, 'always': True, 'never': False}


def context_from_config(
  quant, total_steps: int | None = None, float_model=None
) -> Context:
  """The :class:`~fracq.methods.context.Context` of ``config.quant``."""
  layers, preserve = quant.layers, quant.preserve
  if layers.recompute not in RECOMPUTE:
    raise ValueError(
      f'config.quant.layers.recompute={layers.recompute!r}: one of '
      f'{tuple(RECOMPUTE)} (re-quantize the quantized operands in the '
      'backward pass: always, never, or for float32 models only).'
    )
  transform = preserve_factory.preserve_transform(
    total_steps=total_steps, **preserve.to_dict()
  )
  min_bits = 0.0
  if 'cluster' in preserve.mode and preserve.cluster_min_bits:
    min_bits = preserve_factory.min_bits_for(preserve.clusters)
  return Context(
    fixed_layers=layers.fixed,
    fixed_bits=int(layers.fixed_bits),
    fixed_act_bits=int(layers.fixed_act_bits),
    embed_layers=layers.embed,
    embed_bits=int(layers.embed_bits),
    attention_layers=layers.attention,
    attention_bits=int(layers.attention_bits),
    attention_range=layers.attention_range,
    keep_float=layers.keep_float,
    on_unused=layers.on_unused,
    recompute=RECOMPUTE[layers.recompute],
    budget_kind=quant.budget.kind,
    budget=budget_from_config(quant),
    kernel_transform=transform,
    min_weight_bits=min_bits,
    total_steps=total_steps,
    float_model=float_model,
  )


def build(quant, module, sample_x, total_steps=None, float_model=None):
  """The model wrapper of ``config.quant``: the method's factory called
  with its block as keyword arguments.

  Args:
    quant: the ``config.quant`` block.
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    total_steps: training steps (FracBits' hard assignment, gradual
      pruning).
    float_model: ``num_batches -> (float variables, batches)`` for HAWQ.
  """
  check(quant)
  method = registry.get(quant.method)
  context = context_from_config(quant, total_steps, float_model)
  block = quant[quant.method].to_dict() if quant.method in quant else {}
  return method.factory(module, sample_x, context=context, **block)


def build_model_wrapper(config, module, sample_x, total_steps=None):
  """The model wrapper of ``config``: ``PlainModel`` for a float run, else
  the method's wrapper; HAWQ searches on ``config.init_from``'s variables
  and training batches. An ``nnx.Module`` (``config.model_api='nnx'``):
  the method's wrapper of its linen twin drives the NNX model
  (:func:`fracq.nnx.training.loop_model`)."""

  def float_model(num_batches):
    variables = ckpt_lib.load_variables(
      config.init_from, config.init_collections
    )
    it = data_lib.train_iterator(config, 0)
    return variables, [next(it) for _ in range(num_batches)]

  linen_module = module
  if isinstance(module, nnx.Module):
    linen_module = module.linen_module()
  wrapper = build(
    config.quant,
    linen_module,
    sample_x,
    total_steps=total_steps,
    float_model=float_model if config.init_from else None,
  )
  if linen_module is module:
    return wrapper
  return loop_model(module, wrapper, sample_x)
