"""FracBits' rule spec: an extension of the fixed-bit TensorSpec."""

import dataclasses

import pytest

import fracq
from fracq import interception


def test_fracbits_spec_extends_the_fixed_bit_spec():
  spec = fracq.FracBitsSpec(
    bits=3.5, bit_bounds=(1.0, 6.0), range_method='pact'
  )
  assert isinstance(spec, fracq.TensorSpec)
  assert spec.learn_bits and not fracq.TensorSpec().learn_bits
  assert (spec.quantizer, fracq.TensorSpec.quantizer) == ('fracbits', 'uniform')
  # Equal common fields do not make a learned spec equal to a fixed one.
  assert spec != fracq.TensorSpec(bits=3.5, range_method='pact')


def test_old_learn_bits_spelling_names_the_new_spec():
  with pytest.raises(ValueError, match=r'learn_bits moved.*fracq.FracBitsSpec'):
    fracq.TensorSpec(bits=3.5, learn_bits=True)
  with pytest.raises(ValueError, match=r'bit_bounds.*fracq.FracBitsSpec'):
    fracq.TensorSpec(bits=4, bit_bounds=(2.0, 8.0))
  with pytest.raises(ValueError, match='drop learn_bits'):
    fracq.FracBitsSpec(bits=3.5, learn_bits=True)
  spec = fracq.TensorSpec(bits=4)
  with pytest.raises(ValueError, match='learn_bits moved'):
    dataclasses.replace(spec, learn_bits=False)


def test_fixed_keeps_the_common_fields_and_drops_learned_ones():
  spec = fracq.FracBitsSpec(
    bits=3.5,
    bit_bounds=(0.0, 6.0),
    bits_per_channel=True,
    range_method='minmax',
    granularity='channel',
  )
  assert spec.fixed(8) == fracq.TensorSpec(
    bits=8, range_method='minmax', granularity='channel'
  )
  rule = fracq.fixed_bits('fc', 4, weight_spec=spec, act_spec=spec)
  assert type(rule.weight) is fracq.TensorSpec and rule.weight.bits == 4
  assert type(rule.act) is fracq.TensorSpec and rule.act.bits == 8


def test_grid_of_learned_bits_is_symmetric_for_inputs_too():
  learned = fracq.FracBitsSpec(bits=4.5)
  fixed = fracq.TensorSpec(bits=4)
  # Signed inputs: learned bits drop -8 (narrow), fixed bits keep it.
  assert learned.int_grid(signed=True, is_kernel=False, bits=4) == (-7, 7)
  assert fixed.int_grid(signed=True, is_kernel=False) == (-8, 7)
  assert learned.int_grid(signed=False, is_kernel=False, bits=4) == (0, 15)


@pytest.mark.parametrize(
  'rule, msg',
  [
    (fracq.Rule(weight=fracq.FracBitsSpec(bit_bounds=(3.0, 2.0))), 'b_min'),
    (fracq.Rule(weight=fracq.FracBitsSpec(bits=9.0)), 'outside bit_bounds'),
    (
      fracq.Rule(
        weight=fracq.FracBitsSpec(
          bits_per_channel=True, granularity='group', group_size=4
        )
      ),
      'learn their bits per layer',
    ),
    (
      fracq.Rule(weight=fracq.FracBitsSpec(range_method='lsq_pluss')),
      "unknown range_method='lsq_pluss'",
    ),
    (
      fracq.Rule(weight=fracq.TensorSpec(), act={'bits': 4}),
      "act must be a method's tensor spec",
    ),
  ],
)
def test_invalid_fracbits_rules(rule, msg):
  with pytest.raises(ValueError, match=msg):
    interception.validate_rules([rule])
