"""The contract between the training loop and (possibly quantized) models.

The loop drives any object with this interface; ``PlainModel`` is the float
model, :class:`fracq.methods.qat.QATModel` the quantized one.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp


class ModelWrapper(Protocol):
  """What the training loop needs from a model."""

  module: nn.Module
  trainable_collections: tuple[str, ...]

  def init(self, rngs, x, *, train: bool) -> dict: ...

  def apply(self, variables, x, *, train: bool, mutable=False, rngs=None): ...

  def penalty(self, variables, step) -> tuple[jax.Array, dict]: ...

  def metrics(self, variables) -> dict[str, float]: ...

  def for_step(self, step: int) -> 'ModelWrapper': ...

  def prepare(self, variables) -> dict: ...

  def report(self, variables, workdir: str, step: int, writer) -> Any: ...


class PlainModel:
  """The float model behind the ``ModelWrapper`` interface."""

  trainable_collections = ('params',)

  def __init__(self, module: nn.Module):
    self.module = module

  def init(self, rngs, x, *, train: bool = False):
    return self.module.init(rngs, x, train=train)

  def apply(
    self, variables, x, *, train: bool = False, mutable=False, rngs=None
  ):
    return self.module.apply(
      variables, x, train=train, mutable=mutable, rngs=rngs
    )

  def calibrate(self, variables, x):
    return variables

  def penalty(self, variables, step):
    return jnp.zeros((), jnp.float32), {}

  def metrics(self, variables):
    return {}

  def for_step(self, step):
    return self

  def prepare(self, variables):
    return variables

  def report(self, variables, workdir, step, writer=None):
    return ''
