"""config.quant: one block per method, the METHODS registry, old keys."""

import importlib

import pytest

from fracq.methods.preserve import factory as preserve_factory
from fracq.train import quant_config
from fracq.train import registry
from fracq.train import train as tr


def get_config(name, arg='smoke'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def test_every_method_block_is_its_factory_keywords():
  q = quant_config.default_quant_config()
  assert q.method == 'none'
  for name, method in registry.METHODS.items():
    fields = registry.block_defaults(method.factory)
    if fields:
      assert sorted(q[name].keys()) == sorted(fields), name
    else:
      assert name not in q, name
  assert sorted(q.preserve.keys()) == sorted(
    registry.block_defaults(preserve_factory.preserve_transform)
  )
  # A None default stays overridable with a value of its type.
  q.fracbits.penalty_unit = 8e6
  q.budget.uniform_bits = 3.0


def test_unknown_method_lists_the_valid_ones():
  c = get_config('digits_uniform')
  c.quant.method = 'fracbit'
  with pytest.raises(tr.ConfigError, match="'none', 'uniform', 'fracbits'"):
    tr.check_config(c)
  with pytest.raises(ValueError, match="choose one of 'none'"):
    quant_config.default_quant_config('lsq')


@pytest.mark.parametrize(
  'method,key,new',
  [
    ('fracbits', 'penalty_weight', 'config.quant.fracbits.penalty_weight'),
    ('fracbits', 'weight_bits', 'config.quant.fracbits.weight_bits'),
    ('uniform', 'weight_bits', 'config.quant.uniform.weight_bits'),
    ('f8net', 'f8_pact', 'config.quant.f8net.pact'),
    ('hawq', 'hawq_probes', 'config.quant.hawq.probes'),
    ('uniform', 'fixed_layers', 'config.quant.layers.fixed'),
    ('uniform', 'budget_uniform_bits', 'config.quant.budget.uniform_bits'),
    ('none', 'sparsity', 'config.quant.preserve.sparsity'),
  ],
)
def test_old_flat_keys_name_the_new_key(method, key, new):
  q = quant_config.default_quant_config(method)
  q[key] = 1
  with pytest.raises(ValueError, match=f'config.quant.{key} moved to {new}'):
    quant_config.check(q)


def test_every_old_key_points_at_a_field():
  q = quant_config.default_quant_config()
  for new in quant_config.OLD_KEYS.values():
    for place in new if isinstance(new, tuple) else (new,):
      block, field = place.split('.')
      assert field in q[block], place
  assert len(quant_config.OLD_KEYS) + 1 == 56  # + preserve (now a block)


def test_block_errors_are_clear():
  q = quant_config.default_quant_config('fracbits')
  q.budget.uniform_bits = 3.0
  q.fracbits.penalty_wieght = 2.0
  with pytest.raises(ValueError, match='did you mean penalty_weight'):
    quant_config.check(q)
  q = get_config('digits_f8net').quant
  q.preserve.mode = 'prune'
  with pytest.raises(ValueError, match="does not apply to method='f8net'"):
    quant_config.check(q)
  q = get_config('digits_fracbits').quant
  q.budget.compression = 2.0
  with pytest.raises(ValueError, match='exactly one of'):
    quant_config.check(q)


def test_configs_build_their_method_blocks():
  q = get_config('digits_fracbits', 'bitops').quant
  assert q.method == 'fracbits' and q.budget.kind == 'bitops'
  assert q.fracbits.learn_act_bits and q.fracbits.init_bits == 'budget+0.5'
  assert q.layers.fixed
  q = get_config('digits_pcqat', 'smoke,quant=fracbits').quant
  assert q.preserve.mode == 'prune_cluster'
  assert q.fracbits.weight_granularity == 'tensor'
  for name in ('digits_float', 'digits_uniform', 'digits_hawq', 'digits_f8net'):
    quant_config.check(get_config(name).quant)


@pytest.mark.parametrize('method', ['uniform', 'fracbits'])
def test_group_wise_kernels_from_the_method_block(method):
  import jax.numpy as jnp

  from fracq import models

  c = get_config(f'digits_{method}')
  block = c.quant[method]
  block.weight_granularity = 'group'
  block.weight_group_size = 16
  module = models.get_model(c.model, num_classes=10)
  qm = quant_config.build(
    c.quant, module, jnp.zeros((1, 8, 8, 1)), total_steps=10
  )
  grouped = {
    path: spec.group_size
    for path, facts in qm.facts.items()
    for spec in [qm.rules[facts.rule_index].weight]
    if spec is not None and spec.granularity == 'group'
  }
  assert grouped and set(grouped.values()) == {16}, grouped
  block.weight_granularity = 'channel'
  with pytest.raises(ValueError, match='group_size'):
    quant_config.build(c.quant, module, jnp.zeros((1, 8, 8, 1)), total_steps=10)


@pytest.mark.parametrize(
  'setting, expected', [('auto', None), ('always', True), ('never', False)]
)
def test_recompute_from_the_layers_block(setting, expected):
  import jax.numpy as jnp

  from fracq import models

  c = get_config('digits_fracbits')
  c.quant.layers.recompute = setting
  module = models.get_model(c.model, num_classes=10)
  qm = quant_config.build(
    c.quant, module, jnp.zeros((1, 8, 8, 1)), total_steps=10
  )
  specs = [
    spec
    for rule in qm.rules
    for spec in (rule.weight, rule.act)
    if spec is not None
  ]
  assert specs and {spec.recompute for spec in specs} == {expected}


def test_recompute_setting_names_its_values():
  import jax.numpy as jnp

  from fracq import models

  c = get_config('digits_uniform')
  c.quant.layers.recompute = 'sometimes'
  module = models.get_model(c.model, num_classes=10)
  with pytest.raises(ValueError, match="'auto', 'always', 'never'"):
    quant_config.build(c.quant, module, jnp.zeros((1, 8, 8, 1)), total_steps=10)
