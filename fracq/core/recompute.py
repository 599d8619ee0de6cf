"""A layer's matmul or convolution whose backward pass re-quantizes its
operands instead of keeping them.

Automatic differentiation of ``op(quantize(x), quantize(w))`` keeps the
quantized operands for the backward pass: the weight gradient reads the
quantized input, the input gradient the quantized kernel. Next to what the
same layer keeps in float (its input ``x``; the kernel is a parameter, live
anyway) that is one more activation-sized buffer per quantized input, and
one more kernel-sized buffer per quantized kernel, held from the forward to
the backward pass. Where several layers read one activation (a transformer's
query, key and value projections; a bottleneck's first convolution and its
projection shortcut), each keeps its own quantized copy, since each has its
own learned range.

:func:`requantizing_op` keeps only the operands before quantization and the
quantizers' parameters, and recomputes the (elementwise, cheap) quantization
in the backward pass, from parameters tied to the cotangent, so that the
compiler can neither merge the recomputation with the forward pass's nor
schedule it early. Forward values and gradients are those of automatic differentiation
of ``op(quantize(x), quantize(w))``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fracq.core import learned

__all__ = ['Deferred', 'requantizing_op']


class Deferred(NamedTuple):
  """An operand quantized by a pure function of its source.

  Attributes:
    value: the quantized operand, ``fn(source, params)``.
    source: the operand before quantization.
    fn: ``fn(source, params) -> value``, pure: no side effects, and every
      array it reads is in ``source`` or ``params``.
    params: the quantizer's parameters (a pytree of arrays).
  """

  value: Any
  source: Any
  fn: Callable[[Any, Any], Any]
  params: Any


def _parts(operand):
  """``(source, params, fn)`` of an operand: a :class:`Deferred` or an
  array used as it is."""
  if isinstance(operand, Deferred):
    return operand.source, operand.params, operand.fn
  return operand, (), None


def _after(params, witness):
  """``params`` bit for bit, as values that depend on ``witness`` (an
  element of the cotangent) and that the compiler cannot recognise as
  ``params``.

  The quantized operands recomputed from them are then computed when the
  backward pass reaches the layer, neither merged with the forward pass's
  copies by common-subexpression elimination nor scheduled early and kept
  (an optimization barrier does neither on the CPU backend, which removes
  barriers before these passes). ``witness == witness`` is false only for
  a NaN, where the other branch is again ``params`` bit for bit.
  """

  def tie(p):
    if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      return p
    return jnp.where(witness == witness, p, jnp.copysign(jnp.abs(p), p))

  return jax.tree_util.tree_map(tie, params)


def requantizing_op(op: Callable[[Any, Any], Any], lhs, rhs):
  """``op(lhs, rhs)`` where either operand may be :class:`Deferred`.

  The value is ``op(lhs.fn(lhs.source, lhs.params), rhs.fn(...))`` (a plain
  array operand is used as it is), and so are the gradients, to the sources
  and the parameters. The backward pass keeps the sources and parameters
  only, and recomputes the quantized operands from them once the cotangent
  of the output is known.

  Args:
    op: ``op(lhs, rhs) -> out``, e.g. a ``lax.dot_general`` with its
      dimension numbers bound.
    lhs: the left operand (the layer's input), an array or
      :class:`Deferred`.
    rhs: the right operand (the kernel), an array or :class:`Deferred`.
  """
  lhs_source, lhs_params, lhs_fn = _parts(lhs)
  rhs_source, rhs_params, rhs_fn = _parts(rhs)
  if lhs_fn is None and rhs_fn is None:
    return op(lhs_source, rhs_source)

  def apply(lhs_source, lhs_params, rhs_source, rhs_params):
    left = lhs_source if lhs_fn is None else lhs_fn(lhs_source, lhs_params)
    right = rhs_source if rhs_fn is None else rhs_fn(rhs_source, rhs_params)
    return op(left, right)

  @jax.custom_vjp
  def run(lhs_source, lhs_params, rhs_source, rhs_params):
    return apply(lhs_source, lhs_params, rhs_source, rhs_params)

  def run_fwd(*operands):
    return apply(*operands), operands

  def run_bwd(operands, g):
    lhs_source, lhs_params, rhs_source, rhs_params = operands
    witness = jnp.ravel(g)[0]
    lhs_params = _after(lhs_params, witness)
    rhs_params = _after(rhs_params, witness)
    with learned.recomputing():
      _, vjp = jax.vjp(apply, lhs_source, lhs_params, rhs_source, rhs_params)
      return vjp(g)

  run.defvjp(run_fwd, run_bwd)
  return run(lhs_source, lhs_params, rhs_source, rhs_params)
