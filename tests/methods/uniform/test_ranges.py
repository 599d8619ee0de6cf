"""The range-estimator and quantizer registries (fracq.methods.uniform)."""

import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq.methods import quantizers
from fracq.methods.common import QuantTensor
from fracq.methods.uniform import ranges


def test_registry_lists_every_range_method():
  assert set(ranges.names()) == {
    'minmax',
    'ema_minmax',
    'percentile',
    'lsq',
    'lsq_plus',
    'pact',
    'dorefa',
  }
  # A spec accepts exactly the registered estimators.
  for name in ranges.names():
    spec = fracq.TensorSpec(range_method=name, symmetric=name != 'lsq_plus')
    spec.validate('spec', tensor='act' if name == 'pact' else 'weight')
  with pytest.raises(ValueError, match=r"unknown range_method='lsq2'.*'pact'"):
    fracq.TensorSpec(range_method='lsq2').validate('spec')
  for name in ranges.names():
    estimator = ranges.get(name)
    assert estimator.name == name
    assert estimator.collection in ('quant', 'quant_stats')


def test_unknown_range_method_errors_clearly():
  with pytest.raises(ValueError, match=r"unknown range_method='lsq2'.*'lsq'"):
    ranges.get('lsq2')


def test_register_refuses_a_taken_name():
  with pytest.raises(ValueError, match='already registered'):
    ranges.register('lsq')(ranges.lsq)


def test_quantizer_for_spec():
  assert quantizers.for_spec(fracq.TensorSpec(bits=4)).name == 'uniform'
  spec = fracq.FracBitsSpec(bits=4)
  assert quantizers.for_spec(spec).name == 'fracbits'


@pytest.mark.parametrize('name', ['minmax', 'ema_minmax', 'percentile'])
def test_observer_state_is_the_core_observers(name):
  """An observer's initial range is the batch range (percentiles: the
  spec's), from fracq.core.observers."""
  x = jnp.arange(-50.0, 51.0).reshape(101, 1)
  spec = fracq.TensorSpec(bits=8, range_method=name, percentile=99.0)
  tensor = QuantTensor('input', spec, True, -1)
  state = ranges.get(name).init(tensor, x)
  expected = (-49.0, 49.0) if name == 'percentile' else (-50.0, 50.0)
  np.testing.assert_allclose((state.min, state.max), expected)
  if name == 'ema_minmax':
    state = ranges.get(name).update(tensor, 2 * x, state)
    np.testing.assert_allclose(state.max, 0.99 * 50 + 0.01 * 100)
