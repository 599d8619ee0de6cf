"""HAWQ on NNX models: the Hessian search picks linen's bits for the same
weights, and the model is then quantized by uniform QAT at those bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fracq
import fracq.nnx as fnnx
from fracq import Budget
from fracq import Rule
from fracq import FracBitsSpec
from fracq import TensorSpec
from fracq.data import digits
from fracq.methods import hawq as hawq_lib
from fracq.models.digits_cnn import DigitsCNN as LinenDigitsCNN
from fracq.nnx.models import DigitsCNN
from fracq.nnx.models import load_linen_variables

WIDTHS = (8, 8, 8, 8, 8)
RULES = [
  fracq.fixed_bits(r'^conv_init$|^head$', bits=8),
  Rule(
    weight=FracBitsSpec(bits=5.0, bit_bounds=(2.0, 8.0), granularity='channel'),
    act=TensorSpec(bits=8),
  ),
]
CANDIDATES = (2, 3, 4, 8)


def test_hawq_bits_equal_linen():
  xtr, ytr, _, _ = digits.load_digits_split()
  batches = [{'image': jnp.asarray(xtr[:32]), 'label': jnp.asarray(ytr[:32])}]
  x = batches[0]['image']
  budget = Budget(kind='size', uniform_bits=3)
  module = LinenDigitsCNN(widths=WIDTHS)
  lv = module.init(jax.random.key(0), x, train=False)
  probe = fracq.quantize(
    module, RULES, x, budget=budget, call_kwargs={'train': False}
  )
  lbits, linfo = hawq_lib.search(
    module,
    lv,
    probe.facts,
    probe.rules,
    probe.target,
    'size',
    batches,
    candidates=CANDIDATES,
    num_probes=4,
  )
  model = DigitsCNN(widths=WIDTHS, rngs=nnx.Rngs(1))
  load_linen_variables(model, lv)
  before = nnx.state(model, nnx.Param).to_pure_dict()
  qmodel, bits, info = fnnx.hawq(
    model,
    RULES,
    x,
    batches,
    budget=budget,
    candidates=CANDIDATES,
    num_probes=4,
  )
  assert bits == lbits
  assert len(set(bits.values())) > 1  # a real mixed-precision choice
  for layer in bits:
    assert info['traces'][layer]['avg_trace'] == pytest.approx(
      linfo['traces'][layer]['avg_trace'], rel=1e-4
    )
  # Uniform QAT at the chosen bits: fixed integer kernel bits per layer.
  rules = {f.path: f.rule for f in qmodel.facts.values()}
  for layer, b in bits.items():
    assert rules[layer] == f'hawq_{b}b'
  assert not qmodel.learns_bits
  # The float model is left as it was.
  after = nnx.state(model, nnx.Param).to_pure_dict()
  for a, e in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, e)
  with pytest.raises(ValueError, match='nothing for HAWQ to search'):
    fnnx.hawq(
      model,
      RULES[:1] + [Rule(weight=TensorSpec(bits=4))],
      x,
      batches,
      budget=budget,
    )
