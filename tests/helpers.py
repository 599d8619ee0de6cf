"""Helpers shared by several test modules (import with
``from tests import helpers``)."""

import jax
import jax.numpy as jnp
import optax

from fracq import models
from fracq.data import digits
from fracq.methods.f8net import F8NetModel
from fracq.train import checkpoint as ckpt_lib
from fracq.train import quant_config
from fracq.train import train_and_evaluate


def train_digits(get_config, arg, workdir, steps, **quant):
  """Trains ``get_config(arg)`` on digits for ``steps`` steps with export on
  (batch 64, one evaluation and checkpoint at the end), the method's block
  ``config.quant.<method>`` overridden by ``quant``. Returns the wrapper at the last step, the
  restored variables and the final metrics."""
  config = get_config(arg)
  config.num_train_steps = steps
  config.batch_size = 64
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.log_every_steps = steps
  config.export = True
  for key, value in quant.items():
    config.quant[config.quant.method][key] = value
  metrics = train_and_evaluate(config, workdir)
  raw = ckpt_lib.restore_raw(workdir)
  variables = {**raw['trainable'], **raw['state']}
  xtr = digits.load_digits_split()[0]
  wrapper = quant_config.build_model_wrapper(
    config,
    models.get_model(config.model, num_classes=10),
    jnp.asarray(xtr[:8]),
    total_steps=steps,
  ).for_step(steps)
  return wrapper, variables, metrics


def train_f8(module, x, y, options, steps=8):
  """An F8Net wrapper of ``module`` and its variables after ``steps`` SGD
  steps on two alternating batches of 64 (and the last gradients)."""
  wrapper = F8NetModel(module, x[:16], options=options)
  variables = wrapper.init(jax.random.key(0), x[:16])
  params = {c: variables[c] for c in wrapper.trainable_collections}
  state = {k: val for k, val in variables.items() if k not in params}
  tx = optax.sgd(0.05, momentum=0.9)
  opt = tx.init(params)

  @jax.jit
  def step(params, state, opt, xb, yb):
    def loss(p):
      logits, upd = wrapper.apply(
        {**p, **state}, xb, train=True, mutable=['batch_stats', 'quant_stats']
      )
      return optax.softmax_cross_entropy_with_integer_labels(
        logits, yb
      ).mean(), upd

    (_, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), {**state, **upd}, opt, grads

  grads = None
  for i in range(steps):
    batch = slice((i % 2) * 64, (i % 2 + 1) * 64)
    params, state, opt, grads = step(params, state, opt, x[batch], y[batch])
  return wrapper, {**params, **state}, grads


def warm_batch_stats(module, x, steps=3):
  """Float variables of ``module`` whose BatchNorm running statistics have
  seen ``x`` for ``steps`` training-mode passes."""
  variables = module.init(jax.random.key(0), x, train=False)
  for _ in range(steps):
    _, upd = module.apply(variables, x, train=True, mutable=['batch_stats'])
    variables = {**variables, **upd}
  return variables
