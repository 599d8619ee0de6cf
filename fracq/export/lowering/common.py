"""Checks and helpers shared by the per-method lowerings."""

from __future__ import annotations

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


def verify_program(
  program: IntegerProgram, simulated_logits, x, *, exact: bool, atol: float
) -> float:
  """Compares the program's logits on ``x`` with the fake-quantized
  model's; raises unless equal (``exact``) or within ``atol`` of the logit
  range. Returns the max absolute difference."""
  got = np.asarray(program.logits(x))
  ref = np.asarray(simulated_logits)
  if got.shape != ref.shape:
    raise ValueError(
      f'Integer program output {got.shape} != model output '
      f'{ref.shape}: the model is not a supported chain.'
    )
  err = float(np.max(np.abs(got - ref))) if got.size else 0.0
  span = float(np.ptp(ref)) or 1.0
  if (exact and err != 0.0) or (not exact and err > atol * span):
    raise ValueError(
      f'The integer program disagrees with the fake-quantized model (max '
      f'|logit diff| {err:.3g}, logit range {span:.3g}): the model has '
      'operations the integer lowering does not model (e.g. a clip it did '
      'not find, or an op the probe matched by coincidence). Export the '
      'packed artifact instead.'
    )
  return err
