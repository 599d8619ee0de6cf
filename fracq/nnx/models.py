"""NNX models of the zoo, and loading linen weights into NNX models.

Zoo models written in NNX with the layer names of their linen versions, so
the same rules quantize both, :func:`load_linen_variables` moves a linen
checkpoint into them, and ``linen_module()`` names the linen twin
(:func:`fracq.nnx.to_linen`; the integer programs and ONNX exports of
:class:`DigitsCNN` and :class:`ResNet` go through it, and F8Net on them,
:func:`fracq.nnx.f8net`, computes through it):

* :class:`DigitsCNN`: :class:`fracq.models.digits_cnn.DigitsCNN`;
* :class:`ResNet`: :class:`fracq.models.resnet.ResNet` with basic blocks
  and the CIFAR stem (ResNet-20/56 layouts at any width);
* :class:`TransformerBlock`: :class:`fracq.models.transformer.
  TransformerBlock` (pre-LN self-attention and GELU MLP, no dropout).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fracq.models import digits_cnn as linen_digits
from fracq.models import resnet as linen_resnet
from fracq.models import transformer as linen_transformer
from fracq.nnx.variables import QuantParam
from fracq.nnx.variables import QuantStat

__all__ = [
  'MODELS',
  'DigitsCNN',
  'ResNet',
  'TransformerBlock',
  'get_model',
  'load_linen_variables',
]

# The linen collection of each NNX variable type a model's own state uses.
_LINEN_COLLECTIONS = ((nnx.BatchStat, 'batch_stats'), (nnx.Param, 'params'))


class DigitsCNN(nnx.Module):
  """The five-conv CNN for 8x8 digits (layers as in the linen model:
  ``conv_init``, ``bn_init``, ``conv1`` .. ``conv4``, ``bn1`` .. ``bn4``,
  ``head``). Train/eval mode: ``model.train()`` / ``model.eval()``."""

  def __init__(
    self,
    num_classes: int = 10,
    widths: tuple[int, ...] = (32, 64, 64, 128, 128),
    *,
    rngs: nnx.Rngs,
    bn_axis_name: str | None = None,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
  ):
    specs = [
      ('conv_init', 'bn_init', widths[0], (3, 3), 1),
      ('conv1', 'bn1', widths[1], (3, 3), 1),
      ('conv2', 'bn2', widths[2], (3, 3), 2),
      ('conv3', 'bn3', widths[3], (3, 3), 1),
      ('conv4', 'bn4', widths[4], (1, 1), 1),
    ]
    self.blocks = tuple((conv, bn) for conv, bn, *_ in specs)
    in_features = 1
    for conv_name, bn_name, feats, ksize, stride in specs:
      conv = nnx.Conv(
        in_features,
        feats,
        ksize,
        strides=stride,
        padding='SAME',
        use_bias=False,
        rngs=rngs,
      )
      norm = nnx.BatchNorm(
        feats,
        momentum=bn_momentum,
        epsilon=bn_epsilon,
        axis_name=bn_axis_name,
        rngs=rngs,
      )
      setattr(self, conv_name, conv)
      setattr(self, bn_name, norm)
      in_features = feats
    self.head = nnx.Linear(in_features, num_classes, rngs=rngs)
    self.num_classes = num_classes
    self.widths = tuple(widths)
    self.bn_axis_name = bn_axis_name
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon

  def linen_module(self) -> linen_digits.DigitsCNN:
    """The linen model computing the same function with the same layer
    names (the twin :func:`fracq.nnx.to_linen` exports through)."""
    return linen_digits.DigitsCNN(
      num_classes=self.num_classes,
      widths=self.widths,
      bn_axis_name=self.bn_axis_name,
      bn_momentum=self.bn_momentum,
      bn_epsilon=self.bn_epsilon,
    )

  def __call__(self, x):
    x = x.astype(jnp.float32)
    for conv_name, bn_name in self.blocks:
      x = getattr(self, conv_name)(x)
      x = nnx.relu(getattr(self, bn_name)(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x).astype(jnp.float32)


class _BasicBlock(nnx.Module):
  """ResNet's basic block: two 3x3 convs with BatchNorm, a residual add
  (through a 1x1 projection where the shape changes), ReLU."""

  def __init__(
    self,
    in_features: int,
    features: int,
    strides: int,
    *,
    rngs: nnx.Rngs,
    norm_kwargs: dict,
  ):
    pad = ((1, 1), (1, 1))
    self.conv1 = nnx.Conv(
      in_features,
      features,
      (3, 3),
      strides=strides,
      padding=pad,
      use_bias=False,
      rngs=rngs,
    )
    self.bn1 = nnx.BatchNorm(features, rngs=rngs, **norm_kwargs)
    self.conv2 = nnx.Conv(
      features, features, (3, 3), padding=pad, use_bias=False, rngs=rngs
    )
    self.bn2 = nnx.BatchNorm(features, rngs=rngs, **norm_kwargs)
    self.projects = strides != 1 or in_features != features
    if self.projects:
      self.downsample_conv = nnx.Conv(
        in_features,
        features,
        (1, 1),
        strides=strides,
        use_bias=False,
        rngs=rngs,
      )
      self.downsample_bn = nnx.BatchNorm(features, rngs=rngs, **norm_kwargs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x
    if self.projects:
      residual = self.downsample_bn(self.downsample_conv(x))
    return nnx.relu(y + residual)


class ResNet(nnx.Module):
  """A ResNet of basic blocks with the CIFAR stem (3x3 ``conv_init``),
  blocks ``stage{i}_block{j}`` (``conv1``, ``bn1``, ``conv2``, ``bn2``,
  ``downsample_conv``, ``downsample_bn``) and the classifier ``fc``, as the
  linen :class:`fracq.models.resnet.ResNet` with ``cifar_stem=True``
  (ResNet-20: ``stage_sizes=(3, 3, 3)``, ``widths=(16, 32, 64)``)."""

  def __init__(
    self,
    stage_sizes: tuple[int, ...] = (3, 3, 3),
    num_classes: int = 10,
    widths: tuple[int, ...] = (16, 32, 64),
    *,
    in_features: int = 3,
    rngs: nnx.Rngs,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
  ):
    norm_kwargs = dict(momentum=bn_momentum, epsilon=bn_epsilon)
    self.conv_init = nnx.Conv(
      in_features,
      widths[0],
      (3, 3),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      rngs=rngs,
    )
    self.bn_init = nnx.BatchNorm(widths[0], rngs=rngs, **norm_kwargs)
    names = []
    features = widths[0]
    for i, n_blocks in enumerate(stage_sizes):
      for j in range(n_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        name = f'stage{i + 1}_block{j}'
        block = _BasicBlock(
          features, widths[i], strides, rngs=rngs, norm_kwargs=norm_kwargs
        )
        setattr(self, name, block)
        names.append(name)
        features = widths[i]
    self.block_names = tuple(names)
    self.fc = nnx.Linear(features, num_classes, rngs=rngs)
    self.stage_sizes = tuple(stage_sizes)
    self.num_classes = num_classes
    self.widths = tuple(widths)
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon

  def __call__(self, x):
    x = nnx.relu(self.bn_init(self.conv_init(x.astype(jnp.float32))))
    for name in self.block_names:
      x = getattr(self, name)(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x).astype(jnp.float32)

  def linen_module(self) -> linen_resnet.ResNet:
    """The linen twin (see :func:`fracq.nnx.to_linen`)."""
    return linen_resnet.ResNet(
      stage_sizes=self.stage_sizes,
      num_classes=self.num_classes,
      widths=self.widths,
      cifar_stem=True,
      bn_momentum=self.bn_momentum,
      bn_epsilon=self.bn_epsilon,
    )


class TransformerBlock(nnx.Module):
  """One pre-LN transformer block: ``x + attn(ln1(x))``, then ``x +
  mlp_down(gelu(mlp_up(ln2(x))))`` (``attn``: ``nnx.MultiHeadAttention``
  with ``query``, ``key``, ``value`` and ``out`` projections)."""

  def __init__(
    self, features: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs
  ):
    self.ln1 = nnx.LayerNorm(features, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads, features, decode=False, keep_rngs=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(features, rngs=rngs)
    self.mlp_up = nnx.Linear(features, mlp_dim, rngs=rngs)
    self.mlp_down = nnx.Linear(mlp_dim, features, rngs=rngs)
    self.num_heads = num_heads
    self.mlp_dim = mlp_dim

  def __call__(self, x, mask=None):
    x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
    return x + self.mlp_down(nnx.gelu(self.mlp_up(self.ln2(x))))

  def linen_module(self) -> linen_transformer.TransformerBlock:
    """The linen twin (see :func:`fracq.nnx.to_linen`)."""
    return linen_transformer.TransformerBlock(
      num_heads=self.num_heads, mlp_dim=self.mlp_dim
    )


def _lookup(tree: Mapping[str, Any], parts: list[str]):
  node = tree
  for part in parts:
    node = node[part]
  return node


def load_linen_variables(
  model: nnx.Module,
  variables: Mapping[str, Any],
  *,
  skip: tuple[str, ...] = ('layer',),
) -> None:
  """Copies a linen model's ``params`` and ``batch_stats`` into ``model`` in
  place, matching NNX graph paths to linen module paths (``conv1/kernel``
  to ``params/conv1/kernel``; ``mean``/``var`` of a BatchNorm to
  ``batch_stats``).

  Args:
    model: an NNX model whose layers carry the linen module names.
    variables: the linen variables (``{'params': ..., 'batch_stats': ...}``).
    skip: path parts that NNX adds and linen does not (``layer``: the layer
      inside a quantized layer's wrapper).

  Raises:
    ValueError: naming the NNX variables with no linen counterpart, or of a
      different shape.
  """
  missing, mismatched = [], []
  for path, var in nnx.iter_graph(model):
    collection = next(
      (c for t, c in _LINEN_COLLECTIONS if isinstance(var, t)), None
    )
    if collection is None or isinstance(var, (QuantParam, QuantStat)):
      continue
    parts = [str(p) for p in path if str(p) not in skip]
    try:
      value = np.asarray(_lookup(variables[collection], parts))
    except (KeyError, TypeError):
      missing.append(f'{collection}/{"/".join(parts)}')
      continue
    if value.shape != np.shape(var.get_value()):
      mismatched.append(
        f'{"/".join(parts)}: {value.shape} vs {np.shape(var.get_value())}'
      )
      continue
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  if missing or mismatched:
    raise ValueError(
      'The linen variables do not fit this NNX model: '
      + (f'missing {missing[:10]}' if missing else '')
      + ('; ' if missing and mismatched else '')
      + (f'different shapes {mismatched[:10]}' if mismatched else '')
      + '. Name the NNX layers as the linen modules are named.'
    )


# The NNX models the training loop builds (``config.model_api = 'nnx'``), by
# the name of their linen version in :func:`fracq.models.get_model`.
MODELS: dict[str, type[nnx.Module]] = {'digits_cnn': DigitsCNN}


def get_model(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """The NNX model ``name`` (a key of :data:`MODELS`) built with ``kwargs``.

  Raises:
    ValueError: for a model with no NNX version here.
  """
  if name not in MODELS:
    raise ValueError(
      f'Model {name!r} has no NNX version the training loop can build '
      f'(NNX models: {sorted(MODELS)}); train it with the linen API '
      "(config.model_api='linen'), or quantize your own nnx.Module with "
      'fracq.quantize.'
    )
  return MODELS[name](rngs=rngs, **kwargs)
