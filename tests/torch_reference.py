"""PyTorch re-implementations of zoo models with torchvision's module names.

Tests build torchvision-format state dicts from them (``model.state_dict()``)
and compare the imported Flax model's logits with PyTorch's. Import it with
``pytest.importorskip('tests.torch_reference')``: it needs PyTorch.
"""

import torch

__all__ = [
  'TorchInceptionV3',
  'TorchMobileNetV2',
  'TorchResNet',
  'TorchResNet18',
  'TorchResNet50',
  'randomise_bn',
  'torch',
]

tnn = torch.nn
# The reference models are small: one thread is fastest beside XLA and the
# other test workers on the same cores.
torch.set_num_threads(1)


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


class TorchBottleneck(tnn.Module):
  """torchvision's v1.5 bottleneck: the stride on the 3x3 conv."""

  def __init__(self, cin, width, stride):
    super().__init__()
    cout = width * 4
    self.conv1 = tnn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.conv2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(width)
    self.conv3 = tnn.Conv2d(width, cout, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(cout)
    self.relu = tnn.ReLU()
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = tnn.Sequential(
        tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
      )

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    return self.relu(self.bn3(self.conv3(y)) + idt)


class TorchResNet(tnn.Module):
  """torchvision's ImageNet ResNet layout (module names and ops)."""

  def __init__(self, blocks, bottleneck=False, num_classes=1000):
    super().__init__()
    block = TorchBottleneck if bottleneck else TorchBasicBlock
    expansion = 4 if bottleneck else 1
    self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(64)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
      layer = []
      for j in range(n):
        layer.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
        cin = width * expansion
      setattr(self, f'layer{i + 1}', tnn.Sequential(*layer))
    self.fc = tnn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(4):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.fc(torch.flatten(x.mean((2, 3)), 1))


def TorchResNet18(num_classes=1000):
  return TorchResNet((2, 2, 2, 2), num_classes=num_classes)


def TorchResNet50(num_classes=1000):
  return TorchResNet((3, 4, 6, 3), bottleneck=True, num_classes=num_classes)


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


class _Conv(tnn.Module):
  """torchvision's BasicConv2d: bias-free conv, BatchNorm (eps 0.001), ReLU."""

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


def _avg3(x):
  return torch.nn.functional.avg_pool2d(x, 3, 1, 1)


def _max3s2(x):
  return torch.nn.functional.max_pool2d(x, 3, 2)


class _InceptionA(tnn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = _Conv(cin, 64, 1)
    self.branch5x5_1 = _Conv(cin, 48, 1)
    self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = _Conv(cin, 64, 1)
    self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
    self.branch_pool = _Conv(cin, pool_features, 1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg3(x))
    return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class _InceptionB(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = _Conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = _Conv(cin, 64, 1)
    self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, _max3s2(x)], 1)


class _InceptionC(tnn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = _Conv(cin, 192, 1)
    self.branch7x7_1 = _Conv(cin, c7, 1)
    self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = _Conv(cin, c7, 1)
    self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = _Conv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for i in range(2, 6):
      bd = getattr(self, f'branch7x7dbl_{i}')(bd)
    bp = self.branch_pool(_avg3(x))
    return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class _InceptionD(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = _Conv(cin, 192, 1)
    self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = _Conv(cin, 192, 1)
    self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([b3, b7, _max3s2(x)], 1)


class _InceptionE(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch1x1 = _Conv(cin, 320, 1)
    self.branch3x3_1 = _Conv(cin, 384, 1)
    self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = _Conv(cin, 448, 1)
    self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = _Conv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    bp = self.branch_pool(_avg3(x))
    return torch.cat([self.branch1x1(x), b3, bd, bp], 1)


class _InceptionAux(tnn.Module):
  def __init__(self, cin, num_classes):
    super().__init__()
    self.conv0 = _Conv(cin, 128, 1)
    self.conv1 = _Conv(128, 768, 5)
    self.fc = tnn.Linear(768, num_classes)

  def forward(self, x):
    x = torch.nn.functional.avg_pool2d(x, 5, 3)
    x = self.conv1(self.conv0(x)).mean((2, 3))
    return self.fc(x)


class TorchInceptionV3(tnn.Module):
  """torchvision's inception_v3 layout; ``forward`` gives the eval logits
  (the auxiliary head only holds weights here)."""

  def __init__(self, num_classes=1000, aux_logits=True, transform_input=False):
    super().__init__()
    self.transform_input = transform_input
    self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
    self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
    self.Mixed_5b = _InceptionA(192, 32)
    self.Mixed_5c = _InceptionA(256, 64)
    self.Mixed_5d = _InceptionA(288, 64)
    self.Mixed_6a = _InceptionB(288)
    self.Mixed_6b = _InceptionC(768, 128)
    self.Mixed_6c = _InceptionC(768, 160)
    self.Mixed_6d = _InceptionC(768, 160)
    self.Mixed_6e = _InceptionC(768, 192)
    self.AuxLogits = _InceptionAux(768, num_classes) if aux_logits else None
    self.Mixed_7a = _InceptionD(768)
    self.Mixed_7b = _InceptionE(1280)
    self.Mixed_7c = _InceptionE(2048)
    self.fc = tnn.Linear(2048, num_classes)

  def forward(self, x):
    if self.transform_input:
      # torchvision's: ImageNet-normalised input to the [-1, 1] scaling the
      # ported weights expect.
      mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
      std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
      x = x * (std / 0.5) + (mean - 0.5) / 0.5
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max3s2(x)))
    x = _max3s2(x)
    for block in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e'):
      x = getattr(self, f'Mixed_{block}')(x)
    for block in ('7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{block}')(x)
    return self.fc(x.mean((2, 3)))


def randomise_bn(model, seed):
  """Random BatchNorm statistics and affine terms (not the identity)."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
