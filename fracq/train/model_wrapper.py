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


def build_model_wrapper(config, module, sample_x, total_steps=None):
  """``PlainModel`` for ``config.quant.method == 'none'``, else the method's
  wrapper (uniform QAT, FracBits, HAWQ)."""
  if config.quant.method == 'none' and not config.quant.get('preserve', ''):
    return PlainModel(module)
  from fracq.methods import config as methods_config

  if config.quant.method == 'f8net':
    from fracq.methods import f8net

    return f8net.build(config.quant, module, sample_x)
  if config.quant.method == 'hawq':
    # The search runs on the trained float model, on training batches.
    from fracq import data as data_lib
    from fracq.train import checkpoint as ckpt_lib

    if not config.init_from:
      raise ValueError(
        "quant.method='hawq' searches bits on a trained float "
        'model: set --config.init_from=<float workdir>.'
      )
    float_vars = ckpt_lib.load_variables(
      config.init_from, config.init_collections
    )
    it = data_lib.train_iterator(config, 0)
    batches = [next(it) for _ in range(config.quant.hawq_batches)]
    return methods_config.build_hawq(
      config.quant, module, sample_x, float_vars, batches
    )
  return methods_config.build(
    config.quant, module, sample_x, config=config, total_steps=total_steps
  )
