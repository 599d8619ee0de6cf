"""Integer-only F8Net residual networks, bit-exact against the simulation."""

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import export
from fracq import models
from fracq.core import integer as ints
from fracq.data import digits
from fracq.export import artifact
from fracq.export import onnx_export as ox
from fracq.export import serialization
from fracq.methods.f8net import F8NetModel, F8NetOptions
from tests import helpers

STEPS = 6


@pytest.fixture(scope='module')
def trained():
  """resnet_tiny (identity block + projection block) on 8x8 digits after a
  few F8Net training steps: BN statistics and FLs moved off their init."""
  xtr, ytr, xte, yte = digits.load_digits_split()
  x, y = jnp.asarray(xtr[:128]), jnp.asarray(ytr[:128])
  w, v, _ = helpers.train_f8(
    models.get_model('resnet_tiny', num_classes=10),
    x,
    y,
    F8NetOptions(),
    steps=STEPS,
  )
  return w, v, None, jnp.asarray(xte), np.asarray(yte)


def test_probe_finds_identity_and_projection_adds(trained):
  w = trained[0]
  st = w.structure
  assert st.adds['stage1_block0']['identity'][0] == 'conv_init'
  assert st.adds['stage1_block0']['operands'] == ['stage1_block0/conv2']
  assert st.adds['stage2_block0']['identity'] is None
  assert st.adds['stage2_block0']['operands'] == [
    'stage2_block0/conv2',
    'stage2_block0/downsample_conv',
  ]
  assert st.srcs['fc'] == ('stage2_block0', False, 16)  # 4x4 global pool
  assert set(w.shared) == {'stage1_block0', 'stage2_block0'}


def test_block_inputs_are_one_shared_fixed_point_tensor(trained):
  """The shortcut, conv1 and downsample_conv read one 8-bit tensor: one FL
  (on the block's scope) and the identical quantized values."""
  w, v, _, xte, _ = trained
  qs = v['quant_stats']
  assert 'input_fl_ema' in qs['stage1_block0']
  assert 'conv1' not in qs['stage1_block0']  # no private FL any more
  assert 'downsample_conv' not in qs['stage2_block0']
  recs = {r.path: r for r in w.capture(v, xte[:4])}
  assert (
    recs['stage2_block0/conv1'].input_fl
    == recs['stage2_block0/downsample_conv'].input_fl
    == round(float(qs['stage2_block0']['input_fl_ema']))
  )
  # Non-trivial formats: the tensors do not all share one FL, and the BN
  # running statistics have left their init.
  assert len({int(r.input_fl) for r in recs.values()}) > 1
  assert (
    float(
      np.abs(np.asarray(v['batch_stats']['stage1_block0']['bn2']['mean'])).max()
    )
    > 0
  )


def test_integer_residual_program_is_bit_exact(trained, tmp_path):
  w, v, _, xte, yte = trained
  t0 = time.time()
  prog = export.lower(w, v, xte[:64])
  assert export.is_graph(prog)
  adds = [op for op in prog.layers if isinstance(op, export.IntAdd)]
  assert [a.path for a in adds] == ['stage1_block0', 'stage2_block0']
  # The adds really align different FLs.
  assert any(np.any(np.asarray(s) != 0) for a in adds for s in a.shifts)
  print(prog.summary())
  print({a.path: [np.asarray(s).tolist() for s in a.shifts] for a in adds})
  sim = np.asarray(w.apply(v, xte, train=False))
  codes = prog.quantize_input(xte)
  acc = prog(codes)
  assert codes.dtype == jnp.int8 and acc.dtype == jnp.int32
  got = np.asarray(prog.logits(xte))
  # All 360 test images: identical logits, not just predictions.
  np.testing.assert_array_equal(got, sim)
  assert np.ptp(sim) > 0
  print(f'bit-exact on {len(xte)} images; lowering {time.time() - t0:.1f}s')
  # Integer dtypes end to end: no float multiply, dot or conv anywhere.
  jaxpr = ints.assert_integer_only(prog, codes)
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert 'conv_general_dilated' in prims and 'dot_general' in prims
  with pytest.raises(AssertionError, match='float multiply'):
    ints.assert_integer_only(prog.logits, xte)
  ints.assert_integer_only(prog.logits, xte, boundary=True)
  # Residual programs round-trip through the artifact.
  path = str(tmp_path / 'res.int.safetensors')
  export.save_program(prog, path)
  loaded = export.load_program(path)
  assert export.is_graph(loaded)
  np.testing.assert_array_equal(np.asarray(loaded.logits(xte)), got)
  assert '\nstage2_block0' in loaded.summary()
  # ONNX: the adds become exact float products by 2^shift and a Sum of
  # integers; onnxruntime reproduces the program's logits bit for bit.
  onnx = pytest.importorskip('onnx')
  pytest.importorskip('onnxruntime')
  info = {}
  opath = str(tmp_path / 'res.onnx')
  ox.program_to_onnx(prog, opath, report=info)
  assert info['exact_accumulation']
  ops = [n.op_type for n in onnx.load(opath).graph.node]
  assert ops.count('Sum') == 2 and 'GlobalAveragePool' in ops
  np.testing.assert_array_equal(ox.run_onnx(opath, np.asarray(xte)), got)


def test_add_alignment_by_hand():
  """codes x = [3, 5] at FL 2 (0.75, 1.25); a Dense (kernel FL 1) gives the
  int32 accumulator [3*2 + 1, 5*(-3)] = [7, -15] at FL 3. The add aligns x
  to FL 3 by one left shift: [7 + 6, -15 + 10] = [13, -5]; ReLU [13, 0];
  to FL 1 by a rounding right shift of 2: [round(3.25), 0] = [3, 0]
  (real 0.875 + 0.75 = 1.625 -> 1.5)."""
  d = export.IntLayer(
    path='d',
    layer_type='Dense',
    kernel=np.array([[2, 0], [0, -3]], np.int8),
    bias=np.array([1, 0], np.int32),
    src='input',
  )
  a = export.IntAdd(
    path='a',
    inputs=['d', 'input'],
    shifts=[np.int32(0), np.int32(1)],
    relu=True,
    requant=('shift', np.int32(2)),
    out_range=(0, 255),
  )
  prog = export.IntegerProgram(
    layers=[d, a], input_scale=0.25, input_range=(0, 255), kind='f8net'
  )
  out = prog(jnp.array([[3, 5]], jnp.uint8))
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(out), [[3, 0]])
  # Ties to even and the clamp: 14 >> 2 = 3.5 -> 4, 10 >> 2 = 2.5 -> 2;
  # signed output clamps to [-127, 127].
  a.relu, a.out_range = False, (-127, 127)
  d.bias = np.array([2, 0], np.int32)
  # x = [3, 5]: acc [8, -15] + x << 1 [6, 10] = [14, -5] -> [4, -1]
  np.testing.assert_array_equal(
    np.asarray(prog(jnp.array([[3, 5]], jnp.uint8))), [[4, -1]]
  )
  # x = [2, 1]: acc [6, -3] + [4, 2] = [10, -1] -> [2, 0] (2.5 -> 2 even,
  # -0.25 -> 0)
  np.testing.assert_array_equal(
    np.asarray(prog(jnp.array([[2, 1]], jnp.uint8))), [[2, 0]]
  )
  # int32 saturation instead of wrap-around when aligning.
  a.shifts = [np.int32(0), np.int32(30)]
  a.requant = ('shift', np.int32(29))
  big = np.asarray(prog(jnp.array([[0, 255]], jnp.uint8)))
  assert big[0, 1] == 4  # (-765 + INT32_MAX) >> 29 = 3.99.. -> 4


def test_chain_programs_keep_the_old_format(tmp_path):
  d = export.IntLayer(
    path='d',
    layer_type='Dense',
    kernel=np.array([[1, -1], [2, 3]], np.int8),
    bias=np.array([5, -5], np.int32),
    out_scale=np.float32(0.125),
  )
  prog = export.IntegerProgram(
    layers=[d], input_scale=0.5, input_range=(-127, 127), kind='f8net'
  )
  assert not export.is_graph(prog)
  path = str(tmp_path / 'chain.int.safetensors')
  export.save_program(prog, path)
  man = artifact.read_artifact(path)[2]
  assert man['metadata']['program']['format'] == serialization.PROGRAM_FORMAT
  assert 'src' not in man['metadata']['program']['layers'][0]
  loaded = export.load_program(path)
  x = jnp.array([[1, 2], [-3, 4]], jnp.int8)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(prog(x)))


def test_resnet20_identity_chains_are_bit_exact():
  """ResNet-20 (nine blocks: identity shortcuts reading the previous add,
  two projection blocks) after train-mode passes that move BN statistics."""
  x = jax.random.uniform(jax.random.key(3), (32, 8, 8, 3), minval=-1, maxval=1)
  w = F8NetModel(models.get_model('resnet20', num_classes=10), x[:8])
  v = w.init(jax.random.key(0), x[:8])
  for _ in range(3):
    _, upd = w.apply(v, x, train=True, mutable=['batch_stats', 'quant_stats'])
    v = {**v, **upd}
  prog = export.lower_f8net(w, v, x)  # verify=True: raises unless bit-exact
  adds = [op for op in prog.layers if isinstance(op, export.IntAdd)]
  assert len(adds) == 9
  assert adds[1].inputs == ['stage1_block1/conv2', 'stage1_block0']
  got = np.asarray(prog.logits(x))
  np.testing.assert_array_equal(got, np.asarray(w.apply(v, x, train=False)))
  if importlib.util.find_spec('onnxruntime') is not None:
    np.testing.assert_array_equal(
      ox.run_onnx(ox.program_to_onnx(prog), np.asarray(x)), got
    )
  # The report shows the shared (block-level) FL for the block's readers.
  line = [
    row
    for row in w.report(v, None, 0).splitlines()
    if row.startswith('stage1_block1/conv1 ')
  ][0]
  assert line.split()[2] != '-', line


def test_bottleneck_with_max_pool_stem_is_bit_exact(tmp_path):
  """ImageNet-style ResNet: 7x7/2 stem, 3x3/2 max pool, bottleneck blocks
  with projection shortcuts, fixed-point PACT on (the stem's clip reaches
  the first block through the max pool). The max pool runs on the codes."""
  x = jax.random.uniform(
    jax.random.key(3), (16, 32, 32, 3), minval=-1, maxval=1
  )
  w = F8NetModel(
    models.get_model('resnet_tiny_bottleneck', num_classes=10),
    x[:8],
    options=F8NetOptions(pact=True, pact_init=2.0),
  )
  assert w.structure.srcs['stage1_block0/conv1'] == (
    'conv_init',
    True,
    ('max', (3, 3), (2, 2), ((1, 1), (1, 1))),
  )
  assert w.pact_entry['stage1_block0'] == 'conv_init'
  v = w.init(jax.random.key(0), x[:8])
  for _ in range(3):
    _, upd = w.apply(v, x, train=True, mutable=['batch_stats', 'quant_stats'])
    v = {**v, **upd}
  prog = export.lower_f8net(w, v, x)  # verify=True: raises unless bit-exact
  assert prog.layers[0].maxpool is not None
  assert 'max pool 3x3 /2' in prog.summary()
  got = np.asarray(prog.logits(x))
  np.testing.assert_array_equal(got, np.asarray(w.apply(v, x, train=False)))
  path = str(tmp_path / 'bottleneck.int.safetensors')
  export.save_program(prog, path)
  np.testing.assert_array_equal(
    np.asarray(export.load_program(path).logits(x)), got
  )
  if importlib.util.find_spec('onnxruntime') is not None:
    np.testing.assert_array_equal(
      ox.run_onnx(ox.program_to_onnx(prog), np.asarray(x)), got
    )
