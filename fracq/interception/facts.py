"""Per-layer facts recorded on a real input shape.

Cost models (model size, BitOPs) need each layer's weight count and MACs, and
MACs need the output spatial size, which only a real input shape gives. The
interceptor records these facts while it traces the model, so no per-model
counting code is ever written.

MACs are counted per example: the leading axis of a layer's input and output
is taken to be the batch axis.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LayerFacts:
  """What one intercepted layer is and what it costs.

  Attributes:
    path: module path, e.g. ``'stage1_block0/conv1'``.
    layer_type: ``'Dense'``, ``'Conv'``, ...
    kernel_shape: the kernel's shape.
    in_shape: the layer input's shape (with the batch axis).
    out_shape: the layer output's shape (with the batch axis).
    out_axes: kernel axes that index output features (per-channel axis).
    macs: multiply-accumulates per example.
    rule: label of the rule that matched, or ``None`` when none did.
    rule_index: index of that rule in the rule list, or ``None``.
    weight_quantized: whether the kernel is quantized.
    act_quantized: whether the input activation is quantized.
    calls: how many times the layer ran in one forward pass (weight sharing:
      the weight counts once in the size, every call counts in MACs).
  """

  path: str
  layer_type: str
  kernel_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  out_axes: tuple[int, ...]
  macs: int
  rule: str | None
  rule_index: int | None
  weight_quantized: bool
  act_quantized: bool
  calls: int = 1

  @property
  def numel(self) -> int:
    """Weight element count of the kernel (bias not included)."""
    return math.prod(self.kernel_shape)

  @property
  def out_channels(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.out_axes)


@dataclasses.dataclass(frozen=True)
class AttentionFacts:
  """One attention module (``nn.MultiHeadDotProductAttention``) a rule
  matched: the shapes and cost of its two activation-activation matmuls.

  Kept apart from the layers' :class:`LayerFacts` (an attention module has
  no kernel of its own: its projections are layers).

  Attributes:
    path: module path, e.g. ``'block_0/attn'``.
    rule: label of the rule that matched.
    rule_index: index of that rule in the rule list.
    quantized: whether its matmul operands are fake-quantized.
    query_shape, key_shape, value_shape: the operands' shapes, ``(batch...,
      length, heads, head_dim)`` (empty when not quantized: not seen).
    macs: multiply-accumulates per example of ``q . k^T`` and ``probs . v``
      (0 when not quantized).
    calls: how many times the module ran in one forward pass.
  """

  path: str
  rule: str
  rule_index: int
  quantized: bool
  query_shape: tuple[int, ...] = ()
  key_shape: tuple[int, ...] = ()
  value_shape: tuple[int, ...] = ()
  macs: int = 0
  calls: int = 1


def attention_macs(query_shape, key_shape, value_shape) -> int:
  """MACs per example of ``q . k^T`` and ``probs . v`` on operands of
  shape ``(batch, ..., length, heads, head_dim)``: ``heads * q_len * kv_len
  * (qk_depth + v_depth)`` times the inner batch axes."""
  *batch, q_len, heads, depth = query_shape
  kv_len = key_shape[-3]
  inner = math.prod(batch[1:]) if batch else 1
  return inner * heads * q_len * kv_len * (depth + value_shape[-1])


def kernel_out_axes(
  layer_type: str,
  kernel_ndim: int,
  *,
  n_features: int = 1,
  transpose_kernel: bool = False,
  einsum_str: str | None = None,
) -> tuple[int, ...]:
  """Kernel axes that index the layer's output features."""
  if layer_type in ('Dense', 'Conv'):
    return (kernel_ndim - 1,)
  if layer_type == 'Embed':  # the table's rows: one per token
    return (0,)
  if layer_type == 'DenseGeneral':
    return tuple(range(kernel_ndim - n_features, kernel_ndim))
  if layer_type == 'ConvTranspose':
    return (kernel_ndim - 2,) if transpose_kernel else (kernel_ndim - 1,)
  if layer_type == 'Einsum':
    lhs, out = einsum_str.replace(' ', '').split('->')
    _, rhs = lhs.split(',')
    return tuple(i for i, c in enumerate(rhs) if c in out)
  raise ValueError(f'No kernel layout known for layer type {layer_type!r}.')


def count_macs(
  layer_type: str,
  kernel_shape,
  in_shape,
  out_shape,
  out_axes,
  *,
  einsum_str: str | None = None,
  lookup: bool = False,
) -> int:
  """Multiply-accumulates per example of one layer call.

  Dense/Conv/DenseGeneral: every output element costs one MAC per kernel
  element feeding it, i.e. ``out_per_example * numel / out_features`` (this
  also holds for grouped and depthwise convs, whose kernel only holds
  ``in/groups`` input channels). ConvTranspose: every input element is
  scattered through ``numel / in_features`` kernel weights. Einsum: output
  elements times the product of the contracted dimensions. Embed: a lookup
  (``lookup=True``) gathers rows, 0 MACs; ``attend`` is a Dense against the
  table's rows (``numel / vocabulary`` MACs per output element).
  """
  if lookup:
    return 0
  numel = math.prod(kernel_shape)
  if not in_shape or not out_shape:
    return 0
  batch = max(int(out_shape[0]), 1)
  out_per_example = math.prod(out_shape) // batch
  if layer_type == 'ConvTranspose':
    in_per_example = math.prod(in_shape) // max(int(in_shape[0]), 1)
    n_out = math.prod(kernel_shape[a] for a in out_axes)
    # Non-output channel axis of the (.., in, out) or (.., out, in) kernel.
    in_features = kernel_shape[-2] * kernel_shape[-1] // n_out
    return in_per_example * numel // in_features
  if layer_type == 'Einsum':
    lhs, out = einsum_str.replace(' ', '').split('->')
    x_labels, k_labels = lhs.split(',')
    sizes = dict(zip(k_labels, kernel_shape))
    contracted = [c for c in k_labels if c in x_labels and c not in out]
    return out_per_example * math.prod(sizes[c] for c in contracted)
  n_out = math.prod(kernel_shape[a] for a in out_axes)
  return out_per_example * numel // n_out


def format_facts_table(
  facts: dict[str, LayerFacts], extra: dict[str, dict[str, str]] | None = None
) -> str:
  """A table a person reads: one row per layer, what was quantized and how.

  Args:
    facts: per-layer facts keyed by path.
    extra: optional extra columns per path (e.g. learned bits).
  """
  extra = extra or {}
  extra_cols = sorted({k for row in extra.values() for k in row})
  header = [
    'layer',
    'type',
    'kernel',
    'params',
    'MACs',
    'weight',
    'act',
    'rule',
  ] + extra_cols
  rows = []
  for path, f in facts.items():
    row = [
      path,
      f.layer_type,
      'x'.join(map(str, f.kernel_shape)),
      f'{f.numel:,}',
      f'{f.macs:,}',
      'quant' if f.weight_quantized else 'float',
      'quant' if f.act_quantized else 'float',
      f.rule or '-',
    ]
    row += [extra.get(path, {}).get(c, '') for c in extra_cols]
    rows.append(row)
  widths = [
    max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))
  ]
  line = lambda r: '  '.join(str(c).ljust(w) for c, w in zip(r, widths))
  out = [line(header), line(['-' * w for w in widths])]
  out += [line(r) for r in rows]
  total_p = sum(f.numel for f in facts.values())
  total_m = sum(f.macs for f in facts.values())
  out.append(
    f'{len(facts)} layers, {total_p:,} kernel params, '
    f'{total_m:,} MACs per example'
  )
  return '\n'.join(out)
