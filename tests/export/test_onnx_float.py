"""Float32 ONNX export: onnxruntime reproduces the Flax float model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import models
from fracq.export import onnx_float

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')


def _with_statistics(variables, seed=0):
  """``variables`` with BatchNorm statistics and affine parameters off
  their init (mean 0, var 1, scale 1, bias 0), so the folding is tested."""
  rng = np.random.default_rng(seed)

  def move(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if any(k in name for k in ("'mean'", "'bias'")):
      return leaf + 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
    if "'scale'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return np.asarray(leaf)

  return jax.tree_util.tree_map_with_path(move, variables)


@pytest.mark.parametrize(
  'name,shape,ops',
  [
    ('digits_cnn', (3, 8, 8, 1), {'Conv': 5, 'Relu': 5, 'Gemm': 1}),
    ('resnet_tiny', (2, 16, 16, 3), {'Add': 2, 'GlobalAveragePool': 1}),
    ('mobilenet_v2_tiny', (2, 16, 16, 3), {'Clip': 9}),
  ],
)
def test_onnxruntime_equals_flax(tmp_path, name, shape, ops):
  module = models.get_model(name)
  x = jax.random.normal(jax.random.key(1), shape)
  init = jax.jit(module.init, static_argnames='train')
  variables = _with_statistics(init(jax.random.key(0), x, train=False))
  path = str(tmp_path / f'{name}.onnx')
  rep = onnx_float.export_float_onnx(module, variables, x, path)
  ref = np.asarray(
    jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  )
  got = onnx_float.run_onnx(path, np.asarray(x))
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
  assert rep['max_abs_diff'] <= 1e-4
  # BatchNorm folded into the convolutions: no Mul / Sub / Div left.
  for op_type, count in ops.items():
    assert rep['onnx_ops'][op_type] == count, rep['onnx_ops']
  assert not {'Mul', 'Sub', 'Div', 'BatchNormalization'} & set(rep['onnx_ops'])
  # The batch size is dynamic.
  one = onnx_float.run_onnx(path, np.asarray(x[:1]))
  np.testing.assert_allclose(one, ref[:1], atol=1e-4, rtol=1e-4)


class _Pools(nn.Module):
  """Max / average pools, a concatenation and a clamp, on NHWC."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    branch = nn.Conv(4, (3, 3), strides=2)(x)
    pooled = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    avg = nn.avg_pool(x, (2, 2), strides=(2, 2))
    y = jnp.concatenate([branch, pooled, avg], axis=-1)
    y = jnp.clip(y, -0.5, 0.75)
    return nn.Dense(3)(y.reshape((y.shape[0], -1)))


def test_pools_concat_clip_flatten():
  module = _Pools()
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  variables = module.init(jax.random.key(0), x)
  info = {}
  model = onnx_float.float_to_onnx(module, variables, x, report=info)
  got = onnx_float.run_onnx(model, np.asarray(x))
  # An independent reference: the same computation in numpy.
  xs = np.asarray(x, np.float64)
  params = jax.tree_util.tree_map(
    lambda a: np.asarray(a, np.float64), variables['params']
  )
  # 'SAME' with stride 2 on 8 pixels pads 0 before, 1 after.
  padded = np.pad(xs, ((0, 0), (0, 1), (0, 1), (0, 0)))
  conv = np.zeros((2, 4, 4, 4))
  pooled = np.zeros((2, 4, 4, 3))
  padded_max = np.pad(
    xs, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf
  )
  for i in range(4):
    for j in range(4):
      patch = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
      conv[:, i, j] = np.einsum(
        'nhwc,hwco->no', patch, params['Conv_0']['kernel']
      )
      window = padded_max[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
      pooled[:, i, j] = window.max(axis=(1, 2))
  conv += params['Conv_0']['bias']
  avg = xs.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
  y = np.clip(np.concatenate([conv, pooled, avg], -1), -0.5, 0.75)
  ref = (
    y.reshape(2, -1) @ params['Dense_0']['kernel'] + params['Dense_0']['bias']
  )
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert {'MaxPool', 'AveragePool', 'Concat', 'Clip', 'Reshape'} <= set(
    info['onnx_ops']
  )


class _Sorts(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return jnp.sort(nn.Dense(4)(x), axis=-1)


def test_untranslatable_primitive_is_named():
  module = _Sorts()
  x = jnp.ones((2, 3))
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="primitive 'sort'"):
    onnx_float.float_to_onnx(module, variables, x)


def test_vision_transformer(tmp_path):
  module = models.get_model('vit_tiny')
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  variables = jax.jit(module.init, static_argnames='train')(
    jax.random.key(0), x, train=False
  )
  rng = np.random.default_rng(0)
  # Every parameter off its init (the head starts at zero).
  variables = jax.tree_util.tree_map(
    lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape, np.float32),
    variables,
  )
  path = str(tmp_path / 'vit.onnx')
  rep = onnx_float.export_float_onnx(module, variables, x, path)
  ref = np.asarray(
    jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  )
  assert np.ptp(ref) > 0.1
  got = onnx_float.run_onnx(path, np.asarray(x))
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
  assert rep['onnx_ops']['Einsum'] > 0  # attention's activation products
  # The class token follows the batch size.
  np.testing.assert_allclose(
    onnx_float.run_onnx(path, np.asarray(x[:1])), ref[:1], atol=1e-4
  )
