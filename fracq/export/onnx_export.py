"""ONNX export of integer programs: a QDQ graph that onnxruntime runs.

:func:`program_to_onnx` writes an :class:`~fracq.export.integer_model.
IntegerProgram` as a standard ONNX graph of ``QuantizeLinear`` /
``DequantizeLinear`` (QDQ) nodes around float ``Conv`` / ``Gemm`` nodes, the
form onnxruntime (and TensorRT, OpenVINO) turns into integer kernels:

* Input: float images in fracq's layout, **NHWC** ``(N, H, W, C)``, one
  ``Transpose`` to NCHW, then ``QuantizeLinear`` with the program's input
  step (int8 / uint8; ``Clip`` to a narrower code range).
* Weights: the integer kernel codes are the initializers (OIHW for Conv,
  ``(in, out)`` for Gemm), stored as **INT4 / UINT4** (ONNX opset >= 21,
  two codes a byte) when every code fits in 4 bits and as int8 otherwise,
  each behind a ``DequantizeLinear``. Biases are int32 initializers behind a
  ``DequantizeLinear`` at the accumulator's scale.
* Between layers: ``[Mul sign] -> [Relu] -> [GlobalAveragePool] ->
  QuantizeLinear -> DequantizeLinear [-> Clip]``; the requantizing
  ``QuantizeLinear`` carries the layer's per-channel multiplier (``axis=1``).
  The last layer's accumulator is dequantized by a per-channel ``Mul`` into
  the float logits ``(N, classes)``.
* Graph programs (F8Net residual nets): each layer reads its ``src``; a
  residual add's operands (accumulators of layers without requantization,
  or codes) are multiplied by ``2^shift`` (exact) and summed by ``Sum``,
  then follow the same ReLU / pool / requantizing ``QuantizeLinear``.

Formulation (chosen so onnxruntime computes the integer program's numbers):
activation codes are dequantized with scale 1 and kernel codes with scale 1
(the bias with ``2^-acc_shift``), so the float32 tensors entering and leaving
every ``Conv`` / ``Gemm`` hold the integer codes and the integer accumulator
itself. A float32 sum of integers is exact while every partial sum stays
below ``2^24``; :func:`program_to_onnx` checks that bound per layer
(``sum |w| * max |x|``) and reports it. All real-valued scaling then happens
in exactly one place per layer, the requantizing ``QuantizeLinear``, whose
``y_scale = 1 / (M * pool * 2^acc_shift)`` (``M``: the program's fixed-point
multiplier, or ``2^-shift`` for F8Net). ONNX ``QuantizeLinear`` rounds half
to even and saturates, like fracq's requantization; the differences are:

* F8Net: every scale is a power of two, so each division is exact and the
  graph reproduces the program bit for bit (logits included).
* Real multipliers (uniform QAT / FracBits): ``x / y_scale`` is one float32
  rounding (relative ``2^-24``) where fracq multiplies exactly by a 31-bit
  ``M0``, and the biased accumulator is rounded to float32 when it exceeds
  ``2^24`` (the program's ``acc_shift`` keeps ~28 bits); a code can move by
  one only within ~``1e-5`` of a rounding tie. :func:`export_onnx` measures
  the effect (prediction match and logit difference) on the sample batch.

``opset`` >= 21 is needed for INT4 / UINT4 tensors; with 13 <= opset < 21
every kernel is stored as int8 (same numbers, twice the bytes for <= 4-bit
layers).
"""

from __future__ import annotations


import numpy as np

from fracq.export.integer_model import IntAdd, IntegerProgram

EXACT_FLOAT_INT = 2**24  # float32 holds every integer below this exactly


def _onnx():
  try:
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      'ONNX export needs the onnx package (pip install onnx; onnxruntime '
      'to run or check the export).'
    ) from e
  return onnx


def _code_type(lo: int, hi: int, onnx, allow_int4: bool):
  """(ONNX element type, numpy dtype, dtype range) holding codes lo..hi."""
  T = onnx.TensorProto
  cands = []
  if allow_int4:
    cands += [(T.INT4, np.int8, -8, 7), (T.UINT4, np.uint8, 0, 15)]
  cands += [
    (T.INT8, np.int8, -128, 127),
    (T.UINT8, np.uint8, 0, 255),
    (T.INT16, np.int16, -32768, 32767),
    (T.UINT16, np.uint16, 0, 65535),
  ]
  for t, dt, tlo, thi in cands:
    if tlo <= lo and hi <= thi:
      return t, dt, (tlo, thi)
  raise ValueError(f'Codes in [{lo}, {hi}] fit no ONNX quantized type.')


def _act_type(lo, hi, onnx):
  # Activations stay 8-bit (or 16-bit) types: onnxruntime's QDQ kernels are
  # int8 / uint8, and a narrower code range is enforced by a Clip.
  return _code_type(lo, hi, onnx, allow_int4=False)


class _Graph:
  """Accumulates nodes and initializers with unique names."""

  def __init__(self, onnx):
    self.onnx = onnx
    self.nodes, self.inits = [], []
    self.n = 0

  def name(self, base):
    self.n += 1
    return f'{base}_{self.n}'

  def const(self, base, value, elem_type=None):
    """An initializer from a numpy array (``elem_type``: INT4/UINT4)."""
    h = self.onnx.helper
    name = self.name(base)
    value = np.asarray(value)
    if elem_type in (self.onnx.TensorProto.INT4, self.onnx.TensorProto.UINT4):
      import ml_dtypes  # pylint: disable=g-import-not-at-top  (onnx needs it)

      value = value.astype(
        ml_dtypes.int4
        if elem_type == self.onnx.TensorProto.INT4
        else ml_dtypes.uint4
      )
    # raw_data: packed bytes (two 4-bit codes a byte), not varint lists.
    t = self.onnx.numpy_helper.from_array(value, name)
    self.inits.append(t)
    return name

  def node(self, op, inputs, base=None, **attrs):
    out = self.name(base or op.lower())
    self.nodes.append(
      self.onnx.helper.make_node(op, inputs, [out], name=self.name(op), **attrs)
    )
    return out


def _qdq(g: _Graph, x, y_scale, lo, hi, *, axis=None, tag='act'):
  """QuantizeLinear(x, y_scale) -> codes in [lo, hi] -> float codes."""
  onnx = g.onnx
  t, dt, (tlo, thi) = _act_type(lo, hi, onnx)
  y_scale = np.asarray(y_scale, np.float32)
  zp = g.const(f'{tag}_zp', np.zeros(y_scale.shape, dt))
  kw = {} if axis is None else {'axis': axis}
  q = g.node(
    'QuantizeLinear',
    [x, g.const(f'{tag}_scale', y_scale), zp],
    f'{tag}_q',
    **kw,
  )
  y = g.node(
    'DequantizeLinear',
    [q, g.const(f'{tag}_one', np.float32(1)), g.const(f'{tag}_zp', dt(0))],
    f'{tag}_dq',
  )
  if (lo, hi) != (tlo, thi):  # a narrower range than the storage type
    y = g.node(
      'Clip',
      [
        y,
        g.const(f'{tag}_lo', np.float32(lo)),
        g.const(f'{tag}_hi', np.float32(hi)),
      ],
      f'{tag}_clip',
    )
  return y


def _pads(padding, kernel_hw):
  """ONNX Conv padding attributes from the program's padding."""
  if padding is None or (
    isinstance(padding, str) and padding.upper() == 'VALID'
  ):
    return {'pads': [0, 0, 0, 0]}
  if isinstance(padding, str) and padding.upper() == 'SAME':
    return {'auto_pad': 'SAME_UPPER'}  # XLA's SAME: the extra pad at the end
  if isinstance(padding, tuple) and padding and padding[0] == 'INT':
    p = int(padding[1])
    return {'pads': [p, p, p, p]}
  pairs = [tuple(int(v) for v in p) for p in padding]
  if len(pairs) != len(kernel_hw):
    raise ValueError(
      f'padding={padding} does not match a {len(kernel_hw)}-D kernel.'
    )
  return {'pads': [p[0] for p in pairs] + [p[1] for p in pairs]}


def _multiplier(layer, cout) -> np.ndarray:
  """The real requantization multiplier of ``layer`` (f64; per channel
  (``cout``), or a scalar for an add with one shift)."""
  if layer.requant[0] == 'shift':
    m = 2.0 ** -np.asarray(layer.requant[1], np.float64)
  else:
    _, _, m0, ex = layer.requant
    m = np.asarray(m0, np.float64) * 2.0 ** (np.asarray(ex, np.float64) - 31)
  return m if cout is None else np.broadcast_to(m, (cout,))


def program_to_onnx(
  program: IntegerProgram,
  path: str | None = None,
  *,
  opset: int = 21,
  input_name: str = 'images',
  output_name: str = 'logits',
  report: dict | None = None,
):
  """The ONNX QDQ model of ``program`` (see the module docstring).

  Args:
    program: an integer program (:func:`fracq.export.integer_model.lower`).
    path: if given, the model is written there.
    opset: ONNX opset (>= 13; >= 21 stores <= 4-bit kernels as INT4/UINT4).
    input_name: the graph input: float32 ``(N, H, W, C)`` images (NHWC, as
      fracq models take them) or ``(N, features)`` for a Dense-first model.
    output_name: the graph output: float32 logits ``(N, classes)``
      (``(N, H, W, C)`` if the program ends with a Conv).
    report: if a dict, filled with ``int4_initializers`` and
      ``exact_accumulation`` (every layer's ``sum |w| * max |x|`` is below
      ``2^24``, so the float32 Conv/Gemm sums are exact).
  Returns:
    The ``onnx.ModelProto`` (checked with ``onnx.checker``).
  Raises:
    ImportError: onnx is not installed.
    ValueError: an unsupported layer (non-2-D Conv), opset < 13, or an
      empty program.
  """
  onnx = _onnx()
  h = onnx.helper
  if opset < 13:
    raise ValueError(
      f'opset={opset}: per-channel QuantizeLinear needs opset '
      '>= 13 (INT4 kernels need >= 21).'
    )
  if not program.layers:
    raise ValueError('The integer program has no layers.')
  g = _Graph(onnx)
  first = program.layers[0]
  if first.layer_type == 'Conv':
    if first.kernel.ndim != 4:
      raise ValueError(
        f'{first.path}: only 2-D convolutions are exported '
        f'(kernel {first.kernel.shape}).'
      )
    in_info = h.make_tensor_value_info(
      input_name,
      onnx.TensorProto.FLOAT,
      [
        'N',
        'H',
        'W',
        int(first.kernel.shape[2]) * int(first.feature_group_count),
      ],
    )
    x = g.node('Transpose', [input_name], 'nchw', perm=[0, 3, 1, 2])
  else:
    in_info = h.make_tensor_value_info(
      input_name, onnx.TensorProto.FLOAT, ['N', int(first.kernel.shape[0])]
    )
    x = input_name
  lo, hi = program.input_range
  x = _qdq(g, x, np.float32(program.input_scale), lo, hi, tag='input')
  rank = 4 if first.layer_type == 'Conv' else 2
  # op path -> (float tensor holding its integers, rank, max |value|)
  env = {'input': (x, rank, max(abs(lo), abs(hi)))}
  prev = 'input'
  int4, exact = 0, True
  last = len(program.layers) - 1
  for i, l in enumerate(program.layers):
    tag = l.path.replace('/', '.')
    if isinstance(l, IntAdd):
      # int32 operands aligned by left shifts: exact float products by 2^s
      terms, bound = [], 0.0
      for name, sh in zip(l.inputs, l.shifts):
        t, rank, b = env[name]
        sh = np.asarray(sh, np.float64)
        if np.any(sh != 0):
          f = (2.0**sh).astype(np.float32)
          t = g.node(
            'Mul',
            [
              t,
              g.const(
                f'{tag}_align',
                f.reshape((1, -1, 1, 1) if f.ndim and rank == 4 else f.shape),
              ),
            ],
            f'{tag}_aligned',
          )
        terms.append(t)
        bound += b * float(np.max(2.0**sh))
      exact &= bound < EXACT_FLOAT_INT
      y, width, a = g.node('Sum', terms, f'{tag}_sum'), None, 0
    else:
      x, rank, x_bound = env[l.src if l.src is not None else prev]
      k = np.asarray(l.kernel)
      klo, khi = int(k.min(initial=0)), int(k.max(initial=0))
      ktype, kdt, _ = _code_type(klo, khi, onnx, allow_int4=opset >= 21)
      int4 += ktype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
      red = tuple(range(k.ndim - 1))
      acc_bound = (
        float(np.max(np.sum(np.abs(k.astype(np.int64)), axis=red))) * x_bound
      )
      exact &= acc_bound < EXACT_FLOAT_INT
      a = int(l.acc_shift)
      if l.layer_type == 'Conv':
        if k.ndim != 4 or rank != 4:
          raise ValueError(
            f'{l.path}: only 2-D convolutions on NCHW inputs '
            f'are exported (kernel {k.shape}).'
          )
        codes = np.transpose(k, (3, 2, 0, 1))  # HWIO -> OIHW
      elif l.layer_type == 'Dense':
        if k.ndim != 2:
          raise ValueError(f'{l.path}: Dense kernel {k.shape} is not 2-D.')
        codes = k
        if rank == 4:  # after a global pool the spatial size is 1 x 1
          x = g.node('Flatten', [x], f'{tag}_flat', axis=1)
          rank = 2
      else:
        raise ValueError(f'{l.path}: {l.layer_type} layers are not exported.')
      w = g.node(
        'DequantizeLinear',
        [
          g.const(f'{tag}_kernel', codes.astype(kdt), ktype),
          g.const(f'{tag}_kernel_scale', np.float32(1)),
          g.const(f'{tag}_kernel_zp', np.zeros((), kdt), ktype),
        ],
        f'{tag}_kernel_dq',
      )
      inputs = [x, w]
      if l.bias is not None:
        inputs.append(
          g.node(
            'DequantizeLinear',
            [
              g.const(f'{tag}_bias', np.asarray(l.bias, np.int32).reshape(-1)),
              g.const(f'{tag}_bias_scale', np.float32(2.0**-a)),
              g.const(f'{tag}_bias_zp', np.int32(0)),
            ],
            f'{tag}_bias_dq',
          )
        )
      if l.layer_type == 'Conv':
        attrs = _pads(l.padding, k.shape[:2])
        attrs.update(
          strides=list(l.strides or (1, 1)),
          group=int(l.feature_group_count),
          kernel_shape=[int(k.shape[0]), int(k.shape[1])],
        )
        y = g.node('Conv', inputs, f'{tag}_acc', **attrs)
      else:
        y = g.node('Gemm', inputs, f'{tag}_acc')
      width = k.shape[-1]
      if l.requant is None and i < last:  # an add operand: the accumulator
        if a:
          raise ValueError(
            f'{l.path}: an add operand with acc_shift={a} is not exported.'
          )
        env[l.path] = (y, rank, acc_bound)
        prev = l.path
        continue
    cshape = (1, -1, 1, 1) if rank == 4 else (1, -1)
    if l.requant is None:  # the last layer: dequantize the accumulator
      scale = (
        np.broadcast_to(
          np.asarray(l.out_scale, np.float64).reshape(-1), (width,)
        )
        * 2.0**a
      )
      x = g.node(
        'Mul',
        [
          y,
          g.const(f'{tag}_out_scale', scale.astype(np.float32).reshape(cshape)),
        ],
        f'{tag}_out',
      )
      break
    if l.requant[0] == 'mult' and np.any(np.asarray(l.requant[1]) < 0):
      sign = np.broadcast_to(np.asarray(l.requant[1], np.float32), (width,))
      y = g.node(
        'Mul',
        [y, g.const(f'{tag}_sign', sign.reshape(cshape))],
        f'{tag}_signed',
      )
    if l.relu:
      y = g.node('Relu', [y], f'{tag}_relu')
    if l.pool > 1:
      if rank != 4:
        raise ValueError(f'{l.path}: a global pool after a Dense layer.')
      y = g.node('GlobalAveragePool', [y], f'{tag}_pool')
    y_scale = 1.0 / (_multiplier(l, width) * l.pool * 2.0**a)
    olo, ohi = l.out_range
    x = _qdq(
      g,
      y,
      y_scale.astype(np.float32),
      olo,
      ohi,
      axis=1 if y_scale.ndim else None,
      tag=tag,
    )
    if l.pool > 1:  # (N, C, 1, 1) -> (N, C): what a Dense reader takes
      x = g.node('Flatten', [x], f'{tag}_pooled', axis=1)
      rank = 2
    if l.maxpool is not None:  # on the codes (max commutes with requant)
      _, window, strides, pads = l.maxpool
      x = g.node(
        'MaxPool',
        [x],
        f'{tag}_maxpool',
        kernel_shape=list(window),
        strides=list(strides),
        pads=[p[0] for p in pads] + [p[1] for p in pads],
      )
    env[l.path] = (x, rank, max(abs(olo), abs(ohi)))
    prev = l.path
  if rank == 4:  # a Conv-final program: back to channel-last
    x = g.node('Transpose', [x], 'nhwc', perm=[0, 2, 3, 1])
  g.nodes[-1].output[0] = output_name
  cout = int(program.layers[-1].kernel.shape[-1])
  out_info = h.make_tensor_value_info(
    output_name,
    onnx.TensorProto.FLOAT,
    ['N', 'H_out', 'W_out', cout] if rank == 4 else ['N', cout],
  )
  graph = h.make_graph(
    g.nodes, f'fracq_{program.kind}', [in_info], [out_info], initializer=g.inits
  )
  model = h.make_model(
    graph, opset_imports=[h.make_opsetid('', opset)], producer_name='fracq'
  )
  model.ir_version = min(model.ir_version, 10)  # onnxruntime's supported IR
  onnx.checker.check_model(model, full_check=True)
  if report is not None:
    report.update(int4_initializers=int(int4), exact_accumulation=bool(exact))
  if path is not None:
    onnx.save(model, path)
  return model


def run_onnx(model, x) -> np.ndarray:
  """Runs an ONNX model (proto or path) on ``x`` with onnxruntime's CPU."""
  try:
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      'Running the ONNX export needs onnxruntime (pip install onnxruntime).'
    ) from e
  blob = model if isinstance(model, str) else model.SerializeToString()
  sess = ort.InferenceSession(blob, providers=['CPUExecutionProvider'])
  name = sess.get_inputs()[0].name
  return sess.run(None, {name: np.asarray(x, np.float32)})[0]


def export_onnx(
  wrapper,
  variables,
  sample_x,
  path: str,
  *,
  opset: int = 21,
  overwrite: bool = False,
  check: bool = True,
  program: IntegerProgram | None = None,
) -> dict:
  """Lowers a trained model, writes its ONNX QDQ export and measures it.

  Args:
    wrapper: a quantized model wrapper (uniform QAT, FracBits or F8Net).
    variables: its variables.
    sample_x: a batch (NHWC) used to verify the lowering and, with ``check``,
      to compare onnxruntime's output with the integer program's.
    path: the ``.onnx`` file to write.
    opset: ONNX opset (21 for INT4 kernels).
    overwrite: replace an existing file.
    check: run the export in onnxruntime (needs onnxruntime).
    program: an already lowered program of this model (skips lowering).
  Returns:
    ``onnx_bytes`` (on disk), ``onnx_opset``, ``onnx_int4_initializers``,
    ``onnx_exact_accumulation`` and, with ``check``,
    ``onnx_prediction_match`` (fraction of ``sample_x`` where onnxruntime's
    argmax equals the integer program's) and ``onnx_max_logit_diff_rel``
    (max |logit difference| / the program's logit range) and
    ``onnx_fake_quant_prediction_match`` / ``..._max_logit_diff_rel`` (the
    same against the fake-quantized model).
  Raises:
    ImportError: onnx (or, with ``check``, onnxruntime) is not installed.
    ValueError: the model has no integer lowering (the error of
      :func:`fracq.export.integer_model.lower`).
    FileExistsError: ``path`` exists and not ``overwrite``.
  """
  import os  # pylint: disable=g-import-not-at-top
  from fracq.export.integer_model import lower  # pylint: disable=g-import-not-at-top

  _onnx()
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it.')
  x = np.asarray(sample_x, np.float32)
  if program is None:
    program = lower(wrapper, variables, x)
  info = {}
  program_to_onnx(program, path, opset=opset, report=info)
  rep = {
    'onnx_bytes': os.path.getsize(path),
    'onnx_opset': opset,
    'onnx_int4_initializers': info['int4_initializers'],
    'onnx_exact_accumulation': info['exact_accumulation'],
  }
  if check:
    got = run_onnx(path, x)
    ref = np.asarray(program.logits(x))
    span = float(np.ptp(ref)) or 1.0
    rep['onnx_prediction_match'] = float(
      np.mean(got.argmax(-1) == ref.argmax(-1))
    )
    rep['onnx_max_logit_diff_rel'] = (
      float(np.max(np.abs(got - ref)) / span) if got.size else 0.0
    )
    sim = np.asarray(wrapper.apply(variables, x, train=False))
    rep['onnx_fake_quant_prediction_match'] = float(
      np.mean(got.argmax(-1) == sim.argmax(-1))
    )
    rep['onnx_fake_quant_max_logit_diff_rel'] = (
      float(np.max(np.abs(got - sim)) / (float(np.ptp(sim)) or 1.0))
      if got.size
      else 0.0
    )
  return rep
