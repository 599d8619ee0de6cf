"""The uniform-QAT lowering's input check (fracq.methods.uniform.lowering)."""

import types

import pytest

import fracq
from fracq.methods.uniform import lowering


def _model_with_input_spec(act):
  rules = (fracq.Rule(weight=fracq.TensorSpec(bits=4), act=act),)
  facts = {'fc': types.SimpleNamespace(rule_index=0)}
  return types.SimpleNamespace(rules=rules, facts=facts)


@pytest.mark.parametrize(
  'act',
  [
    None,
    fracq.TensorSpec(bits=8, range_method='minmax'),
    fracq.TensorSpec(bits=8, granularity='channel'),
    fracq.FracBitsSpec(bits=6.5),
  ],
)
def test_inputs_not_at_fixed_per_tensor_lsq_are_refused(act):
  structure = types.SimpleNamespace(order=['fc'])
  with pytest.raises(ValueError, match='fc: integer-only inference needs'):
    lowering.input_quantization(_model_with_input_spec(act), {}, structure)
