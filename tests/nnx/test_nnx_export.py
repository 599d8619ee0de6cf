"""Integer programs and ONNX from NNX models (through the linen twin):
the program equals the NNX model's own fake quantization and onnxruntime
agrees with both, for the digits CNN under uniform QAT and a ResNet
(residual adds) under uniform QAT and hard-assigned FracBits (FracBits on
the digits CNN is exported by the quickstart, test_nnx_quickstart.py,
after training; F8Net by test_nnx_f8net.py)."""

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
from fracq.nnx.models import ResNet
from tests.nnx import nnx_helpers as helpers

WIDTHS = (8, 8, 8, 8, 8)

# The rule of each method (beside 8 bits for the first and last layers).
RULES = {
  'uniform': Rule(
    weight=TensorSpec(bits=4, granularity='channel'), act=TensorSpec(bits=8)
  ),
  'fracbits': Rule(
    weight=FracBitsSpec(bits=3.5, granularity='channel'),
    act=TensorSpec(bits=8),
  ),
}


@pytest.fixture(scope='module')
def test_images():
  _, _, xte, _ = digits.load_digits_split()
  return jnp.asarray(xte)


# The learned-bit layers of each architecture, and its 8-bit first / last.
LEARNED = {
  'digits': ['conv1', 'conv2', 'conv3', 'conv4'],
  'resnet': [
    'stage1_block0/conv1',
    'stage1_block0/conv2',
    'stage2_block0/conv1',
    'stage2_block0/conv2',
    'stage2_block0/downsample_conv',
  ],
}
FIXED = {'digits': ('conv_init', 'head'), 'resnet': ('conv_init', 'fc')}


def _at(tree, path):
  for part in path.split('/'):
    tree = tree[part]
  return tree


@pytest.fixture(
  scope='module',
  # FracBits on the digits CNN is exported by the quickstart.
  params=[('digits', 'uniform'), ('resnet', 'uniform'), ('resnet', 'fracbits')],
  ids=lambda p: '-'.join(p),
)
def quantized(request, test_images):
  """The NNX digits CNN or a ResNet (identity and projection residual
  adds) quantized by the method, calibrated on digits (and for FracBits,
  its spread learned bits hard-assigned)."""
  arch, method = request.param
  if arch == 'digits':
    model = DigitsCNN(widths=WIDTHS, rngs=nnx.Rngs(0))
  else:
    model = ResNet((1, 1), widths=(4, 8), in_features=1, rngs=nnx.Rngs(0))
  model.eval()
  x = test_images[:64]
  first, last = FIXED[arch]
  rules = [fracq.fixed_bits(f'^{first}$|^{last}$', bits=8), RULES[method]]
  budget = Budget(kind='size', uniform_bits=3)
  if method == 'uniform':
    budget = None
  qmodel = fnnx.quantize(model, rules, x, budget=budget)
  qmodel.calibrate(x)
  if method == 'fracbits':
    quant = qmodel.variables('quant')
    for i, path in enumerate(LEARNED[arch]):
      node = _at(quant, path)
      node['kernel_bits'] = node['kernel_bits'] + 0.6 * (i - 1.5)
    qmodel._write('quant', quant)
    assert qmodel.hard_assign() is not None
  return arch, method, qmodel


def test_integer_program_and_onnx_equal_nnx_fake_quant(
  quantized, test_images, tmp_path
):
  arch, method, qmodel = quantized
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
  first, last = FIXED[arch]
  assert bits[first] == bits[last] == 8
  if method == 'fracbits':
    hard = qmodel.variables('quant_stats')
    for path in LEARNED[arch]:
      np.testing.assert_array_equal(
        frozen[path].bits.reshape(-1),
        _at(hard, path)['kernel_hard_bits'].ravel(),
      )
    assert min(bits.values()) < 4
  else:
    assert bits[LEARNED[arch][0]] == 4
  pytest.importorskip('onnxruntime')
  path = str(tmp_path / f'{arch}_{method}.onnx')
  rep = ox.export_onnx(wrapper, variables, x, path, program=program)
  assert rep['onnx_prediction_match'] == 1.0
  assert rep['onnx_max_logit_diff_rel'] < 1e-3
  np.testing.assert_array_equal(ox.run_onnx(path, x).argmax(1), sim.argmax(1))


@pytest.mark.parametrize(
  'quantized', [('digits', 'uniform')], indirect=True, ids=['digits-uniform']
)
def test_twin_mismatches_are_refused(quantized, test_images):
  _, _, qmodel = quantized
  x = test_images[:16]
  with pytest.raises(ValueError, match='other layers'):
    fnnx.to_linen(qmodel, x, LinenDigitsCNN(widths=(8, 8, 8, 8, 16)))
  # Same layers, another function: BatchNorm's epsilon differs.
  twin = LinenDigitsCNN(widths=WIDTHS, bn_epsilon=0.5)
  with pytest.raises(ValueError, match='computes something else'):
    fnnx.to_linen(qmodel, x, twin)
  model = helpers.NNXMLP(nnx.Rngs(0))
  mlp = fnnx.quantize(model, [RULES['uniform']], jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='names no linen twin'):
    fnnx.to_linen(mlp, jnp.ones((2, 4)))
  with pytest.raises(TypeError, match='QATModule'):
    fnnx.to_linen(model, jnp.ones((2, 4)))
