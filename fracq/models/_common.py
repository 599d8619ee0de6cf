"""Pieces shared by the model families."""

from __future__ import annotations

import functools

import flax.linen as nn


def batch_norm(train: bool, axis_name, momentum: float, epsilon: float, dtype):
  """``nn.BatchNorm`` with the model's statistics mode and cross-replica axis
  (``axis_name``: the data-parallel mesh axis, or None)."""
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=momentum,
    epsilon=epsilon,
    axis_name=axis_name,
    dtype=dtype,
  )
