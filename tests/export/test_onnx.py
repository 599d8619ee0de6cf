"""ONNX QDQ export: onnxruntime reproduces the integer programs on digits."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_fracbits
from fracq import export
from fracq.core import integer as ints
from fracq.data import digits
from fracq.export import onnx_export as ox
from tests import helpers

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

# The run of test_integer_model (FracBits hard-assigns its bits at step 60).
# Much shorter runs leave the model where the float32 simulation's rounding
# flips single activation codes at the last hidden layer, each worth ~7e-4 of
# the logit range, so many of them would blur the comparison with the
# fake-quantized model.
FB_STEPS, FB_HARD = 80, 60


@pytest.fixture(scope='module')
def test_set():
  _, _, xte, yte = digits.load_digits_split()
  return xte, yte


@pytest.fixture(scope='module')
def fracbits(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('fb'))
  return helpers.train_digits(
    digits_fracbits.get_config, None, wd, FB_STEPS, hard_assign_step=FB_HARD
  )[:2]


def _op_types(model):
  return [n.op_type for n in model.graph.node]


def test_fracbits_onnx_equals_integer_program_and_fake_quant(
  fracbits, test_set, tmp_path
):
  wrapper, v = fracbits
  x, _ = test_set
  path = str(tmp_path / 'fb.onnx')
  # Lowers, writes, runs onnxruntime on all 360 test images and compares.
  rep = ox.export_onnx(wrapper, v, x, path)
  assert rep['onnx_prediction_match'] == 1.0  # vs the integer program
  assert rep['onnx_fake_quant_prediction_match'] == 1.0
  assert rep['onnx_max_logit_diff_rel'] < 1e-3
  # Against the float32 simulation: up to a few single-code flips (see
  # test_integer_model.assert_equal_up_to_code_flips), ~7e-4 each.
  assert rep['onnx_fake_quant_max_logit_diff_rel'] < 3e-3
  assert rep['onnx_opset'] == 21 and rep['onnx_exact_accumulation']
  assert rep['onnx_bytes'] == os.path.getsize(path)
  model = onnx.load(path)
  onnx.checker.check_model(model, full_check=True)
  # A QDQ graph: quantize / dequantize around float Conv and Gemm.
  ops = _op_types(model)
  for op in (
    'Transpose',
    'QuantizeLinear',
    'DequantizeLinear',
    'Conv',
    'Gemm',
    'Relu',
    'GlobalAveragePool',
  ):
    assert op in ops, op
  # Kernels of <= 4-bit layers are INT4 initializers, the others int8.
  bits = {p: int(np.max(f.bits)) for p, f in export.freeze(wrapper, v).items()}
  assert min(bits.values()) <= 4 < max(bits.values())
  kinds = {i.name: i.data_type for i in model.graph.initializer}
  for p, b in bits.items():
    t = [
      dt
      for n, dt in kinds.items()
      if n.startswith(f'{p}_kernel_') and '_scale' not in n and '_zp' not in n
    ]
    want = onnx.TensorProto.INT4 if b <= 4 else onnx.TensorProto.INT8
    assert t == [want], (p, b, t)
  assert rep['onnx_int4_initializers'] == sum(b <= 4 for b in bits.values())
  # Opset 20 has no INT4: every kernel int8, the same numbers, more bytes.
  prog = export.lower_qat(wrapper, v, jnp.asarray(x[:64]), verify=False)
  m20 = ox.program_to_onnx(prog, str(tmp_path / 'fb20.onnx'), opset=20)
  assert onnx.TensorProto.INT4 not in {
    i.data_type for i in m20.graph.initializer
  }
  np.testing.assert_array_equal(ox.run_onnx(m20, x), ox.run_onnx(path, x))
  assert os.path.getsize(str(tmp_path / 'fb20.onnx')) > os.path.getsize(path)


def _f8net_like_program(rng):
  """A digits-CNN-shaped program with F8Net's power-of-two requantization
  (rounding right shifts) and random int8 codes."""
  chans = [1, 8, 16, 16]
  layers = []
  for i in range(3):
    k = rng.integers(-128, 128, (3, 3, chans[i], chans[i + 1])).astype(np.int8)
    layers.append(
      export.IntLayer(
        f'conv{i}',
        'Conv',
        k,
        rng.integers(-2000, 2000, chans[i + 1]).astype(np.int32),
        strides=(2, 2) if i == 1 else (1, 1),
        padding='SAME',
        relu=True,
        pool=16 if i == 2 else 1,
        out_range=(0, 255),
        requant=('shift', np.int32(6 if i == 0 else 9 + 4 * (i == 2))),
      )
    )
  layers.append(
    export.IntLayer(
      'head',
      'Dense',
      rng.integers(-128, 128, (16, 10)).astype(np.int8),
      rng.integers(-2000, 2000, 10).astype(np.int32),
      out_scale=np.float32(2.0**-12),
    )
  )
  return export.IntegerProgram(
    layers=layers, input_scale=2.0**-5, input_range=(-127, 127), kind='f8net'
  )


def test_f8net_program_onnx_is_bit_exact(test_set):
  """Power-of-two scales: every float op in the graph is exact, so the
  logits equal the integer program's bit for bit on the whole test set.
  (A trained F8Net digits model: see the module's measured figures.)"""
  x, _ = test_set
  prog = _f8net_like_program(np.random.default_rng(1))
  ref = np.asarray(prog.logits(jnp.asarray(x)))
  codes = np.asarray(
    export.integer_forward(
      export.IntegerProgram(
        prog.layers[:1], prog.input_scale, prog.input_range, 'f8net'
      ),
      prog.quantize_input(x),
    )
  )
  assert 0 < np.mean(codes == 255) < 0.5 and np.mean(codes == 0) < 0.9
  got = ox.run_onnx(ox.program_to_onnx(prog), x)
  np.testing.assert_array_equal(got, ref)
  assert len(np.unique(ref.argmax(1))) > 1


def _round_half_even(v):
  return np.round(v)  # numpy rounds half to even


def _numpy_conv(q, w, stride, pads):
  """Integer NHWC x HWIO convolution by explicit sums (int64)."""
  (pt, pb), (pl, pr) = pads
  qp = np.pad(q.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw, _, co = w.shape
  oh = (qp.shape[1] - kh) // stride + 1
  ow = (qp.shape[2] - kw) // stride + 1
  out = np.zeros((q.shape[0], oh, ow, co), np.int64)
  for i in range(oh):
    for j in range(ow):
      patch = qp[
        :, i * stride : i * stride + kh, j * stride : j * stride + kw, :
      ]
      out[:, i, j, :] = np.einsum('nhwc,hwco->no', patch, w.astype(np.int64))
  return out


def test_conv_layer_semantics_by_hand():
  """A Conv (INT4 kernel, stride 2, SAME) -> requant -> pool -> Dense
  program, checked against numpy arithmetic written out here."""
  rng = np.random.default_rng(0)
  k1 = rng.integers(-8, 8, (3, 3, 2, 4)).astype(np.int8)
  b1 = rng.integers(-3000, 3000, 4).astype(np.int32)
  m = np.array([3.1e-5, 1.7e-5, 4.2e-5, 2.3e-5])
  m0, ex = ints.quantize_multiplier(m)
  sign = np.array([1, -1, 1, 1], np.int32)
  k2 = rng.integers(-128, 128, (4, 3)).astype(np.int8)
  b2 = rng.integers(-500, 500, 3).astype(np.int32)
  out_scale = np.array([0.01, 0.02, 0.015], np.float32)
  prog = export.IntegerProgram(
    layers=[
      export.IntLayer(
        'c',
        'Conv',
        k1,
        b1,
        strides=(2, 2),
        padding='SAME',
        relu=True,
        pool=16,
        acc_shift=2,
        requant=('mult', sign, m0, ex),
        out_range=(0, 15),
      ),
      export.IntLayer('d', 'Dense', k2, b2, out_scale=out_scale),
    ],
    input_scale=0.05,
    input_range=(-127, 127),
    kind='qat',
  )
  x = rng.normal(size=(6, 7, 8, 2)).astype(np.float32) * 3
  # By hand: quantize (ties to even, clip), SAME padding for 7x8 / stride 2
  # (out 4x4; total pads 2 and 1, the extra one at the end), accumulate.
  q = np.clip(_round_half_even(x / np.float32(0.05)), -127, 127)
  acc = _numpy_conv(q, k1, 2, ((1, 1), (0, 1)))
  assert acc.shape == (6, 4, 4, 4)
  acc = ((acc << 2) + b1) * sign
  s = np.maximum(acc, 0).sum(axis=(1, 2))  # 16 positions summed
  mult = m0.astype(np.float64) * 2.0 ** (ex.astype(np.float64) - 31)
  y = np.clip(_round_half_even(s * mult), 0, 15)
  logits = (y @ k2.astype(np.int64) + b2) * out_scale.astype(np.float64)
  # The float form (every layer a float Conv / Gemm on integer values).
  model = ox.program_to_onnx(prog, integer_kernels=False)
  got = ox.run_onnx(model, x)
  np.testing.assert_allclose(got, logits, rtol=1e-6)
  np.testing.assert_array_equal(got, np.asarray(prog.logits(x)))
  # The default integer-kernel form (the head as QGemm) computes the same.
  np.testing.assert_array_equal(ox.run_onnx(ox.program_to_onnx(prog), x), got)
  ops = _op_types(model)
  assert ops.count('QuantizeLinear') == 2 and 'Clip' in ops  # 0..15 in uint8
  assert 'Mul' in ops  # the negative channel's sign
  conv = next(n for n in model.graph.node if n.op_type == 'Conv')
  attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
  assert attrs['auto_pad'] == b'SAME_UPPER' and list(attrs['strides']) == [2, 2]
  w = next(
    i
    for i in model.graph.initializer
    if i.name.startswith('c_kernel_')
    and '_scale' not in i.name
    and '_zp' not in i.name
  )
  assert w.data_type == onnx.TensorProto.INT4 and list(w.dims) == [4, 2, 3, 3]
  np.testing.assert_array_equal(
    onnx.numpy_helper.to_array(w).astype(np.int8),
    np.transpose(k1, (3, 2, 0, 1)),
  )


def test_errors(test_set, tmp_path, monkeypatch):
  x = test_set[0][:8]
  one = export.IntegerProgram(
    layers=[
      export.IntLayer(
        'd',
        'Dense',
        np.ones((4, 2), np.int8),
        None,
        out_scale=np.ones(2, np.float32),
      )
    ],
    input_scale=1.0,
    input_range=(0, 255),
    kind='qat',
  )
  with pytest.raises(ValueError, match='opset'):
    ox.program_to_onnx(one, opset=11)
  with pytest.raises(ValueError, match='no layers'):
    ox.program_to_onnx(export.IntegerProgram([], 1.0, (0, 255), 'qat'))
  conv3d = export.IntegerProgram(
    layers=[
      export.IntLayer(
        'c',
        'Conv',
        np.ones((1, 1, 1, 1, 2), np.int8),
        None,
        strides=(1, 1, 1),
        padding='VALID',
        out_scale=np.ones(2, np.float32),
      )
    ],
    input_scale=1.0,
    input_range=(0, 255),
    kind='qat',
  )
  with pytest.raises(ValueError, match='2-D convolutions'):
    ox.program_to_onnx(conv3d)
  # Not a quantized model / not a chain: lower's errors, unchanged.
  path = str(tmp_path / 'm.onnx')
  with pytest.raises(ValueError, match='no integer lowering'):
    ox.export_onnx(object(), {}, x, path)
  # (lower's structural errors, e.g. a residual net, are tested in
  # test_integer_model; export_onnx raises them unchanged.)
  assert not os.path.exists(path)
  open(path, 'w').close()
  with pytest.raises(FileExistsError):
    ox.export_onnx(object(), {}, x, path)
  # Without onnx: an ImportError saying what to install.
  monkeypatch.setitem(sys.modules, 'onnx', None)
  with pytest.raises(ImportError, match='pip install onnx'):
    ox.program_to_onnx(one)


def _optimized_ops(model, tmp_path):
  """Op types onnxruntime runs for ``model`` after graph optimization."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / 'optimized.onnx')
  opts = ort.SessionOptions()
  opts.optimized_model_filepath = path
  opts.log_severity_level = 3
  ort.InferenceSession(
    model.SerializeToString(), opts, providers=['CPUExecutionProvider']
  )
  return [n.op_type for n in onnx.load(path).graph.node]


def test_integer_kernels_after_graph_optimization(test_set, tmp_path):
  """The convolutions requantized to codes and the head run as
  onnxruntime's integer kernels (QLinearConv, QGemm), with the program's
  logits bit for bit (whole-unit biases); the float form runs Conv."""
  x, _ = test_set
  prog = _f8net_like_program(np.random.default_rng(1))
  report = {}
  model = ox.program_to_onnx(prog, report=report)
  # conv0, conv1 and the head; conv2 (global pool) stays a float Conv.
  assert report['integer_kernel_layers'] == 3
  assert report['rounded_bias_layers'] == 0
  ops = _optimized_ops(model, tmp_path)
  assert ops.count('QLinearConv') == 2 and ops.count('QGemm') == 1, ops
  np.testing.assert_array_equal(
    ox.run_onnx(model, x), np.asarray(prog.logits(jnp.asarray(x)))
  )
  float_ops = _optimized_ops(
    ox.program_to_onnx(prog, integer_kernels=False), tmp_path
  )
  assert 'QLinearConv' not in float_ops and 'QGemm' not in float_ops


def test_round_bias_is_the_program_with_whole_unit_biases(test_set):
  """A bias with fractional accumulator bits (``acc_shift``) has no exact
  integer-kernel form: by default that layer stays float (exact); with
  ``round_bias`` it becomes an integer kernel (QGemm) and computes the program whose
  biases are rounded to whole accumulator units."""
  x, _ = test_set
  rng = np.random.default_rng(2)
  m0, ex = ints.quantize_multiplier(np.array([2.1e-4, 3.3e-4, 1.2e-4]))
  sign = np.array([1, -1, 1], np.int32)

  def program(hidden_bias, head_bias):
    return export.IntegerProgram(
      layers=[
        export.IntLayer(
          'h',
          'Dense',
          hidden_kernel,
          hidden_bias,
          relu=True,
          acc_shift=3,
          requant=('mult', sign, m0, ex),
          out_range=(0, 255),
        ),
        export.IntLayer(
          'd',
          'Dense',
          head_kernel,
          head_bias,
          out_scale=np.array([0.01, 0.02], np.float32),
        ),
      ],
      input_scale=1 / 16,
      input_range=(-127, 127),
      kind='qat',
    )

  hidden_kernel = rng.integers(-127, 128, (64, 3)).astype(np.int8)
  head_kernel = rng.integers(-127, 128, (3, 2)).astype(np.int8)
  b1 = rng.integers(-3000, 3000, 3).astype(np.int32)  # 3 fractional bits
  b2 = rng.integers(-500, 500, 2).astype(np.int32)
  features = jnp.asarray(x.reshape(len(x), -1))
  exact = program(b1, b2)
  report = {}
  got = ox.run_onnx(ox.program_to_onnx(exact, report=report), features)
  assert report['integer_kernel_layers'] == 1  # the head: whole units
  np.testing.assert_array_equal(got, np.asarray(exact.logits(features)))
  rounded = program((np.round(b1 / 8) * 8).astype(np.int32), b2)
  report = {}
  model = ox.program_to_onnx(exact, report=report, round_bias=True)
  assert report['integer_kernel_layers'] == 2
  assert report['rounded_bias_layers'] == 1
  np.testing.assert_array_equal(
    ox.run_onnx(model, features), np.asarray(rounded.logits(features))
  )
