"""Integer programs and ONNX from NNX models (through the linen twin):
the program equals the NNX model's own fake quantization and onnxruntime
agrees with both, for uniform QAT and hard-assigned FracBits (FracBits is
also exported by the quickstart, test_nnx_quickstart.py, after training)."""

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
from fracq import export
from fracq.core import integer as ints
from fracq.data import digits
from fracq.export import onnx_export as ox
from fracq.models.digits_cnn import DigitsCNN as LinenDigitsCNN
from fracq.nnx.models import DigitsCNN
from tests.nnx import nnx_helpers as helpers

WIDTHS = (8, 8, 8, 8, 8)

RULES = {
  'uniform': [
    fracq.fixed_bits(r'^conv_init$|^head$', bits=8),
    Rule(
      weight=TensorSpec(bits=4, granularity='channel'), act=TensorSpec(bits=8)
    ),
  ],
  'fracbits': [
    fracq.fixed_bits(r'^conv_init$|^head$', bits=8),
    Rule(
      weight=FracBitsSpec(bits=3.5, granularity='channel'),
      act=TensorSpec(bits=8),
    ),
  ],
}


@pytest.fixture(scope='module')
def test_images():
  _, _, xte, _ = digits.load_digits_split()
  return jnp.asarray(xte)


@pytest.fixture(scope='module', params=['uniform', 'fracbits'])
def quantized(request, test_images):
  """The NNX digits CNN quantized by the method, calibrated on digits (and
  for FracBits, its spread learned bits hard-assigned)."""
  model = DigitsCNN(widths=WIDTHS, rngs=nnx.Rngs(0))
  model.eval()
  x = test_images[:64]
  budget = Budget(kind='size', uniform_bits=3)
  if request.param == 'uniform':
    budget = None
  qmodel = fnnx.quantize(model, RULES[request.param], x, budget=budget)
  qmodel.calibrate(x)
  if request.param == 'fracbits':
    quant = qmodel.variables('quant')
    for i, name in enumerate(['conv1', 'conv2', 'conv3', 'conv4']):
      quant[name]['kernel_bits'] = quant[name]['kernel_bits'] + 0.6 * (i - 1.5)
    qmodel._write('quant', quant)
    assert qmodel.hard_assign() is not None
  return request.param, qmodel


def test_integer_program_and_onnx_equal_nnx_fake_quant(
  quantized, test_images, tmp_path
):
  method, qmodel = quantized
  x = test_images
  wrapper, variables = fnnx.to_linen(qmodel, x[:64])
  assert wrapper.hard == (method == 'fracbits')
  program = export.lower(wrapper, variables, x)
  ints.assert_integer_only(program, program.quantize_input(x))
  # The reference: the NNX model's own fake quantization (not the twin's).
  qmodel.eval()
  sim = np.asarray(qmodel(x))
  got = np.asarray(program.logits(x))
  np.testing.assert_array_equal(got.argmax(1), sim.argmax(1))
  rel = np.abs(got - sim).max(axis=1) / np.ptp(sim)
  assert np.mean(rel < 1e-5) >= 0.8 and rel.max() < 3e-3, np.sort(rel)[-10:]
  frozen = export.freeze(wrapper, variables)
  bits = {path: int(np.max(f.bits)) for path, f in frozen.items()}
  assert bits['conv_init'] == bits['head'] == 8
  if method == 'fracbits':
    hard = qmodel.variables('quant_stats')
    for name in ('conv1', 'conv2', 'conv3', 'conv4'):
      np.testing.assert_array_equal(
        frozen[name].bits.reshape(-1), hard[name]['kernel_hard_bits'].ravel()
      )
    assert min(bits.values()) < 4
  else:
    assert bits['conv1'] == 4
  pytest.importorskip('onnxruntime')
  path = str(tmp_path / f'{method}.onnx')
  rep = ox.export_onnx(wrapper, variables, x, path, program=program)
  assert rep['onnx_prediction_match'] == 1.0
  assert rep['onnx_max_logit_diff_rel'] < 1e-3
  np.testing.assert_array_equal(ox.run_onnx(path, x).argmax(1), sim.argmax(1))


@pytest.mark.parametrize('quantized', ['uniform'], indirect=True)
def test_twin_mismatches_are_refused(quantized, test_images):
  _, qmodel = quantized
  x = test_images[:16]
  with pytest.raises(ValueError, match='other layers'):
    fnnx.to_linen(qmodel, x, LinenDigitsCNN(widths=(8, 8, 8, 8, 16)))
  # Same layers, another function: BatchNorm's epsilon differs.
  twin = LinenDigitsCNN(widths=WIDTHS, bn_epsilon=0.5)
  with pytest.raises(ValueError, match='computes something else'):
    fnnx.to_linen(qmodel, x, twin)
  model = helpers.NNXMLP(nnx.Rngs(0))
  mlp = fnnx.quantize(model, RULES['uniform'][1:], jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='names no linen twin'):
    fnnx.to_linen(mlp, jnp.ones((2, 4)))
  with pytest.raises(TypeError, match='QATModule'):
    fnnx.to_linen(model, jnp.ones((2, 4)))
