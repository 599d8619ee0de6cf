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

torch = pytest.importorskip('torch')
tnn = torch.nn


class TorchBasicBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.relu = tnn.ReLU()
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = tnn.Sequential(
        tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
      )

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(y)) + idt)


class TorchResNet18(tnn.Module):
  """torchvision's resnet18 layout (module names and ops)."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(64)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    chans, cin = [64, 128, 256, 512], 64
    for i, c in enumerate(chans):
      s = 1 if i == 0 else 2
      setattr(
        self,
        f'layer{i + 1}',
        tnn.Sequential(TorchBasicBlock(cin, c, s), TorchBasicBlock(c, c, 1)),
      )
      cin = c
    self.fc = tnn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(4):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.fc(torch.flatten(x.mean((2, 3)), 1))


def _cbr(cin, cout, k, s, groups=1):
  return tnn.Sequential(
    tnn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
    tnn.BatchNorm2d(cout),
    tnn.ReLU6(),
  )


class TorchInvRes(tnn.Module):
  def __init__(self, cin, cout, s, t):
    super().__init__()
    hid = cin * t
    self.use_res = s == 1 and cin == cout
    layers = [] if t == 1 else [_cbr(cin, hid, 1, 1)]
    layers += [
      _cbr(hid, hid, 3, s, groups=hid),
      tnn.Conv2d(hid, cout, 1, 1, 0, bias=False),
      tnn.BatchNorm2d(cout),
    ]
    self.conv = tnn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res else self.conv(x)


class TorchMobileNetV2(tnn.Module):
  """torchvision's mobilenet_v2 layout (width 1.0)."""

  def __init__(self, num_classes=1000):
    super().__init__()
    feats, cin = [_cbr(3, 32, 3, 2)], 32
    for t, c, n, s in (
      (1, 16, 1, 1),
      (6, 24, 2, 2),
      (6, 32, 3, 2),
      (6, 64, 4, 2),
      (6, 96, 3, 1),
      (6, 160, 3, 2),
      (6, 320, 1, 1),
    ):
      for j in range(n):
        feats.append(TorchInvRes(cin, c, s if j == 0 else 1, t))
        cin = c
    feats.append(_cbr(320, 1280, 1, 1))
    self.features = tnn.Sequential(*feats)
    self.classifier = tnn.Sequential(
      tnn.Dropout(0.2), tnn.Linear(1280, num_classes)
    )

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


def _randomise_bn(model, seed):
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize(
  'tmodel,name,family',
  [
    (TorchResNet18, 'resnet18', 'resnet'),
    (TorchMobileNetV2, 'mobilenet_v2', 'mobilenet_v2'),
  ],
)
def test_imported_weights_match_pytorch_logits(tmodel, name, family, tmp_path):
  torch.manual_seed(0)
  tm = tmodel().eval()
  with torch.no_grad():
    _randomise_bn(tm, 1)
  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.tensor(x)).numpy()
  path = tmp_path / 'w.pth'
  torch.save(tm.state_dict(), path)
  fm = models.get_model(name)
  xf = jnp.asarray(x.transpose(0, 2, 3, 1))
  v = fm.init(jax.random.key(0), xf, train=False)
  v = iw.import_torchvision(v, iw.load_state_dict(str(path)), family)
  out = fm.apply(v, xf, train=False)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  # The .npz route gives the same variables.
  npz = tmp_path / 'w.npz'
  np.savez(npz, **{k: t.numpy() for k, t in tm.state_dict().items()})
  v2 = iw.import_torchvision(v, iw.load_state_dict(str(npz)), family)
  np.testing.assert_array_equal(fm.apply(v2, xf, train=False), out)


def test_import_mismatch_names_layers():
  fm = models.get_model('resnet18')
  v = jax.eval_shape(
    lambda: fm.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)), train=False)
  )
  v = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), v)
  sd = {k: t.numpy() for k, t in TorchResNet18().state_dict().items()}
  del sd['layer2.0.conv1.weight']
  sd['layer9.extra'] = np.zeros(3)
  sd['fc.weight'] = np.zeros((10, 512), np.float32)
  with pytest.raises(ValueError) as e:
    iw.import_torchvision(v, sd, 'resnet')
  msg = str(e.value)
  assert "missing ['layer2.0.conv1.weight']" in msg
  assert "unexpected ['layer9.extra']" in msg
  assert 'fc.weight: checkpoint (512, 10) vs model (512, 1000)' in msg
