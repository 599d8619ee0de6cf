"""The uniform-QAT lowering's input check (fracq.methods.uniform.lowering)."""

import types

import pytest

import fracq
from fracq.methods.uniform import lowering


def _model_with_input_spec(act):
  rules = (fracq.Rule(weight=fracq.TensorSpec(bits=4), act=act),)
  facts = {'fc': types.SimpleNamespace(rule_index=0)}
  return types.SimpleNamespace(rules=rules, facts=facts, hard=False)


@pytest.mark.parametrize(
  'act',
  [
    None,
    fracq.TensorSpec(bits=8, granularity='channel'),
    fracq.FracBitsSpec(bits=6.5),  # learned bits, not hard-assigned
  ],
)
def test_inputs_without_a_fixed_per_tensor_grid_are_refused(act):
  # Refused from the spec alone (zero points and offsets, e.g. LSQ+, once
  # frozen: tests/export/test_qat_graph_lowering.py).
  structure = types.SimpleNamespace(order=['fc'])
  with pytest.raises(ValueError, match='fc: integer-only inference needs'):
    lowering.input_quantization(_model_with_input_spec(act), {}, structure)
