"""PyTorch re-implementations of zoo models with torchvision's module names.

Tests build torchvision-format state dicts from them (``model.state_dict()``)
and compare the imported Flax model's logits with PyTorch's. Import it with
``pytest.importorskip('tests.torch_reference')``: it needs PyTorch.
"""

import torch

__all__ = [
  'TorchMobileNetV2',
  'TorchResNet18',
  'randomise_bn',
  'torch',
]

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


def randomise_bn(model, seed):
  """Random BatchNorm statistics and affine terms (not the identity)."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
