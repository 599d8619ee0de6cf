"""Integer programs and ONNX of uniform-QAT / FracBits residual networks.

Every reader of a tensor quantizes it at its own LSQ step, so the lowering
keeps each layer's and add's int32 accumulator and reads it through
requantizations (:class:`fracq.export.IntRequant`); an add brings its
operands to one common int32 fixed-point position first. The reference is
the fake-quantized model: in float32 it computes every code as
``round(x / s)``, so a value within float rounding of a rounding tie can land
on the neighbouring code, and in a deep random network such a flip moves an
image's logits by ~1e-2 of their range. So: equal predictions, most images
equal to float rounding, none off by more than a few flips.
"""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export
from fracq import models
from fracq.core import integer as ints
from fracq.export import onnx_export as ox
from fracq.export.lowering.common import verify_program
from fracq.graph.structure import probe_structure
from fracq.methods.uniform.lowering import input_quantization
from fracq.methods.uniform.lowering import reader_codes


def _assert_matches_fake_quant(got, sim):
  np.testing.assert_array_equal(got.argmax(1), sim.argmax(1))
  rel = np.abs(got - sim).max(axis=1) / np.ptp(sim)
  assert np.mean(rel < 1e-5) >= 0.75, np.sort(rel)
  assert rel.max() < 5e-2, rel.max()


def _qat(module, x, rule):
  """The model under ``rule`` with BN statistics and LSQ steps from ``x``."""
  qm = fracq.quantize(module, [rule], x[:1], call_kwargs={'train': False})
  v = qm.init(jax.random.key(0), x)
  train_step = jax.jit(
    lambda v: qm.apply(
      v, x, train=True, mutable=['batch_stats', 'quant_stats']
    )[1]
  )
  for _ in range(2):
    v = {**v, **train_step(v)}
  return qm, qm.calibrate(v, x)


W8A8 = fracq.Rule(
  weight=fracq.TensorSpec(bits=8, granularity='channel'),
  act=fracq.TensorSpec(bits=8),
)


def _images(size, n=16, seed=3):
  return jax.random.uniform(
    jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1
  )


def _check_onnx(prog, x, got):
  pytest.importorskip('onnx')
  pytest.importorskip('onnxruntime')
  onnx_out = ox.run_onnx(ox.program_to_onnx(prog), np.asarray(x))
  # onnxruntime requantizes in float32 (QuantizeLinear divides by a float
  # scale), so the same code flips can occur as against the simulation.
  _assert_matches_fake_quant(onnx_out, got)


def test_resnet20_identity_and_projection_blocks(tmp_path):
  x = _images(8)
  # The zoo's ResNet-20 at a quarter of its width (seconds, not minutes).
  module = models.get_model('resnet20', num_classes=10, widths=(4, 8, 8))
  qm, v = _qat(module, x, W8A8)
  prog = export.lower(qm, v, x)
  adds = [op for op in prog.layers if isinstance(op, export.IntAdd)]
  assert len(adds) == 9
  # An identity block: conv2's accumulator and the previous add's, both
  # brought to the add's common int32 position.
  assert adds[1].inputs == [
    'stage1_block1/conv2@stage1_block1',
    'stage1_block0@stage1_block1',
  ]
  views = {
    op.path: op for op in prog.layers if isinstance(op, export.IntRequant)
  }
  assert views['stage1_block0@stage1_block1'].relu
  assert views['stage1_block0@stage1_block1'].out_range[1] == 2**31 - 1
  # The classifier reads the last add through an 8x8-position pool sum.
  assert views['stage3_block2@fc'].pool == 4 and prog.layers[-1].src == (
    'stage3_block2@fc'
  )
  got = np.asarray(prog.logits(x))
  _assert_matches_fake_quant(got, np.asarray(qm.apply(v, x)))
  ints.assert_integer_only(prog, prog.quantize_input(x))
  _check_teacher_forcing(qm, v, x, prog)
  path = str(tmp_path / 'resnet20.int.safetensors')
  export.save_program(prog, path)
  loaded = export.load_program(path)
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)), got)
  assert 'stage3_block2@fc' in loaded.summary()
  _check_onnx(prog, x, got)


def _check_teacher_forcing(qm, v, x, prog):
  """The lowering's teacher-forced check covered every layer, and it fails
  a program with one requantization multiplier 3% off, in the layer that
  reads it."""
  result = prog.verification
  structure = probe_structure(qm.module, v, x, train=False)
  assert sorted(result.layers) == sorted(structure.order)
  assert all(entry['max_diff'] <= 1 for entry in result.layers.values())
  assert result.replay_max_diff_rel < 1e-4
  ref, teacher = reader_codes(qm, v, x, input_quantization(qm, v, structure))
  broken = copy.deepcopy(prog)
  view = next(
    op
    for op in broken.layers
    if op.path == 'stage2_block0/conv1@stage2_block0/conv2'
  )
  sign, m0, exponent = view.requant[1:]
  view.requant = ('mult', sign, (m0 * 0.97).astype(m0.dtype), exponent)
  with pytest.raises(ValueError, match='stage2_block0/conv2: with every'):
    verify_program(broken, ref, x, exact=False, atol=1.0, teacher=teacher)


def test_bottleneck_max_pool_stem_kernelwise_fracbits():
  """resnet_tiny_bottleneck (7x7/2 stem, 3x3/2 max pool, bottleneck blocks,
  projection shortcuts) under hard-assigned kernel-wise FracBits."""
  x = _images(32)
  spec = fracq.FracBitsSpec(
    bits=5.0,
    bit_bounds=(2.0, 8.0),
    granularity='channel',
    bits_per_channel=True,
  )
  module = models.get_model('resnet_tiny_bottleneck', num_classes=10)
  qm = fracq.quantize(
    module,
    [fracq.Rule(weight=spec, act=fracq.TensorSpec(bits=8))],
    x[:1],
    budget=fracq.Budget(kind='size', uniform_bits=5),
    hard_assign_step=0,
    call_kwargs={'train': False},
  )
  v = qm.init(jax.random.key(0), x)
  _, upd = qm.apply(v, x, train=True, mutable=['batch_stats', 'quant_stats'])
  v = qm.calibrate({**v, **upd}, x)
  hard = qm.for_step(0)
  v = hard.prepare(v)
  prog = export.lower(hard, v, x)
  stem = [op for op in prog.layers if getattr(op, 'src', None) == 'conv_init']
  assert stem and all(op.maxpool is not None for op in stem)
  widths = {
    op.path: op.kernel_bits
    for op in prog.layers
    if isinstance(op, export.IntLayer)
  }
  # Kernel-wise bits: every output channel stored at its own width.
  assert all(isinstance(bits, list) for bits in widths.values())
  got = np.asarray(prog.logits(x))
  _assert_matches_fake_quant(got, np.asarray(hard.apply(v, x)))
  _check_onnx(prog, x, got)


def test_requant_and_add_by_hand():
  """A Dense accumulator (one unit = 0.5 in channel 0, -0.25 in channel 1)
  and the input codes (0.25 each) added at a common position of 1/16.
  x = [3, 5]: acc = [3*2 + 1, 5*1] = [7, 5] -> real [3.5, -1.25]; at 1/16:
  [56, -20]; the input at 1/16: [12, 20]; sum [68, 0] -> real [4.25, 0];
  read as codes of step 0.5 after ReLU: [round(8.5), 0] = [8, 0] (ties to
  even)."""
  m_acc = ints.quantize_multiplier(np.array([8.0, 4.0]))
  m_in = ints.quantize_multiplier(np.float64(4.0))
  m_out = ints.quantize_multiplier(np.array([0.125, 0.125]))
  ops = [
    export.IntLayer(
      path='d',
      layer_type='Dense',
      kernel=np.array([[2, 0], [0, 1]], np.int8),
      bias=np.array([1, 0], np.int32),
      src='input',
    ),
    export.IntRequant(
      path='d@a',
      src='d',
      requant=('mult', np.array([1, -1], np.int32), *m_acc),
      out_range=(-(2**31) + 1, 2**31 - 1),
    ),
    export.IntRequant(
      path='input@a',
      src='input',
      requant=('mult', np.array([1], np.int32), *map(np.atleast_1d, m_in)),
      out_range=(-(2**31) + 1, 2**31 - 1),
    ),
    export.IntAdd(
      path='a', inputs=['d@a', 'input@a'], shifts=[np.int32(0)] * 2
    ),
    export.IntRequant(
      path='a@out',
      src='a',
      requant=('mult', np.ones(2, np.int32), *m_out),
      out_range=(0, 255),
      relu=True,
    ),
  ]
  prog = export.IntegerProgram(
    layers=ops, input_scale=0.25, input_range=(0, 255), kind='qat'
  )
  assert export.is_graph(prog)
  out = prog(jnp.array([[3, 5], [1, 0]], jnp.uint8))
  assert out.dtype == jnp.uint8
  # x = [1, 0]: acc [3, 0] -> [24, 0] + [4, 0] = [28, 0] -> 28/8 = 3.5 -> 4
  np.testing.assert_array_equal(np.asarray(out), [[8, 0], [4, 0]])


class _Gated(nn.Module):
  """Squeeze-excitation-like gating: an element-wise product of two
  branches, which integer programs do not lower."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    a = nn.relu(nn.Conv(4, (1, 1), name='left')(x))
    b = nn.relu(nn.Conv(4, (1, 1), name='right')(x))
    y = nn.Conv(4, (1, 1), name='merge')(a * b)
    return nn.Dense(3, name='head')(jnp.mean(y, axis=(1, 2)))


def test_unsupported_data_flow_is_refused_by_name():
  x = _images(4, n=4)
  qm, v = _qat(_Gated(), x, W8A8)
  with pytest.raises(ValueError, match=r'merge: its input is not'):
    export.lower(qm, v, x)


def _bn(train, name):
  return nn.BatchNorm(use_running_average=not train, momentum=0.5, name=name)


class _InvertedResidual(nn.Module):
  """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 projection without
  activation, identity add (the zoo's MobileNet-V2 block)."""

  train: bool

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    y = conv(16, (1, 1), name='expand_conv')(x)
    y = nn.relu6(_bn(self.train, 'expand_bn')(y))
    y = conv(16, (3, 3), feature_group_count=16, name='dw_conv')(y)
    y = nn.relu6(_bn(self.train, 'dw_bn')(y))
    return x + _bn(self.train, 'project_bn')(
      conv(8, (1, 1), name='project_conv')(y)
    )


class _InvertedResidualNet(nn.Module):
  """MobileNet-V2 in miniature: ReLU6 stem, one inverted residual block, a
  ReLU6 head averaged by the global pool."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False)
    x = nn.relu6(_bn(train, 'stem_bn')(conv(8, (3, 3), name='stem_conv')(x)))
    x = _InvertedResidual(train, name='block0')(x)
    x = nn.relu6(_bn(train, 'head_bn')(conv(16, (1, 1), name='head_conv')(x)))
    return nn.Dense(5, name='classifier')(jnp.mean(x, axis=(1, 2)))


def test_relu6_depthwise_inverted_residual(tmp_path):
  x = 4.0 * _images(6)
  qm, v = _qat(_InvertedResidualNet(), x, W8A8)
  # Coarse input steps, so the 8-bit grids reach beyond 6 and the ReLU6
  # clip, not the grid, bounds the codes.
  v['quant'] = jax.tree_util.tree_map(lambda s: 4.0 * s, v['quant'])
  prog = export.lower(qm, v, x)
  views = {
    op.path: op for op in prog.layers if isinstance(op, export.IntRequant)
  }
  steps = export.freeze_inputs(qm, v)
  for reader in ('block0/expand_conv', 'block0/dw_conv'):
    view = [op for op in views.values() if op.path.endswith('@' + reader)][0]
    top = int(np.round(6.0 / float(steps[reader]['scale'][0])))
    assert 0 < top < 255 and view.out_range == (0, top), (reader, view)
  # The head's ReLU6 comes before the average: a per-channel clip of the
  # accumulator, then the pool sum.
  pooled = views['head_conv@classifier']
  assert pooled.pool == 36 and pooled.acc_clip is not None
  dw = [op for op in prog.layers if op.path == 'block0/dw_conv'][0]
  assert dw.feature_group_count == 16
  got = np.asarray(prog.logits(x))
  _assert_matches_fake_quant(got, np.asarray(qm.apply(v, x)))
  path = str(tmp_path / 'mbv2.int.safetensors')
  export.save_program(prog, path)
  np.testing.assert_array_equal(
    np.asarray(export.load_program(path).logits(x)), got
  )
  _check_onnx(prog, x, got)


class _Branch(nn.Module):
  """Inception's BasicConv: conv, BN, ReLU."""

  features: int
  kernel: tuple
  train: bool
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    pad = tuple((k // 2, k // 2) for k in self.kernel)
    if self.strides > 1:
      pad = 'VALID'
    y = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=pad,
      use_bias=False,
      name='conv',
    )(x)
    return nn.relu(_bn(self.train, 'bn')(y))


class _MiniInception(nn.Module):
  """Inception-V3 in miniature: a stem with a 3x3 / 2 max pool, an
  Inception-A-like block (1x1, 3x3 and a 3x3 / 1 average-pool branch,
  concatenated), an Inception-B-like reduction (a strided conv next to a
  3x3 / 2 max pool of the block input), the global pool of a last
  concatenation and the classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _Branch(8, (3, 3), train, name='stem')(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    b1 = _Branch(4, (1, 1), train, name='a_1x1')(x)
    b3 = _Branch(4, (1, 1), train, name='a_3x3_1')(x)
    b3 = _Branch(6, (3, 3), train, name='a_3x3_2')(b3)
    bp = nn.avg_pool(
      x,
      (3, 3),
      strides=(1, 1),
      padding=((1, 1), (1, 1)),
      count_include_pad=True,
    )
    bp = _Branch(4, (1, 1), train, name='a_pool')(bp)
    x = jnp.concatenate([b1, b3, bp], axis=-1)
    b3 = _Branch(8, (3, 3), train, strides=2, name='b_3x3')(x)
    x = jnp.concatenate([b3, nn.max_pool(x, (3, 3), strides=(2, 2))], axis=-1)
    x = jnp.concatenate([_Branch(8, (1, 1), train, name='c_1x1')(x), b3], -1)
    return nn.Dense(5, name='fc')(jnp.mean(x, axis=(1, 2)))


def test_inception_concatenations_and_pools(tmp_path):
  x = _images(11)
  qm, v = _qat(_MiniInception(), x, W8A8)
  prog = export.lower(qm, v, x)
  concats = [op for op in prog.layers if isinstance(op, export.IntConcat)]
  assert [op.path for op in concats] == [
    'concat@b_3x3/conv',
    'concat@c_1x1/conv',
    'concat@fc',
  ]
  views = {
    op.path: op for op in prog.layers if isinstance(op, export.IntRequant)
  }
  # The classifier reads the global averages of both parts.
  assert [views[name].pool for name in concats[-1].inputs] == [4, 4]
  # The average-pool branch reads the block input, the stem after its max
  # pool: a 3x3 / 2 max pool, then a 3x3 / 1 window sum, of the stem's
  # accumulator, requantized once.
  pool_branch = views['stem/conv@a_pool/conv']
  assert pool_branch.maxpool[1:3] == ((3, 3), (2, 2))
  assert pool_branch.avgpool[1:3] == ((3, 3), (1, 1))
  # The max-pool part of the reduction reads each Inception-A branch.
  assert sum(op.maxpool is not None for op in views.values()) >= 3
  got = np.asarray(prog.logits(x))
  _assert_matches_fake_quant(got, np.asarray(qm.apply(v, x)))
  path = str(tmp_path / 'inception.int.safetensors')
  export.save_program(prog, path)
  np.testing.assert_array_equal(
    np.asarray(export.load_program(path).logits(x)), got
  )
  _check_onnx(prog, x, got)


class _TokenModel(nn.Module):
  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    hidden = nn.Embed(16, 8, name='embed')(tokens)
    return nn.Dense(4, name='head')(hidden.mean(axis=1))


def test_token_models_are_refused_with_the_reason():
  tokens = jnp.zeros((2, 5), jnp.int32)
  rules = [
    fracq.Rule(weight=fracq.TensorSpec(bits=8), act=fracq.TensorSpec(bits=8))
  ]
  qmodel = fracq.quantize(_TokenModel(), rules, tokens)
  variables = qmodel.init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match='int32 tokens'):
    export.lower(qmodel, variables, tokens, verify=False)


class _OnePositionPool(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    hidden = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), name='conv')(x))
    return nn.Dense(3, name='head')(jnp.mean(hidden, axis=(1, 2)))


def test_a_global_pool_over_a_one_by_one_map_lowers():
  # 2x2 input, stride 2: the conv's map is 1 x 1, so the pool sums one
  # position and the program's output must still be (batch, classes).
  x = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))
  rules = [
    fracq.Rule(weight=fracq.TensorSpec(bits=8), act=fracq.TensorSpec(bits=8))
  ]
  qmodel = fracq.quantize(_OnePositionPool(), rules, x)
  variables = qmodel.init(jax.random.key(0), x)
  program = export.lower(qmodel, variables, x)
  ref = np.asarray(qmodel.apply(variables, x))
  got = np.asarray(program.logits(x))
  assert got.shape == ref.shape == (4, 3)
  np.testing.assert_allclose(got, ref, atol=1e-3 * np.ptp(ref))


def test_pact_inputs_of_a_bfloat16_model_lower():
  """The FracBits ImageNet recipe's setting: PACT activation ranges (step
  alpha / qmax, the clip is the top code) on a model that computes in
  bfloat16. The program deploys the variables and is checked against the
  float32 fake-quantized model."""
  x = _images(8, n=8)
  module = models.get_model(
    'resnet20', num_classes=10, widths=(4, 8, 8), dtype=jnp.bfloat16
  )
  rule = fracq.Rule(
    weight=fracq.TensorSpec(bits=4, granularity='channel'),
    act=fracq.TensorSpec(bits=8, range_method='pact'),
  )
  qm, v = _qat(module, x, rule)
  prog = export.lower(qm, v, x)
  result = prog.verification
  assert len(result.layers) == 22 and result.replay_max_diff_rel < 1e-4
  # Every input step is its PACT clip over the top code.
  steps = export.freeze_inputs(qm, v)
  for path, entry in steps.items():
    np.testing.assert_allclose(
      entry['scale'][0], entry['clip'][0] / entry['qmax'], rtol=1e-6
    )
  float32 = qm.with_module(module.clone(dtype=jnp.float32))
  _assert_matches_fake_quant(
    np.asarray(prog.logits(x)), np.asarray(float32.apply(v, x))
  )
  # LSQ+ inputs (a learned offset) have no integer form: refused by name.
  plus = fracq.Rule(
    weight=fracq.TensorSpec(bits=4, granularity='channel'),
    act=fracq.TensorSpec(bits=8, range_method='lsq_plus', symmetric=False),
  )
  digits = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  small = models.get_model('digits_cnn', widths=(4, 4, 4, 4, 4))
  qm, v = _qat(small, digits, plus)
  with pytest.raises(ValueError, match='conv_init: .* zero point or offset'):
    export.lower(qm, v, digits)
