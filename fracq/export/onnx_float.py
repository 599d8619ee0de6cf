"""Float32 ONNX export of a Flax model: the baseline a QDQ export is timed
against.

:func:`float_to_onnx` traces the float model's inference call
(``jax.make_jaxpr``) with its variables as constants and translates the
trace into a standard ONNX graph, so the graph computes what the Flax model
computes without reading the model code:

* Every computation on constants alone (BatchNorm statistics, reshaped
  biases) is evaluated at export time.
* ``Conv`` / ``Gemm`` absorb the per-output-channel affine operations that
  follow them (bias, inference BatchNorm: add / sub / mul / div by a
  constant varying along channels only), so a Conv -> BN -> ReLU block is one
  ``Conv`` with folded weights and a ``Relu`` (what onnxruntime fuses into
  one kernel).
* Images stay NCHW inside the graph: the input is NHWC (as fracq models and
  :func:`~fracq.export.onnx_export.program_to_onnx` take it) and each tensor
  is converted to the layout its reader needs by one ``Transpose``, created
  once. Transformer-style tensors are never transposed.
* ``max(x, 0)`` becomes ``Relu``, a clamp by scalars ``Clip`` (ReLU6),
  ``jnp.mean`` over the spatial axes ``GlobalAveragePool``, max / average
  pools ``MaxPool`` / ``AveragePool``, ``jnp.concatenate`` ``Concat``;
  other matrix products become ``Einsum``.

:func:`export_float_onnx` writes the file and checks onnxruntime's output
against the Flax model on the sample batch. An operation with no
translation raises a ValueError naming the JAX primitive.
"""

from __future__ import annotations

import dataclasses
import os
import string
from typing import Any

import jax
import jax.extend
import numpy as np

from fracq.export.onnx_export import import_onnx
from fracq.export.onnx_export import checked_model
from fracq.export.onnx_export import run_onnx

__all__ = ['export_float_onnx', 'float_to_onnx']


_NCHW = (0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """A graph tensor holding ``np.transpose(jax_value, perm)``."""

  name: str
  shape: tuple  # the JAX shape
  perm: tuple


@dataclasses.dataclass(frozen=True)
class _Linear:
  """A Conv / matrix product not yet emitted, with its output-channel
  affine ``y * scale + shift`` folded into ``kernel`` and ``bias``.

  ``kernel`` is HWIO for a Conv, ``(in, out)`` for a matrix product.
  """

  kind: str  # 'conv' or 'dense'
  source: _Tensor
  kernel: np.ndarray
  bias: np.ndarray
  attrs: tuple  # conv: (strides, pads, dilations, groups)
  shape: tuple  # the JAX output shape


@dataclasses.dataclass(frozen=True)
class _SpatialSum:
  """``sum over H, W`` of an image, times ``factor`` (a global average pool
  times ``factor * H * W``), not yet emitted."""

  source: _Tensor
  factor: float
  shape: tuple


def _is_call(eqn) -> bool:
  return any(k in eqn.params for k in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'))


def _inner(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in eqn.params:
      return eqn.params[key]
  raise AssertionError(eqn)


class _Converter:
  """Translates one traced jaxpr into ONNX nodes and initializers."""

  def __init__(self, onnx, batch: int):
    self.onnx = onnx
    self.batch = batch
    self.nodes, self.inits = [], []
    self.count = 0
    self.transposed: dict[tuple, _Tensor] = {}
    self.materialized: dict[int, _Tensor] = {}
    self.ops: dict[str, int] = {}

  # Graph building.

  def name(self, base: str) -> str:
    self.count += 1
    return f'{base}_{self.count}'

  def const(self, base: str, value) -> str:
    name = self.name(base)
    value = np.asarray(value)
    if value.dtype == np.float64:
      value = value.astype(np.float32)
    self.inits.append(self.onnx.numpy_helper.from_array(value, name))
    return name

  def node(self, op_type: str, inputs, base: str | None = None, **attrs):
    out = self.name(base or op_type.lower())
    self.nodes.append(
      self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs)
    )
    return out

  # Values: numpy constants, _Tensor, or the lazy _Linear / _SpatialSum.

  def tensor(self, value, perm: tuple | None = None) -> _Tensor:
    """``value`` as a graph tensor, in layout ``perm`` if given."""
    if isinstance(value, (_Linear, _SpatialSum)):
      key = id(value)
      if key not in self.materialized:
        self.materialized[key] = (
          self._emit_linear(value)
          if isinstance(value, _Linear)
          else self._emit_spatial_sum(value)
        )
      value = self.materialized[key]
    if not isinstance(value, _Tensor):
      raise AssertionError(value)
    if perm is None or tuple(perm) == value.perm:
      return value
    key = (value.name, tuple(perm))
    if key not in self.transposed:
      # stored = jax.transpose(value.perm); wanted = jax.transpose(perm)
      order = [value.perm.index(axis) for axis in perm]
      name = self.node('Transpose', [value.name], 'transpose', perm=order)
      self.transposed[key] = _Tensor(name, value.shape, tuple(perm))
    return self.transposed[key]

  def _emit_linear(self, lin: _Linear) -> _Tensor:
    if lin.kind == 'conv':
      strides, pads, dilations, groups = lin.attrs
      source = self.tensor(lin.source, _NCHW)
      kernel = np.transpose(lin.kernel, (3, 2, 0, 1))  # HWIO -> OIHW
      out = self.node(
        'Conv',
        [source.name, self.const('w', kernel), self.const('b', lin.bias)],
        'conv',
        strides=list(strides),
        pads=list(pads),
        dilations=list(dilations),
        group=int(groups),
      )
      return _Tensor(out, lin.shape, _NCHW)
    source = self.tensor(lin.source, tuple(range(len(lin.source.shape))))
    kernel_name = self.const('w', lin.kernel)
    bias_name = self.const('b', lin.bias)
    if len(source.shape) == 2:
      out = self.node('Gemm', [source.name, kernel_name, bias_name], 'gemm')
    else:
      product = self.node('MatMul', [source.name, kernel_name], 'matmul')
      out = self.node('Add', [product, bias_name], 'add')
    return _Tensor(out, lin.shape, tuple(range(len(lin.shape))))

  def _emit_spatial_sum(self, pool: _SpatialSum) -> _Tensor:
    source = self.tensor(pool.source, _NCHW)
    pooled = self.node('GlobalAveragePool', [source.name], 'gap')
    out = self.node('Flatten', [pooled], 'flatten', axis=1)
    height, width = pool.source.shape[1:3]
    factor = pool.factor * height * width
    if factor != 1.0:
      out = self.node(
        'Mul', [out, self.const('scale', np.float32(factor))], 'mul'
      )
    return _Tensor(out, pool.shape, (0, 1))

  # The trace.

  def run(self, closed, args):
    env = {}
    jaxpr = closed.jaxpr

    def read(var):
      if isinstance(var, jax.extend.core.Literal):
        return np.asarray(var.val)
      return env[var]

    for var, value in zip(jaxpr.constvars, closed.consts):
      env[var] = np.asarray(value)
    for var, value in zip(jaxpr.invars, args):
      env[var] = value
    for eqn in jaxpr.eqns:
      inputs = [read(v) for v in eqn.invars]
      if _is_call(eqn):
        inner = _inner(eqn)
        if not hasattr(inner, 'consts'):
          inner = jax.extend.core.ClosedJaxpr(inner, ())
        outputs = self.run(inner, inputs)
      elif all(isinstance(v, np.ndarray) for v in inputs):
        outputs = self._fold(eqn, inputs)
      else:
        outputs = [self._translate(eqn, inputs)]
      for var, value in zip(eqn.outvars, outputs):
        env[var] = value
    return [read(v) for v in jaxpr.outvars]

  def _fold(self, eqn, inputs):
    """Evaluates an operation on constants (numpy broadcasting kept for the
    elementwise ones, whose constants may be stored unexpanded)."""
    name = eqn.primitive.name
    shape = eqn.outvars[0].aval.shape
    if name == 'broadcast_in_dim':
      return [_unexpanded(inputs[0], shape, eqn.params['broadcast_dimensions'])]
    if name in _NUMPY_BINARY:
      return [np.asarray(_NUMPY_BINARY[name](*inputs))]
    if name in _NUMPY_UNARY:
      return [np.asarray(_NUMPY_UNARY[name](inputs[0]))]
    full = [
      np.broadcast_to(x, v.aval.shape) if hasattr(v, 'aval') else x
      for x, v in zip(inputs, eqn.invars)
    ]
    out = eqn.primitive.bind(*full, **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(o) for o in outs]

  def _translate(self, eqn, inputs):
    name = eqn.primitive.name
    self.ops[name] = self.ops.get(name, 0) + 1
    shape = tuple(eqn.outvars[0].aval.shape)
    params = eqn.params
    if name == 'conv_general_dilated':
      return self._conv(inputs, params, shape)
    if name == 'dot_general':
      return self._dot(inputs, params, shape)
    if name in ('add', 'sub', 'mul', 'div', 'max', 'min', 'pow'):
      return self._binary(name, inputs, shape)
    if name == 'clamp':
      low, x, high = inputs
      if not (isinstance(low, np.ndarray) and isinstance(high, np.ndarray)):
        raise ValueError('clamp with tensor bounds has no ONNX translation.')
      t = self.tensor(x)
      out = self.node(
        'Clip',
        [t.name, self.const('lo', np.float32(low)), self.const('hi', high)],
        'clip',
      )
      return _Tensor(out, shape, t.perm)
    if name in _ONNX_UNARY:
      t = self.tensor(inputs[0])
      out = t.name
      for op_type in _ONNX_UNARY[name]:
        out = self.node(op_type, [out], op_type.lower())
      return _Tensor(out, shape, t.perm)
    if name == 'integer_pow':
      t = self.tensor(inputs[0])
      exponent = self.const('exponent', np.float32(params['y']))
      return _Tensor(self.node('Pow', [t.name, exponent]), shape, t.perm)
    if name == 'convert_element_type':
      if np.dtype(params['new_dtype']) != np.float32:
        raise ValueError(
          f'convert_element_type to {params["new_dtype"]}: the float ONNX '
          'export handles float32 models only; build the model in float32.'
        )
      return self.tensor(inputs[0])
    if name == 'square':
      t = self.tensor(inputs[0])
      return _Tensor(self.node('Mul', [t.name, t.name]), shape, t.perm)
    if name == 'slice':
      return self._slice(inputs[0], params, shape)
    if name in ('copy', 'copy_p', 'optimization_barrier', 'stop_gradient'):
      return self.tensor(inputs[0])
    if name in ('reduce_sum', 'reduce_max', 'reduce_min'):
      return self._reduce(name, inputs[0], params['axes'], shape)
    if name in ('reduce_window_max', 'reduce_window_sum'):
      return self._pool(name, inputs[0], params, shape)
    if name == 'concatenate':
      shapes = [tuple(v.aval.shape) for v in eqn.invars]
      return self._concat(inputs, shapes, params['dimension'], shape)
    if name == 'reshape':
      return self._reshape(inputs[0], shape)
    if name == 'broadcast_in_dim':
      t = self.tensor(inputs[0], tuple(range(len(inputs[0].shape))))
      new = [
        d for d in range(len(shape)) if d not in params['broadcast_dimensions']
      ]
      if list(params['broadcast_dimensions']) != sorted(
        params['broadcast_dimensions']
      ):
        raise ValueError('broadcast_in_dim reordering dimensions: unsupported.')
      out = t.name
      if new:
        out = self.node(
          'Unsqueeze', [out, self.const('axes', np.asarray(new, np.int64))]
        )
      # ONNX operators broadcast size-1 dimensions themselves.
      return _Tensor(out, shape, tuple(range(len(shape))))
    if name == 'transpose':
      t = self.tensor(inputs[0])
      perm = tuple(params['permutation'])
      # out = in.transpose(perm): stored out in layout q holds
      # in.transpose(perm[q]); keep the stored tensor, relabel its layout.
      stored_in_jax = t.perm
      new_perm = tuple(perm.index(axis) for axis in stored_in_jax)
      return _Tensor(t.name, shape, new_perm)
    if name == 'squeeze':
      t = self.tensor(inputs[0], tuple(range(len(inputs[0].shape))))
      return self._reshape(t, shape)
    raise ValueError(
      f'The float ONNX export has no translation for the JAX primitive '
      f'{name!r} (in {eqn}); export a model built from Conv / Dense / '
      'BatchNorm / pooling / concatenation / elementwise operations.'
    )

  def _conv(self, inputs, params, shape):
    x, kernel = inputs
    if not isinstance(kernel, np.ndarray):
      raise ValueError('A convolution with a computed kernel: unsupported.')
    numbers = params['dimension_numbers']
    if (
      tuple(numbers.lhs_spec) != _NCHW
      or tuple(numbers.rhs_spec) != (3, 2, 0, 1)
      or tuple(numbers.out_spec) != _NCHW
      or len(shape) != 4
    ):
      raise ValueError(
        f'conv_general_dilated with dimension numbers {numbers}: the float '
        'ONNX export takes 2-D NHWC convolutions with HWIO kernels (Flax '
        'nn.Conv).'
      )
    if any(d != 1 for d in params['lhs_dilation']):
      raise ValueError('Transposed convolutions (lhs_dilation) unsupported.')
    if params['batch_group_count'] != 1:
      raise ValueError('batch_group_count != 1 is unsupported.')
    pads = [lo for lo, _ in params['padding']] + [
      hi for _, hi in params['padding']
    ]
    attrs = (
      tuple(params['window_strides']),
      tuple(pads),
      tuple(params['rhs_dilation']),
      params['feature_group_count'],
    )
    cout = kernel.shape[-1]
    return _Linear(
      'conv',
      self.tensor(x),
      kernel.astype(np.float32),
      np.zeros(cout, np.float32),
      attrs,
      shape,
    )

  def _dot(self, inputs, params, shape):
    lhs, rhs = inputs
    (lhs_c, rhs_c), (lhs_b, rhs_b) = params['dimension_numbers']
    if (
      isinstance(rhs, np.ndarray)
      and not lhs_b
      and rhs.ndim == 2
      and tuple(lhs_c) == (len(lhs.shape) - 1,)
      and tuple(rhs_c) in ((0,), (1,))
    ):
      kernel = rhs if tuple(rhs_c) == (0,) else rhs.T
      return _Linear(
        'dense',
        self.tensor(lhs),
        kernel.astype(np.float32),
        np.zeros(kernel.shape[1], np.float32),
        (),
        shape,
      )
    # General contraction: one Einsum (JAX's output order: batch dims, the
    # free lhs dims, the free rhs dims).
    letters = iter(string.ascii_lowercase)
    lhs_rank, rhs_rank = len(lhs.shape), len(rhs.shape)
    lhs_sub = [next(letters) for _ in range(lhs_rank)]
    rhs_sub = [None] * rhs_rank
    for a, b in zip(lhs_c, rhs_c):
      rhs_sub[b] = lhs_sub[a]
    for a, b in zip(lhs_b, rhs_b):
      rhs_sub[b] = lhs_sub[a]
    rhs_sub = [s or next(letters) for s in rhs_sub]
    out_sub = (
      [lhs_sub[a] for a in lhs_b]
      + [lhs_sub[a] for a in range(lhs_rank) if a not in lhs_c + lhs_b]
      + [rhs_sub[b] for b in range(rhs_rank) if b not in rhs_c + rhs_b]
    )
    equation = f'{"".join(lhs_sub)},{"".join(rhs_sub)}->{"".join(out_sub)}'
    names = [
      self.const('w', x.astype(np.float32))
      if isinstance(x, np.ndarray)
      else self.tensor(x, tuple(range(len(x.shape)))).name
      for x in (lhs, rhs)
    ]
    out = self.node('Einsum', names, 'einsum', equation=equation)
    return _Tensor(out, shape, tuple(range(len(shape))))

  def _binary(self, name, inputs, shape):
    a, b = inputs
    const_side = (
      0 if isinstance(a, np.ndarray) else 1 if isinstance(b, np.ndarray) else -1
    )
    if const_side >= 0:
      value = (a, b)[const_side]
      other = (a, b)[1 - const_side]
      folded = _fold_affine(name, other, value, const_side)
      if folded is not None:
        return folded
      t = self.tensor(other)
      if name in ('max', 'min') and np.ptp(value) == 0:
        scalar = np.float32(value.reshape(-1)[0])
        if name == 'max' and scalar == 0:
          return _Tensor(self.node('Relu', [t.name]), shape, t.perm)
        bound = self.const('bound', scalar)
        args = [t.name, bound, ''] if name == 'max' else [t.name, '', bound]
        return _Tensor(self.node('Clip', args, 'clip'), shape, t.perm)
      aligned = np.asarray(value, np.float32).reshape(
        (1,) * (len(shape) - np.ndim(value)) + np.shape(value)
      )
      const = self.const('c', np.transpose(aligned, t.perm))
      args = [t.name, const] if const_side == 1 else [const, t.name]
    else:
      first = self.tensor(a)
      second = self.tensor(b, first.perm)
      t = first
      args = [first.name, second.name]
    op_type = {
      'add': 'Add',
      'sub': 'Sub',
      'mul': 'Mul',
      'div': 'Div',
      'max': 'Max',
      'min': 'Min',
      'pow': 'Pow',
    }[name]
    return _Tensor(self.node(op_type, args), shape, t.perm)

  def _reduce(self, name, x, axes, shape):
    axes = tuple(axes)
    if (
      name == 'reduce_sum'
      and len(x.shape) == 4
      and axes == (1, 2)
      and not isinstance(x, _SpatialSum)
    ):
      return _SpatialSum(self.tensor(x), 1.0, shape)
    t = self.tensor(x)
    onnx_axes = [t.perm.index(a) for a in axes]
    op_type = {
      'reduce_sum': 'ReduceSum',
      'reduce_max': 'ReduceMax',
      'reduce_min': 'ReduceMin',
    }[name]
    out = self.node(
      op_type,
      [t.name, self.const('axes', np.asarray(onnx_axes, np.int64))],
      op_type.lower(),
      keepdims=0,
    )
    kept = [a for a in t.perm if a not in axes]
    perm = tuple(sorted(kept).index(a) for a in kept)
    return _Tensor(out, shape, perm)

  def _pool(self, name, x, params, shape):
    window = tuple(params['window_dimensions'])
    strides = tuple(params['window_strides'])
    padding = tuple(tuple(p) for p in params['padding'])
    if (
      len(window) != 4
      or window[0] != 1
      or window[3] != 1
      or strides[0] != 1
      or strides[3] != 1
      or padding[0] != (0, 0)
      or padding[3] != (0, 0)
      or any(d != 1 for d in params['base_dilation'])
      or any(d != 1 for d in params['window_dilation'])
    ):
      raise ValueError(
        f'{name} with window {window}, strides {strides}, padding '
        f'{padding}: only 2-D spatial pools of NHWC images are exported.'
      )
    t = self.tensor(x, _NCHW)
    attrs = dict(
      kernel_shape=list(window[1:3]),
      strides=list(strides[1:3]),
      pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]],
    )
    if name == 'reduce_window_max':
      return _Tensor(self.node('MaxPool', [t.name], **attrs), shape, _NCHW)
    out = self.node('AveragePool', [t.name], count_include_pad=1, **attrs)
    size = np.float32(window[1] * window[2])
    out = self.node('Mul', [out, self.const('window', size)], 'mul')
    return _Tensor(out, shape, _NCHW)

  def _concat(self, inputs, shapes, dimension, shape):
    tensors = [x for x in inputs if not isinstance(x, np.ndarray)]
    first = self.tensor(tensors[0])
    perm = first.perm
    names = []
    for value, full in zip(inputs, shapes):
      if not isinstance(value, np.ndarray):
        names.append(self.tensor(value, perm).name)
        continue
      value = np.asarray(value, np.float32).reshape(
        (1,) * (len(full) - np.ndim(value)) + np.shape(value)
      )
      if value.shape[0] == 1 and full[0] == self.batch != 1:
        # A constant repeated over the batch (e.g. a class token): expanded
        # to the input's batch size at run time.
        rest = np.broadcast_to(value, (1, *full[1:]))
        batch = self.node(
          'Slice',
          [
            self.node('Shape', [first.name]),
            self.const('start', np.asarray([0], np.int64)),
            self.const('end', np.asarray([1], np.int64)),
          ],
          'batch',
        )
        stored = np.transpose(rest, perm)
        target = self.node(
          'Concat',
          [
            batch,
            self.const(
              'dims',
              np.asarray(
                [stored.shape[k] for k in range(1, stored.ndim)], np.int64
              ),
            ),
          ],
          'shape',
          axis=0,
        )
        if perm[0] != 0:
          raise ValueError('A batch-expanded constant in a transposed layout.')
        names.append(
          self.node('Expand', [self.const('c', stored), target], 'expand')
        )
      else:
        names.append(
          self.const('c', np.transpose(np.broadcast_to(value, full), perm))
        )
    out = self.node('Concat', names, 'concat', axis=perm.index(dimension))
    return _Tensor(out, shape, perm)

  def _slice(self, x, params, shape):
    t = self.tensor(x)
    starts = params['start_indices']
    limits = params['limit_indices']
    strides = params['strides'] or (1,) * len(starts)
    axes = [
      a
      for a in range(len(starts))
      if (starts[a], limits[a], strides[a]) != (0, x.shape[a], 1)
    ]

    def column(values):
      return self.const('s', np.asarray([values[a] for a in axes], np.int64))

    out = self.node(
      'Slice',
      [
        t.name,
        column(starts),
        column(limits),
        self.const(
          'axes', np.asarray([t.perm.index(a) for a in axes], np.int64)
        ),
        column(strides),
      ],
      'slice',
    )
    return _Tensor(out, shape, t.perm)

  def _reshape(self, x, shape):
    t = self.tensor(x, tuple(range(len(x.shape))))
    target = list(shape)
    if t.shape and target and t.shape[0] == target[0] == self.batch:
      target[0] = 0  # keep the input's (dynamic) batch size
    out = self.node(
      'Reshape', [t.name, self.const('shape', np.asarray(target, np.int64))]
    )
    return _Tensor(out, tuple(shape), tuple(range(len(shape))))


def _fold_affine(name, other, value, const_side):
  """``other (op) value`` folded into a pending Conv / matrix product or
  spatial sum, or None when it does not fold."""
  if isinstance(other, _SpatialSum):
    if np.size(value) == 1 and const_side == 1 and name in ('mul', 'div'):
      scalar = float(np.asarray(value).reshape(-1)[0])
      factor = other.factor * scalar if name == 'mul' else other.factor / scalar
      return dataclasses.replace(other, factor=factor)
    return None
  if not isinstance(other, _Linear):
    return None
  cout = other.kernel.shape[-1]
  shape = np.shape(value)
  if any(d != 1 for d in shape[:-1]) or (shape and shape[-1] not in (1, cout)):
    return None
  vector = np.broadcast_to(
    np.asarray(value, np.float32).reshape(-1), (cout,)
  ).astype(np.float32)
  kernel, bias = other.kernel, other.bias
  if name == 'add':
    bias = bias + vector
  elif name == 'sub' and const_side == 1:
    bias = bias - vector
  elif name == 'sub':
    kernel, bias = -kernel, vector - bias
  elif name == 'mul':
    kernel, bias = kernel * vector, bias * vector
  elif name == 'div' and const_side == 1:
    kernel, bias = kernel / vector, bias / vector
  else:
    return None
  return dataclasses.replace(other, kernel=kernel, bias=bias)


def _unexpanded(value, shape, dims):
  """``broadcast_in_dim`` of a constant, kept unexpanded: ``value`` reshaped
  to the output's rank (size 1 on the new dimensions)."""
  aligned = [1] * len(shape)
  for source_dim, target_dim in enumerate(dims):
    aligned[target_dim] = np.shape(value)[source_dim]
  return np.asarray(value).reshape(aligned)


_NUMPY_BINARY = {
  'add': np.add,
  'sub': np.subtract,
  'mul': np.multiply,
  'div': np.divide,
  'max': np.maximum,
  'min': np.minimum,
  'pow': np.power,
}
_NUMPY_UNARY = {
  'neg': np.negative,
  'sqrt': np.sqrt,
  'rsqrt': lambda x: (1.0 / np.sqrt(x)).astype(np.asarray(x).dtype),
  'exp': np.exp,
  'log': np.log,
  'abs': np.abs,
}
_ONNX_UNARY = {
  'neg': ('Neg',),
  'sqrt': ('Sqrt',),
  'rsqrt': ('Sqrt', 'Reciprocal'),
  'exp': ('Exp',),
  'log': ('Log',),
  'tanh': ('Tanh',),
  'logistic': ('Sigmoid',),
  'erf': ('Erf',),
  'abs': ('Abs',),
}


def float_to_onnx(
  module,
  variables,
  sample_x,
  path: str | None = None,
  *,
  call_kwargs: dict[str, Any] | None = None,
  opset: int = 18,
  input_name: str = 'images',
  output_name: str = 'logits',
  report: dict | None = None,
):
  """The float32 ONNX model of a Flax ``module`` (see the module docstring).

  Args:
    module: a float Flax ``nn.Module``.
    variables: its variables (``params``, ``batch_stats``, ...).
    sample_x: a float batch the model is traced on (NHWC images); the
      graph's batch dimension is dynamic.
    path: if given, the model is written there.
    call_kwargs: keyword arguments of the inference call (default
      ``{'train': False}``).
    opset: ONNX opset (>= 13; ReduceMax / ReduceMin need >= 18).
    input_name: the graph input, float32 ``sample_x``-shaped (batch ``N``).
    output_name: the graph output.
    report: if a dict, filled with ``jax_ops`` (traced primitive -> count,
      of the operations on tensors) and ``onnx_ops`` (ONNX op type ->
      count).
  Returns:
    The ``onnx.ModelProto`` (checked with ``onnx.checker``).
  Raises:
    ImportError: onnx is not installed.
    ValueError: an operation with no ONNX translation (named), or a model
      whose output does not depend on its input.
  """
  onnx = import_onnx()
  helper = onnx.helper
  if opset < 13:
    raise ValueError(f'opset={opset}: the float ONNX export needs >= 13.')
  call_kwargs = {'train': False} if call_kwargs is None else dict(call_kwargs)
  sample_x = np.asarray(sample_x)
  if np.issubdtype(sample_x.dtype, np.floating):
    sample_x = sample_x.astype(np.float32)
  closed = jax.make_jaxpr(lambda x: module.apply(variables, x, **call_kwargs))(
    sample_x
  )
  converter = _Converter(onnx, batch=sample_x.shape[0])
  rank = sample_x.ndim
  source = _Tensor(input_name, sample_x.shape, tuple(range(rank)))
  (out,) = converter.run(closed, [source])
  if isinstance(out, np.ndarray):
    raise ValueError('The model output does not depend on its input.')
  out = converter.tensor(out, tuple(range(len(out.shape))))
  if out.name == input_name:
    out = _Tensor(converter.node('Identity', [out.name]), out.shape, out.perm)
  for node in converter.nodes:
    node.output[:] = [output_name if o == out.name else o for o in node.output]
    node.input[:] = [output_name if i == out.name else i for i in node.input]
  in_info = helper.make_tensor_value_info(
    input_name,
    onnx.helper.np_dtype_to_tensor_dtype(sample_x.dtype),
    ['N', *sample_x.shape[1:]],
  )
  out_info = helper.make_tensor_value_info(
    output_name, onnx.TensorProto.FLOAT, ['N', *out.shape[1:]]
  )
  model = checked_model(
    converter.nodes,
    f'fracq_float_{type(module).__name__}',
    in_info,
    out_info,
    converter.inits,
    opset,
  )
  if report is not None:
    onnx_ops = {}
    for node in model.graph.node:
      onnx_ops[node.op_type] = onnx_ops.get(node.op_type, 0) + 1
    report.update(jax_ops=dict(converter.ops), onnx_ops=onnx_ops)
  if path is not None:
    onnx.save(model, path)
  return model


def export_float_onnx(
  module,
  variables,
  sample_x,
  path: str,
  *,
  call_kwargs: dict[str, Any] | None = None,
  opset: int = 18,
  overwrite: bool = False,
  check: bool = True,
) -> dict:
  """Writes the float32 ONNX export of ``module`` and measures it.

  Returns:
    ``onnx_bytes``, ``onnx_ops`` (op type -> count) and, with ``check``
    (needs onnxruntime), ``max_abs_diff`` (onnxruntime vs the Flax model on
    ``sample_x``) and ``logit_range`` (of the Flax model's output).
  Raises:
    FileExistsError: ``path`` exists and not ``overwrite``.
  """
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it.')
  info = {}
  float_to_onnx(
    module,
    variables,
    sample_x,
    path,
    call_kwargs=call_kwargs,
    opset=opset,
    report=info,
  )
  rep = {'onnx_bytes': os.path.getsize(path), 'onnx_ops': info['onnx_ops']}
  if check:
    kwargs = {'train': False} if call_kwargs is None else call_kwargs
    ref = np.asarray(
      jax.jit(lambda x: module.apply(variables, x, **kwargs))(sample_x)
    )
    got = run_onnx(path, np.asarray(sample_x, np.float32))
    rep['max_abs_diff'] = float(np.max(np.abs(got - ref)))
    rep['logit_range'] = float(np.ptp(ref))
  return rep
