"""Model zoo: parameter counts, forward/backward, torchvision weight import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import models
from fracq.models import import_weights as iw


def count(name, shape, **kw):
  m = models.get_model(name, **kw)
  v = jax.eval_shape(
    lambda: m.init(jax.random.key(0), jnp.ones(shape), train=False)
  )
  return sum(x.size for x in jax.tree_util.tree_leaves(v['params']))


@pytest.mark.parametrize(
  'name,shape,expected',
  [
    # torchvision's published counts.
    ('resnet18', (1, 224, 224, 3), 11_689_512),
    ('resnet34', (1, 224, 224, 3), 21_797_672),
    ('resnet50', (1, 224, 224, 3), 25_557_032),
    ('mobilenet_v2', (1, 224, 224, 3), 3_504_872),
    ('inception_v3', (1, 299, 299, 3), 27_161_264),  # with the aux head
    # MobileNet-V1 1.0-224 with BN and a 1000-way FC (the paper's 4.2M).
    ('mobilenet_v1', (1, 224, 224, 3), 4_231_976),
    # CIFAR ResNet-20/56 with 1x1 projection shortcuts (option B).
    ('resnet20', (1, 32, 32, 3), 272_474),
    ('resnet56', (1, 32, 32, 3), 855_770),
  ],
)
def test_parameter_counts(name, shape, expected):
  assert count(name, shape) == expected


def test_inception_without_aux_and_registry_errors():
  assert count('inception_v3', (1, 299, 299, 3), aux_logits=False) == 23_834_568
  with pytest.raises(ValueError, match='valid names'):
    models.get_model('resnet19')


@pytest.mark.parametrize(
  'name,shape',
  [
    ('digits_cnn', (2, 8, 8, 1)),
    ('resnet_tiny', (2, 16, 16, 3)),
    ('resnet_tiny_bottleneck', (2, 32, 32, 3)),
    ('mobilenet_v2_tiny', (2, 16, 16, 3)),
    ('mobilenet_v1_tiny', (2, 16, 16, 3)),
  ],
)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_tiny_variants_train_and_eval(name, shape, dtype):
  m = models.get_model(name, num_classes=10, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), shape)
  v = m.init(
    {'params': jax.random.key(1), 'dropout': jax.random.key(2)}, x, train=False
  )

  def loss(p):
    out, upd = m.apply(
      {**v, 'params': p},
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(3)},
    )
    return jnp.mean(out**2), upd

  (loss_value, upd), g = jax.value_and_grad(loss, has_aux=True)(v['params'])
  assert np.isfinite(float(loss_value))
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
  out = m.apply({**v, **upd}, x, train=False)
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  assert v['params'][list(v['params'])[0]]['kernel'].dtype == jnp.float32


def test_inception_outputs_with_and_without_aux():
  # Shape-level trace of the full model (compiling it is slow on CPU): the
  # aux head answers only in training mode.
  m = models.get_model('inception_v3', num_classes=7)
  x = jnp.ones((2, 75, 75, 3))
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
  out, aux = jax.eval_shape(
    lambda v: m.apply(
      v,
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(1)},
    )[0],
    v,
  )
  assert out.shape == aux.shape == (2, 7)
  assert jax.eval_shape(lambda v: m.apply(v, x, train=False), v).shape == (2, 7)


# -- torchvision-format import, checked against PyTorch -----------------------

tref = pytest.importorskip('tests.torch_reference')
torch = tref.torch


@pytest.mark.parametrize(
  'tmodel,name,family',
  [
    (tref.TorchResNet18, 'resnet18', 'resnet'),
    (tref.TorchMobileNetV2, 'mobilenet_v2', 'mobilenet_v2'),
  ],
)
def test_imported_weights_match_pytorch_logits(tmodel, name, family, tmp_path):
  torch.manual_seed(0)
  tm = tmodel().eval()
  with torch.no_grad():
    tref.randomise_bn(tm, 1)
  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.tensor(x)).numpy()
  path = tmp_path / 'w.pth'
  torch.save(tm.state_dict(), path)
  fm = models.get_model(name)
  xf = jnp.asarray(x.transpose(0, 2, 3, 1))
  # A zero template (random initialisation of the full model is slow on
  # CPU and every value is replaced).
  v = jax.tree_util.tree_map(
    lambda s: np.zeros(s.shape, s.dtype),
    jax.eval_shape(lambda: fm.init(jax.random.key(0), xf, train=False)),
  )
  v = iw.import_torchvision(v, iw.load_state_dict(str(path)), family)
  # Compiled: op-by-op dispatch of the full model is slower on CPU.
  out = jax.jit(lambda v, x: fm.apply(v, x, train=False))(v, xf)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  # The .npz route gives the same variables.
  npz = tmp_path / 'w.npz'
  np.savez(npz, **{k: t.numpy() for k, t in tm.state_dict().items()})
  v2 = iw.import_torchvision(v, iw.load_state_dict(str(npz)), family)
  jax.tree_util.tree_map(np.testing.assert_array_equal, v2, v)


def test_import_mismatch_names_layers():
  fm = models.get_model('resnet18')
  v = jax.eval_shape(
    lambda: fm.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)), train=False)
  )
  v = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), v)
  sd = {k: t.numpy() for k, t in tref.TorchResNet18().state_dict().items()}
  del sd['layer2.0.conv1.weight']
  sd['layer9.extra'] = np.zeros(3)
  sd['fc.weight'] = np.zeros((10, 512), np.float32)
  with pytest.raises(ValueError) as e:
    iw.import_torchvision(v, sd, 'resnet')
  msg = str(e.value)
  assert "missing ['layer2.0.conv1.weight']" in msg
  assert "unexpected ['layer9.extra']" in msg
  assert 'fc.weight: checkpoint (512, 10) vs model (512, 1000)' in msg
