"""Checks and helpers shared by the per-method lowerings."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from fracq.export.program import IntegerProgram
from fracq.graph.structure import Structure
from fracq.graph.structure import clipping_ops


def tree_node(tree, path: str):
  """The subtree of a variables collection at a module path ``a/b/c``."""
  for part in path.split('/'):
    tree = tree[part]
  return tree


def chain_link(structure: Structure, index: int) -> tuple[bool, int]:
  """``(relu, pool)`` between layer ``index`` and the next of a chain, or a
  ValueError saying the model is not a chain."""
  producer = structure.order[index]
  reader = structure.order[index + 1]
  out_shape = structure.out_shapes[producer]
  in_shape = structure.in_shapes[reader]
  relu = not structure.signs[reader]
  if out_shape[1:] == in_shape[1:]:
    return relu, 1
  if (
    len(out_shape) > 2 and len(in_shape) == 2 and out_shape[-1] == in_shape[-1]
  ):
    return relu, int(np.prod(out_shape[1:-1]))
  raise ValueError(
    f'Integer lowering supports chains of Conv/Dense layers (with BN, ReLU '
    f'and a final global average pool): {producer} outputs {out_shape} but '
    f'{reader} reads {in_shape}. This model is not such a chain (pooling, '
    'reshapes, branches); export it with fracq.export.export_model (packed '
    'artifact) instead.'
  )


def refuse_clipping(module, variables, x, call_kwargs: dict) -> None:
  """Raises if ``module`` clips activations (ReLU6 and the like)."""
  ops = clipping_ops(module, variables, x, **call_kwargs)
  if ops:
    raise ValueError(
      f'{type(module).__name__} clips activations ({len(ops)} `min`/'
      '`clamp` operations, e.g. ReLU6); the integer lowering represents '
      'ReLU only, and a ReLU6 link would be exact only while activations '
      'stay below 6. Use ReLU, or export the packed artifact instead.'
    )


# A layer's input codes, recomputed by the program from the model's own
# codes of the layer before (teacher forcing), may differ from the model's
# by one code where the model's float32 arithmetic lands a value next to a
# rounding tie. At most this share of a layer's codes (and at least one
# code) may differ so.
FLIP_RATE = 1e-3
# Teacher-forced logits: the last layer reads the model's own codes, so its
# output differs from the model's by float32 rounding only.
REPLAY_ATOL = 1e-4


@dataclasses.dataclass
class Verification:
  """What a lowering's check measured on its sample batch.

  Attributes:
    max_diff_rel: max |program logit - model logit| over the logit range,
      the program running on its own (free running).
    agreement: share of examples where both predict the same class.
    layers: teacher forcing (:meth:`IntegerProgram.replay`), per layer:
      ``max_diff``, ``differing`` and ``codes`` of its input codes; empty
      when the check was end to end only.
    replay_max_diff_rel: the teacher-forced logits' max difference over the
      logit range (None without teacher forcing).
  """

  max_diff_rel: float
  agreement: float
  layers: dict = dataclasses.field(default_factory=dict)
  replay_max_diff_rel: float | None = None

  @property
  def flipped_codes(self) -> int:
    """Input codes (all layers) that differ from the model's by one."""
    return sum(entry['differing'] for entry in self.layers.values())

  @property
  def checked_codes(self) -> int:
    """Input codes (all layers) the teacher-forced run compared."""
    return sum(entry['codes'] for entry in self.layers.values())


def verify_program(
  program: IntegerProgram,
  simulated_logits,
  x,
  *,
  exact: bool,
  atol: float,
  teacher: dict | None = None,
  flip_rate: float = FLIP_RATE,
) -> Verification:
  """Checks a program against the fake-quantized model on ``x``.

  Without ``teacher``: raises unless the program's logits equal the model's
  (``exact``) or are within ``atol`` of the logit range.

  With ``teacher`` (layer path -> the model's input codes of that layer),
  the program is also run teacher-forced (:meth:`IntegerProgram.replay`):
  every layer's input codes, recomputed from the model's codes of the
  layers before it, must match the model's to within one code, with at
  most ``flip_rate`` of a layer's codes (and at least one) off by one, and
  the teacher-forced logits within :data:`REPLAY_ATOL` of the range. A
  lowering that mis-models an operation (a missed clip, a wrong
  multiplier, bias or pool) fails this in the layer that reads it. Passed,
  it proves every layer right, so a free-running difference beyond
  ``atol`` (one-code flips at float32 rounding ties, grown through depth)
  is reported with a warning instead of raised.

  Returns:
    The :class:`Verification`.
  """
  got = np.asarray(program.logits(x))
  ref = np.asarray(simulated_logits)
  if got.shape != ref.shape:
    raise ValueError(
      f'Integer program output {got.shape} != model output '
      f'{ref.shape}: the model is not a supported chain.'
    )
  span = float(np.ptp(ref)) or 1.0
  err = float(np.max(np.abs(got - ref))) if got.size else 0.0
  result = Verification(
    max_diff_rel=err / span,
    agreement=float(np.mean(got.argmax(-1) == ref.argmax(-1))),
  )
  within = err == 0.0 if exact else err <= atol * span
  if teacher is None:
    if not within:
      raise ValueError(
        f'The integer program disagrees with the fake-quantized model (max '
        f'|logit diff| {err:.3g}, logit range {span:.3g}): the model has '
        'operations the integer lowering does not model (e.g. a clip it '
        'did not find, or an op the probe matched by coincidence). Export '
        'the packed artifact instead.'
      )
    return result
  forced, result.layers = program.replay(x, teacher)
  forced = np.asarray(forced)
  result.replay_max_diff_rel = float(np.max(np.abs(forced - ref))) / span
  for path, entry in result.layers.items():
    allowed = max(1, int(flip_rate * entry['codes']))
    if entry['max_diff'] > 1 or entry['differing'] > allowed:
      raise ValueError(
        f"{path}: with every layer reading the fake-quantized model's own "
        f'input codes, the integer program computes {entry["differing"]} '
        f"of this layer's {entry['codes']} input codes differently (by up "
        f'to {entry["max_diff"]}; rounding ties allow {allowed} off by '
        'one). The lowering does not model an operation before this layer '
        '(e.g. a clip it did not find, or an op the probe matched by '
        'coincidence). Export the packed artifact instead.'
      )
  if result.replay_max_diff_rel > REPLAY_ATOL:
    raise ValueError(
      f"The integer program's last layer disagrees with the fake-quantized "
      f"model on the model's own input codes (max |logit diff| "
      f'{result.replay_max_diff_rel:.3g} of the logit range): the last '
      'layer is not modelled right. Export the packed artifact instead.'
    )
  if not within:
    warnings.warn(
      f"The integer program's logits differ from the fake-quantized "
      f"model's by up to {result.max_diff_rel:.3g} of the logit range on "
      f'the sample batch (predictions agree on {result.agreement:.0%}). '
      "Every layer was checked teacher-forced: on the model's own input "
      f"codes the program reproduces every layer's codes except "
      f'{result.flipped_codes} off by one at rounding ties (of '
      f'{result.checked_codes}), so the '
      'difference is those ties growing through the depth of the model, '
      'not a lowering error.',
      stacklevel=4,  # the caller of fracq.export.lower
    )
  return result
