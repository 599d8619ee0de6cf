"""Bad input to fracq.nnx.quantize gets clear errors."""

import jax
import pytest
from flax import nnx
import flax.linen as nn

import fracq
import fracq.nnx as fnnx
from fracq import Rule
from fracq import FracBitsSpec
from fracq import TensorSpec
from fracq.methods.f8net import F8NetModel

W4 = TensorSpec(bits=4)


class TwoLayers(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, shared: bool = False):
    self.fc1 = nnx.Linear(4, 4, rngs=rngs)
    self.fc2 = self.fc1 if shared else nnx.Linear(4, 4, rngs=rngs)
    self.adapter = nnx.LoRA(4, 2, 4, rngs=rngs)

  def __call__(self, x):
    return self.adapter(self.fc2(self.fc1(x)))


def _x():
  return jax.random.normal(jax.random.key(0), (2, 4))


def test_rule_matching_nothing():
  model = TwoLayers(nnx.Rngs(0))
  rules = [
    Rule(module_path='^fc', weight=W4),
    Rule(module_path='^conv', weight=W4),
  ]
  with pytest.raises(ValueError, match=r"matched no layer.*'\^conv'.*fc1"):
    fnnx.quantize(model, rules, _x())
  with pytest.warns(UserWarning, match='matched no layer'):
    qmodel = fnnx.quantize(model, rules, _x(), on_unused='warn')
  assert set(qmodel.facts) == {'fc1', 'fc2'}


def test_nnx_type_names_in_rules():
  model = TwoLayers(nnx.Rngs(0))
  rules = [Rule(layer_types=('Linear',), weight=W4)]
  qmodel = fnnx.quantize(model, rules, _x())
  assert {f.layer_type for f in qmodel.facts.values()} == {'Dense'}
  assert all(f.weight_quantized for f in qmodel.facts.values())
  with pytest.raises(ValueError, match='unknown layer_types'):
    fnnx.quantize(model, [Rule(layer_types=('Lora',), weight=W4)], _x())


def test_unsupported_layer_named_by_a_rule():
  model = TwoLayers(nnx.Rngs(0))
  rules = [Rule(module_path='adapter', weight=W4)]
  with pytest.raises(ValueError, match=r"'adapter', a LoRA: not an NNX layer"):
    fnnx.quantize(model, rules, _x())


def test_shared_layer():
  model = TwoLayers(nnx.Rngs(0), shared=True)
  with pytest.raises(ValueError, match=r"'fc1' and 'fc2'"):
    fnnx.quantize(model, [Rule(weight=W4)], _x())


def test_quantized_model_refused():
  qmodel = fnnx.quantize(TwoLayers(nnx.Rngs(0)), [Rule(weight=W4)], _x())
  with pytest.raises(ValueError, match=r"already quantized.*'model/fc1'"):
    fnnx.quantize(qmodel, [Rule(weight=W4)], _x())


def test_linen_module_refused():
  with pytest.raises(TypeError, match='fracq.quantize'):
    fnnx.quantize(nn.Dense(4), [Rule(weight=W4)], _x())


def test_learned_bits_without_budget():
  model = TwoLayers(nnx.Rngs(0))
  rules = [Rule(module_path='^fc', weight=FracBitsSpec(bits=4))]
  with pytest.raises(ValueError, match='no budget'):
    fnnx.quantize(model, rules, _x())
  assert fracq.Budget(uniform_bits=3)  # the fix the message names


def test_f8net_model_refuses_nnx_models():
  """F8NetModel folds BatchNorm through linen's interceptor: an NNX model
  is refused, pointing to fracq.nnx.f8net (F8Net through the linen twin)."""
  model = TwoLayers(nnx.Rngs(0))
  with pytest.raises(TypeError, match=r'nnx.Module use fracq\.nnx\.f8net'):
    F8NetModel(model, _x())
  with pytest.raises(ValueError, match='TwoLayers names no linen twin'):
    fnnx.f8net(model, _x())
