"""Optimizers, schedules and regex parameter groups (big_vision style).

Parameters are addressed by their flattened path in the trainable pytree,
``collection/module/.../name`` (``params/stage1_block0/conv1/kernel``,
``quant/head/kernel_step``). Weight decay applies to paths matching
``config.decay_pattern`` (kernels by default: not BatchNorm, not biases, not
quantizer parameters); ``config.lr_multipliers`` is a list of ``(regex,
multiplier)``, first match wins. A regex that matches no parameter is an
error.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax


def flat_paths(tree) -> list[str]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return ['/'.join(str(getattr(k, 'key', k)) for k in path)
          for path, _ in leaves]


def _label_tree(tree, fn):
  paths = iter(flat_paths(tree))
  return jax.tree_util.tree_map(lambda _: fn(next(paths)), tree)


def make_schedule(config, total_steps: int, steps_per_epoch: int):
  warmup = int(config.warmup_epochs * steps_per_epoch)
  base = config.learning_rate
  if config.lr_schedule == 'cosine':
    if warmup:
      return optax.warmup_cosine_decay_schedule(
          0.0, base, warmup, max(total_steps, warmup + 1), end_value=0.0)
    return optax.cosine_decay_schedule(base, max(total_steps, 1))
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(base)
  if config.lr_schedule == 'linear':
    return optax.linear_schedule(base, 0.0, max(total_steps, 1))
  raise ValueError(f'config.lr_schedule={config.lr_schedule!r}; choose '
                   "'cosine', 'linear' or 'constant'.")


def make_optimizer(config, trainable, total_steps: int,
                   steps_per_epoch: int):
  """The optax transformation and its learning-rate schedule."""
  schedule = make_schedule(config, total_steps, steps_per_epoch)
  paths = flat_paths(trainable)
  decay_re = re.compile(config.decay_pattern)
  if config.weight_decay and not any(decay_re.search(p) for p in paths):
    raise ValueError(f'config.decay_pattern={config.decay_pattern!r} matches '
                     'no parameter; paths look like ' + ', '.join(paths[:5]))
  mults = [(re.compile(r), float(m)) for r, m in config.lr_multipliers]
  for r, _ in mults:
    if not any(r.search(p) for p in paths):
      raise ValueError(f'lr_multipliers regex {r.pattern!r} matches no '
                       'parameter; paths look like ' + ', '.join(paths[:5]))

  def mult_of(path):
    for r, m in mults:
      if r.search(path):
        return m
    return 1.0

  # Direction only; the (negative) learning rate is applied once, below.
  if config.optimizer == 'sgd':
    base = (optax.trace(decay=config.momentum, nesterov=config.nesterov)
            if config.momentum else optax.identity())
  elif config.optimizer == 'adamw':
    base = optax.scale_by_adam(b1=config.b1, b2=config.b2)
  else:
    raise ValueError(f'config.optimizer={config.optimizer!r}; choose '
                     "'sgd' or 'adamw'.")
  decay_mask = _label_tree(trainable, lambda p: bool(decay_re.search(p)))
  mult_tree = _label_tree(trainable, mult_of)
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  decay = ([optax.add_decayed_weights(config.weight_decay, decay_mask)]
           if config.weight_decay else [])
  # SGD: L2 added to the gradient (PyTorch's weight_decay); AdamW: decoupled,
  # added after Adam's scaling.
  chain += decay + [base] if config.optimizer == 'sgd' else [base] + decay
  chain.append(optax.scale_by_schedule(lambda s: -schedule(s)))
  if mults:
    chain.append(_scale_by_tree(mult_tree))
  return optax.chain(*chain), schedule


def _scale_by_tree(mult_tree):
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m, updates,
                                  mult_tree), state
  return optax.GradientTransformation(init, update)


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))
