"""Optimizers, schedules and regex parameter groups (big_vision style).

Parameters are addressed by their flattened path in the trainable pytree,
``collection/module/.../name`` (``params/stage1_block0/conv1/kernel``,
``quant/head/kernel_step``). Weight decay applies to paths matching
``config.decay_pattern`` (kernels by default: not BatchNorm, not biases, not
quantizer parameters); ``config.lr_multipliers`` is a list of ``(regex,
multiplier)``, first match wins. A regex that matches no parameter is an
error. Learned bit-widths (``quant/.../*_bits``) have their own optimizer
(``config.bits_optimizer``, see :func:`make_optimizer`).
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import optax


def flat_paths(tree) -> list[str]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [
    '/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in leaves
  ]


def _label_tree(tree, fn):
  paths = iter(flat_paths(tree))
  return jax.tree_util.tree_map(lambda _: fn(next(paths)), tree)


# Learned bit-widths (``quant/<layer>/kernel_bits``, ``.../input_bits``).
BITS_PATTERN = r'^quant/.*_bits$'


def make_schedule(
  config, total_steps: int, steps_per_epoch: int, base: float | None = None
):
  """The learning-rate schedule peaking at ``base`` (``learning_rate``)."""
  warmup = int(config.warmup_epochs * steps_per_epoch)
  base = config.learning_rate if base is None else base
  if config.lr_schedule == 'cosine':
    if warmup:
      return optax.warmup_cosine_decay_schedule(
        0.0, base, warmup, max(total_steps, warmup + 1), end_value=0.0
      )
    return optax.cosine_decay_schedule(base, max(total_steps, 1))
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(base)
  if config.lr_schedule == 'linear':
    return optax.linear_schedule(base, 0.0, max(total_steps, 1))
  raise ValueError(
    f'config.lr_schedule={config.lr_schedule!r}; choose '
    "'cosine', 'linear' or 'constant'."
  )


def _direction(
  name: str, key: str, *, momentum: float, nesterov: bool, b1: float, b2: float
):
  """The update direction of optimizer ``name`` (before the learning rate)."""
  if name == 'sgd':
    return (
      optax.trace(decay=momentum, nesterov=nesterov)
      if momentum
      else optax.identity()
    )
  if name == 'adamw':
    return optax.scale_by_adam(b1=b1, b2=b2)
  raise ValueError(f"config.{key}={name!r}; choose 'sgd' or 'adamw'.")


def make_optimizer(config, trainable, total_steps: int, steps_per_epoch: int):
  """The optax transformation and its learning-rate schedule.

  Learned bit-widths (paths matching ``BITS_PATTERN``) get their own
  optimizer, ``config.bits_optimizer`` (SGD by default, as the FracBits
  authors train them), with learning rate ``config.bits_learning_rate`` and
  momentum ``config.bits_momentum`` (unset: the weights' values) on the
  weights' schedule shape, and never weight decay: a per-parameter
  normalising optimizer such as Adam moves every bit-width at the same speed
  whatever its layer's cost, which would erase the penalty's per-layer
  weighting. Gradient clipping and ``lr_multipliers`` apply to every
  parameter.
  """
  schedule = make_schedule(config, total_steps, steps_per_epoch)
  paths = flat_paths(trainable)
  bits_re = re.compile(BITS_PATTERN)
  bits_paths = [p for p in paths if bits_re.search(p)]
  other_paths = [p for p in paths if not bits_re.search(p)]
  decay_re = re.compile(config.decay_pattern)
  if config.weight_decay and not any(decay_re.search(p) for p in other_paths):
    raise ValueError(
      f'config.decay_pattern={config.decay_pattern!r} matches '
      'no parameter (bit-widths are never decayed); paths '
      'look like ' + ', '.join(other_paths[:5])
    )
  mults = [(re.compile(r), float(m)) for r, m in config.lr_multipliers]
  for r, _ in mults:
    if not any(r.search(p) for p in paths):
      raise ValueError(
        f'lr_multipliers regex {r.pattern!r} matches no '
        'parameter; paths look like ' + ', '.join(paths[:5])
      )

  def mult_of(path):
    for r, m in mults:
      if r.search(path):
        return m
    return 1.0

  # Direction only; the (negative) learning rate is applied once, below.
  base = _direction(
    config.optimizer,
    'optimizer',
    momentum=config.momentum,
    nesterov=config.nesterov,
    b1=config.b1,
    b2=config.b2,
  )
  bits_name = config.get('bits_optimizer', 'sgd')
  bits_lr = config.get('bits_learning_rate', None)
  bits_momentum = config.get('bits_momentum', None)
  bits_lr = config.learning_rate if bits_lr is None else float(bits_lr)
  bits_momentum = (
    config.momentum if bits_momentum is None else float(bits_momentum)
  )
  if bits_lr < 0 or not 0 <= bits_momentum < 1:
    raise ValueError(
      f'config.bits_learning_rate={bits_lr} must be >= 0 and '
      f'config.bits_momentum={bits_momentum} in [0, 1).'
    )
  bits_base = _direction(
    bits_name,
    'bits_optimizer',
    momentum=bits_momentum,
    nesterov=config.nesterov,
    b1=config.b1,
    b2=config.b2,
  )
  # A callable mask: inside multi_transform the weights' group sees a tree
  # whose bit-width leaves are masked out.
  decay = (
    [
      optax.add_decayed_weights(
        config.weight_decay,
        lambda tree: _label_tree(tree, lambda p: bool(decay_re.search(p))),
      )
    ]
    if config.weight_decay
    else []
  )
  # SGD: L2 added to the gradient (PyTorch's weight_decay); AdamW: decoupled,
  # added after Adam's scaling.
  main = decay + [base] if config.optimizer == 'sgd' else [base] + decay
  main.append(optax.scale_by_schedule(lambda s: -schedule(s)))
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if bits_paths:
    bits_schedule = make_schedule(
      config, total_steps, steps_per_epoch, base=bits_lr
    )
    bits_tx = optax.chain(
      bits_base, optax.scale_by_schedule(lambda s: -bits_schedule(s))
    )
    labels = _label_tree(
      trainable, lambda p: 'bits' if bits_re.search(p) else 'main'
    )
    chain.append(
      optax.multi_transform(
        {'main': optax.chain(*main), 'bits': bits_tx}, labels
      )
    )
    logging.info(
      'Bit-widths (%d tensors): %s, lr %.4g, momentum %.3g, no '
      'weight decay; other parameters: %s, lr %.4g.',
      len(bits_paths),
      bits_name,
      bits_lr,
      bits_momentum,
      config.optimizer,
      config.learning_rate,
    )
  else:
    chain += main
  if mults:
    chain.append(_scale_by_tree(_label_tree(trainable, mult_of)))
  return optax.chain(*chain), schedule


def _scale_by_tree(mult_tree):
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m, updates, mult_tree), state

  return optax.GradientTransformation(init, update)


def global_norm(tree):
  return jnp.sqrt(
    sum(
      jnp.sum(jnp.square(x.astype(jnp.float32)))
      for x in jax.tree_util.tree_leaves(tree)
    )
  )
