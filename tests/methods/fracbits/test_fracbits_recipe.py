"""FracBits configs set the paper's recipe: initial bits, penalty units,
fixed layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_fracbits
from configs import inception_v3_fracbits
from configs import mobilenet_v2_fracbits
from configs import resnet18_fracbits
from configs import resnet50_fracbits
from fracq import models
from fracq.methods import cost as cost_lib
from fracq.methods.fracbits import factory as fracbits_factory
from fracq.train import quant_config as methods_config


def _wrap(cfg, size, channels=3):
  module = models.get_model(cfg.model, num_classes=cfg.num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return methods_config.build(cfg.quant, module, x, total_steps=100)


def _size_equivalent_bits(qm, target):
  """Closed form for a size budget: target = 8 * fixed + k * learned."""
  fixed = sum(
    layer.numel * layer.weight.fixed
    for layer in qm.cost_model.layers
    if not layer.weight.learned
  )
  learned = sum(
    layer.numel for layer in qm.cost_model.layers if layer.weight.learned
  )
  return (target - fixed) / learned


def _learned_weight_bits(qm):
  return {
    r.weight.bits
    for r in qm.rules
    if r.weight is not None and r.weight.learn_bits
  }


@pytest.mark.parametrize(
  'config_module,expected_equivalent',
  [(resnet50_fracbits, 5.0993), (mobilenet_v2_fracbits, 3.7729)],
)
def test_imagenet_configs_start_at_budget_equivalent_plus_half(
  config_module, expected_equivalent
):
  cfg = config_module.get_config()
  qm = _wrap(cfg, 32)  # model size does not depend on the input size
  numel_all = sum(layer.numel for layer in qm.cost_model.layers)
  target = 8.0 * numel_all / 1.5  # 1.5x over INT8
  assert qm.target == pytest.approx(target, rel=1e-9)
  equivalent = _size_equivalent_bits(qm, target)
  assert equivalent == pytest.approx(expected_equivalent, abs=1e-3)
  info = qm.init_bits_info
  assert info['uniform_equivalent_bits'] == pytest.approx(equivalent, abs=1e-6)
  (start,) = _learned_weight_bits(qm)
  assert start == pytest.approx(equivalent + 0.5, abs=1e-3)
  assert info['init_bits'] == start


def test_bitops_config_starts_weights_and_acts_at_k_plus_half():
  qm = _wrap(resnet18_fracbits.get_config('bits=3'), 32)
  (start,) = _learned_weight_bits(qm)
  act_starts = {
    r.act.bits for r in qm.rules if r.act is not None and r.act.learn_bits
  }
  assert start == pytest.approx(3.5, abs=1e-6)
  assert act_starts == {start}


@pytest.mark.parametrize(
  'arg,bits', [('', 3.0), ('bits=4', 4.0), ('bitops', 3.0)]
)
def test_digits_configs_start_at_budget_equivalent_plus_half(arg, bits):
  qm = _wrap(digits_fracbits.get_config(arg), 8, channels=1)
  assert _learned_weight_bits(qm) == {bits + 0.5}
  assert qm.init_bits_info['uniform_equivalent_bits'] == pytest.approx(
    bits, abs=1e-9
  )


def test_digits_bitops_variables_start_at_budget_equivalent_plus_half():
  cfg = digits_fracbits.get_config('bitops')
  module = models.get_model(cfg.model, num_classes=cfg.num_classes)
  x = jnp.zeros((1, 8, 8, 1), jnp.float32)
  qm = methods_config.build(cfg.quant, module, x, total_steps=100)
  variables = qm.init(jax.random.key(0), x)
  leaves = jax.tree_util.tree_leaves_with_path(variables['quant'])
  learned = {
    '/'.join(k.key for k in path): float(v)
    for path, v in leaves
    if path[-1].key in ('kernel_bits', 'input_bits')
  }
  n_learned = sum(layer.weight.learned for layer in qm.cost_model.layers)
  kernel_bits = [k for k in learned if k.endswith('kernel_bits')]
  input_bits = [k for k in learned if k.endswith('input_bits')]
  assert len(kernel_bits) == n_learned > 0 and input_bits
  np.testing.assert_allclose(list(learned.values()), 3.5, atol=1e-6)


def test_init_bits_clipped_to_bounds_and_bad_spec_rejected():
  cfg = digits_fracbits.get_config('bits=7.8')
  module = models.get_model(cfg.model, num_classes=cfg.num_classes)
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  qm = methods_config.build(cfg.quant, module, x, total_steps=100)
  assert _learned_weight_bits(qm) == {8.0}
  assert qm.init_bits_info['uniform_equivalent_bits'] == pytest.approx(7.8)
  # weight_bits is unused with init_bits='budget+D', even outside bounds.
  cfg = digits_fracbits.get_config()
  cfg.quant.fracbits.weight_bits = 8.0
  cfg.quant.fracbits.weight_bit_bounds = (2.0, 6.0)
  qm = methods_config.build(cfg.quant, module, x, total_steps=100)
  assert _learned_weight_bits(qm) == {3.5}
  cfg.quant.fracbits.init_bits = 'target+0.5'
  with pytest.raises(ValueError, match="'budget\\+D'"):
    methods_config.build(cfg.quant, module, x, total_steps=100)
  assert fracbits_factory.init_bits_offset('budget-0.25') == -0.25


def test_uniform_equivalent_of_bitops_with_learned_acts():
  # uniform_cost(k) = 8*8*100 + k*k*50 for one fixed and one learned layer.
  learned = cost_lib.TensorBits()
  fixed = cost_lib.TensorBits(fixed=8.0, bounds=(8.0, 8.0))
  layers = [
    cost_lib.LayerCost('a', 1, 100, 1, fixed, fixed),
    cost_lib.LayerCost('b', 1, 50, 1, learned, learned),
  ]
  model = cost_lib.CostModel(layers, 'bitops')
  target = 6400 + 50 * 3.3**2
  assert model.uniform_equivalent_bits(target) == (pytest.approx(3.3, abs=1e-9))


IMAGENET = [
  (resnet50_fracbits, None, 'size'),
  (mobilenet_v2_fracbits, None, 'size'),
  (mobilenet_v2_fracbits, 'dataset=cifar100', 'size'),
  (inception_v3_fracbits, None, 'size'),
  (resnet18_fracbits, None, 'bitops'),
]


@pytest.mark.parametrize('config_module,arg,kind', IMAGENET)
def test_imagenet_penalty_in_paper_units(config_module, arg, kind):
  q = config_module.get_config(arg).quant
  assert q.budget.kind == kind
  fb = q.fracbits
  assert fb.penalty == 'abs' and fb.penalty_weight == 1.0
  assert fb.penalty_unit == {'size': 8e6, 'bitops': 1e9}[kind]
  assert fb.init_bits == 'budget+0.5'


def test_penalty_gradient_is_kappa_per_megabyte_and_per_gigabitop():
  learned = cost_lib.TensorBits()
  fixed8 = cost_lib.TensorBits(fixed=8.0, bounds=(8.0, 8.0))
  layers = [
    cost_lib.LayerCost('small', 2_000_000, 300_000_000, 8, learned, fixed8),
    cost_lib.LayerCost('big', 8_000_000, 500_000_000, 8, learned, fixed8),
  ]
  quant = {
    'small': {'kernel_bits': jnp.asarray(5.0)},
    'big': {'kernel_bits': jnp.asarray(5.0)},
  }
  for kind, config_module in (
    ('size', resnet50_fracbits),
    ('bitops', resnet18_fracbits),
  ):
    penalty = fracbits_factory.make_penalty(
      **config_module.get_config().quant.fracbits
    )
    model = cost_lib.CostModel(layers, kind)
    target = 0.5 * float(model.cost(quant))  # over budget: slope +kappa
    grads = jax.grad(lambda q: penalty(model.cost(q), target))(quant)
    if kind == 'size':
      # kappa = 1 per MB: d/db = numel bits / 8e6 bits per MB.
      expected = {'small': 2e6 / 8e6, 'big': 8e6 / 8e6}
    else:
      # kappa = 1 per GBitOPs: d/db_w = MACs * b_a / 1e9.
      expected = {'small': 3e8 * 8 / 1e9, 'big': 5e8 * 8 / 1e9}
    for name, value in expected.items():
      assert float(grads[name]['kernel_bits']) == pytest.approx(value, rel=1e-6)


def test_inception_aux_head_fixed_at_8_bits():
  cfg = inception_v3_fracbits.get_config()
  qm = _wrap(cfg, 299)  # shape-only trace; the aux head needs 17x17 maps
  aux = {
    layer.path: layer
    for layer in qm.cost_model.layers
    if layer.path.startswith('AuxLogits/')
  }
  assert set(aux) == {
    'AuxLogits/conv0/conv',
    'AuxLogits/conv1/conv',
    'AuxLogits/fc',
  }
  for layer in aux.values():
    assert not layer.weight.learned and layer.weight.fixed == 8.0
  fixed_rule = qm.rules[[r.name for r in qm.rules].index('fixed')]
  for path in aux:
    assert qm.facts[path].rule_index == qm.rules.index(fixed_rule)
  # Everything else but the stem conv and the classifier learns its bits.
  fixed = {
    layer.path for layer in qm.cost_model.layers if not layer.weight.learned
  }
  assert fixed == set(aux) | {'Conv2d_1a_3x3/conv', 'fc'}
