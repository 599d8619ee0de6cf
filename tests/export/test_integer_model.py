"""Integer-only programs: equal to the fake-quantized models on digits."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_f8net
from configs import digits_fracbits
from fracq import export
from fracq.core import integer as ints
from fracq.data import digits
from fracq.methods.f8net import F8NetModel
from tests import helpers


def assert_equal_up_to_code_flips(got, sim):
  """The integer program against the float32 fake-quantized model.

  The simulation computes each activation code as ``round(x / s)`` in
  float32, so an activation within float rounding of a code boundary can
  land on the neighbouring code: such a flip at the last hidden layer moves
  a logit by ~5e-4..8e-4 of the logit range (measured on this model), and
  which images flip depends on float summation order (1 or 8 devices). A
  systematic error (a wrong scale, shift or rounding rule) moves every
  image; flips move some (2-7% of the 360 images here, depending on the
  run). So: equal predictions, at least 80% of the images equal to float
  rounding (1e-5 of the range; the rest differ by whole flips), and no
  image off by more than a few flips.
  """
  np.testing.assert_array_equal(got.argmax(1), sim.argmax(1))
  rel = np.abs(got - sim).max(axis=1) / np.ptp(sim)
  assert np.mean(rel < 1e-5) >= 0.8, np.sort(rel)[-40:]
  assert rel.max() < 3e-3, rel.max()


@pytest.fixture(scope='module')
def test_set():
  _, _, xte, yte = digits.load_digits_split()
  return jnp.asarray(xte), yte


@pytest.fixture(scope='module')
def f8(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('f8'))
  return (*helpers.train_digits(digits_f8net.get_config, None, wd, 80), wd)


@pytest.fixture(scope='module')
def fracbits(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('fb'))
  return (
    *helpers.train_digits(
      digits_fracbits.get_config, None, wd, 80, hard_assign_step=60
    ),
    wd,
  )


def test_f8net_integer_program_is_bit_exact_on_digits(f8, test_set):
  wrapper, v, metrics, wd = f8
  x, y = test_set
  assert isinstance(wrapper, F8NetModel)
  prog = export.lower_f8net(wrapper, v, x)
  sim = np.asarray(wrapper.apply(v, x, train=False))
  codes = prog.quantize_input(x)
  acc = prog(codes)
  assert codes.dtype == jnp.int8 and acc.dtype == jnp.int32
  got = np.asarray(prog.logits(x))
  # Every one of the 360 test images: identical predictions and logits.
  np.testing.assert_array_equal(got.argmax(1), sim.argmax(1))
  np.testing.assert_array_equal(got, sim)
  assert np.mean(got.argmax(1) == y) > 0.9
  # Integer dtypes end to end: no float multiply, dot or conv anywhere.
  jaxpr = ints.assert_integer_only(prog, codes)
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert 'conv_general_dilated' in prims and 'dot_general' in prims
  # ... while dequantizing the output is caught as a float multiply.
  with pytest.raises(AssertionError, match='float multiply'):
    ints.assert_integer_only(prog.logits, x)
  # Quantizing the images and dequantizing the logits are the only float
  # steps.
  ints.assert_integer_only(prog.logits, x, boundary=True)
  # The exported program (launch --config.export=True) runs the same.
  path = os.path.join(wd, 'model.int.safetensors')
  loaded = export.load_program(path)
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)), got)
  assert (
    'integer-only program' in open(os.path.join(wd, 'size_report.txt')).read()
  )
  assert metrics['integer_prediction_match'] == 1.0


def test_fracbits_integer_program_matches_fake_quant(fracbits, test_set):
  wrapper, v, _, wd = fracbits
  x, _ = test_set
  prog = export.lower_qat(wrapper, v, x)
  sim = np.asarray(wrapper.apply(v, x, train=False))
  got = np.asarray(prog.logits(x))
  assert_equal_up_to_code_flips(got, sim)
  ints.assert_integer_only(prog, prog.quantize_input(x))
  # Kernel codes are stored at the learned bits: the program's size on disk
  # is within 2% of its theoretical size.
  rep = export.export_integer(wrapper, v, x[:64], os.path.join(wd, 'again'))
  assert rep['program_bytes'] <= 1.02 * rep['program_theoretical_bytes']
  frozen = export.freeze(wrapper, v)
  bits = {p: int(np.max(f.bits)) for p, f in frozen.items()}
  assert min(bits.values()) < 8  # mixed precision really was packed


def test_program_artifact_errors(f8, fracbits, tmp_path):
  wd = f8[-1]
  path = os.path.join(wd, 'model.int.safetensors')
  blob = bytearray(open(path, 'rb').read())
  blob[len(blob) // 2] ^= 0x5A
  bad = str(tmp_path / 'bad.safetensors')
  open(bad, 'wb').write(bytes(blob))
  with pytest.raises(export.ArtifactError, match='checksum|corrupt'):
    export.load_program(bad)
  # A packed-weights artifact is not a program.
  with pytest.raises(export.ArtifactError, match='no integer program'):
    export.load_program(os.path.join(fracbits[-1], 'model.fracq.safetensors'))
  # Never overwrites an earlier export.
  with pytest.raises(FileExistsError):
    export.save_program(export.load_program(path), path)


def test_unsupported_structure_is_refused(test_set):
  """Structures the lowering does not represent are refused clearly: a
  concatenation (its reader's input is no earlier tensor) and ReLU6 (found
  in the computation, not from values: below 6 it looks like ReLU)."""
  x = test_set[0][:8]

  class Concat(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      del train
      a = nn.relu(nn.Conv(4, (3, 3), name='a')(x))
      b = nn.relu(nn.Conv(4, (3, 3), name='b')(x))
      y = nn.Conv(4, (3, 3), name='c')(jnp.concatenate([a, b], -1))
      return nn.Dense(10, name='head')(jnp.mean(nn.relu(y), axis=(1, 2)))

  f8w = F8NetModel(Concat(), x)
  v = f8w.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='not such a chain'):
    export.lower_f8net(f8w, v, x)

  class Relu6Chain(nn.Module):  # MobileNet-V2's activation in a chain
    @nn.compact
    def __call__(self, x, train=False):
      del train
      y = nn.relu6(nn.Conv(4, (3, 3), name='a')(x))
      y = nn.relu(nn.Conv(4, (3, 3), name='b')(y))
      return nn.Dense(10, name='head')(jnp.mean(y, axis=(1, 2)))

  f8w = F8NetModel(Relu6Chain(), x)
  v = f8w.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='ReLU6'):
    export.lower_f8net(f8w, v, x)
