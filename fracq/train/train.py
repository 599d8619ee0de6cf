"""Training and evaluation: small importable functions, one readable loop.

``train_and_evaluate(config, workdir)`` runs a whole experiment; the pieces
(``create_train_state``, ``make_train_step``, ``make_eval_step``,
``evaluate``) are usable from a notebook.

Data parallelism: the step is written per device with named-axis collectives
(``lax.pmean(grads, 'batch')``, cross-replica BatchNorm through the model's
``bn_axis_name='batch'``) and run as ``jax.jit(jax.shard_map(...))`` over a
one-axis mesh of every device (of every process when several hosts joined
with ``jax.distributed.initialize``): the pmap programming model, current API.
``check_vma=False`` keeps pmap's semantics, where gradients of replicated
parameters are per-device values that the step averages itself.

Any number of devices and hosts trains the same model: every statistic of a
step is that of the global batch (gradients and BatchNorm through ``pmean``
of equal shards, quantizer statistics as ``fracq.methods.providers``
describes), calibration runs on the global first batch inside the same
``shard_map`` (:func:`calibrate_global`), and the loop checks that the
replicated state is identical on every host at startup and before each
checkpoint (:mod:`fracq.train.distributed`). Results still differ in the
last bits: float32 sums over 2 examples per device and then 8 devices round
differently from one sum over 16. That is the only difference: in float64
(``jax_enable_x64``, a float64 model) one step of the digits model on 8
devices equals 1 device to 1.5e-15 of each variable's largest magnitude, and
still 1.2e-15 after 10 steps. In float32 expect, per variable, about 1e-6
of its largest magnitude after one step (digits: 8.1e-7 float model, 9e-7
LSQ-quantized), then growth by discrete events (a ReLU or max-pool choice,
a quantizer's rounding, flipped by the 1e-7 difference): after 10 float
steps 3.4e-2 on the worst variable and loss 1.457133 vs 1.457495; after 3
quantized steps up to 8% on small BatchNorm biases. Compare runs across
device counts after one step, or by their metrics.

Guard rails: a step whose loss or gradient norm is not finite is not applied
(the state keeps its last good values) and the loop stops with an error
naming the step; checkpoints are never written from a bad state.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fracq import data as data_lib
from fracq import export
from fracq.export import sizes
from fracq.methods import preserve
from fracq.methods.f8net import F8NetModel
from fracq import models
from fracq.nnx import models as nnx_models
from fracq.train import checkpoint as ckpt_lib
from fracq.train import distributed
from fracq.train import quant_config
from fracq.train import registry
from fracq.train import optim

AXIS = 'batch'


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient norm."""


class ConfigError(ValueError):
  """The configuration asks for something that cannot run."""


# Errors that are the user's to fix: ``launch.py`` prints their message
# alone (no traceback).
USER_ERRORS = (
  ConfigError,
  ckpt_lib.CheckpointError,
  data_lib.DatasetError,
  NonFiniteError,
)


def check_config(config) -> None:
  """Refuses settings that cannot run, before any work or file is made."""
  for key in ('batch_size', 'eval_batch_size'):
    value = config[key]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(
        f'config.{key}={value!r}; it must be a positive '
        'integer (the global batch, split over devices).'
      )
  steps = config.num_train_steps
  if steps is None or steps == 0 or steps < -1:
    raise ConfigError(
      f'config.num_train_steps={steps!r}; give a positive step count, or '
      '-1 to train for config.num_epochs (num_epochs=0 with -1 evaluates '
      'without training).'
    )
  if config.num_epochs is None or config.num_epochs < 0:
    raise ConfigError(f'config.num_epochs={config.num_epochs!r} must be >= 0.')
  if config.dataset not in data_lib.DATASETS:
    raise ConfigError(
      f'Unknown dataset {config.dataset!r}; choose one of {data_lib.DATASETS}.'
    )
  for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if config[key] < 1:
      raise ConfigError(f'config.{key}={config[key]!r} must be >= 1.')
  try:
    quant_config.check(config.quant)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  _check_model_api(config)
  if config.export and quant_config.is_float(config.quant):
    raise ConfigError(
      'config.export=True needs a quantized, pruned or clustered model '
      "(config.quant.method != 'none' or config.quant.preserve.mode set); "
      'this is a float run, so there is nothing to export. Drop '
      '--config.export=True or choose a quantization method.'
    )
  ckpt_lib.resume_changes(config)


# config.model_api: the Flax API the model is built with.
MODEL_APIS = ('linen', 'nnx')
# Methods the loop runs on NNX models (HAWQ on NNX models is
# fracq.nnx.hawq; a float NNX model needs no quantization wrapper).
NNX_METHODS = ('uniform', 'fracbits', 'f8net')


def _check_model_api(config) -> None:
  api = config.get('model_api', 'linen')
  if api not in MODEL_APIS:
    raise ConfigError(f'config.model_api={api!r}; choose one of {MODEL_APIS}.')
  if api != 'nnx':
    return
  if config.model not in nnx_models.MODELS:
    raise ConfigError(
      f"config.model_api='nnx' builds the NNX version of config.model, and "
      f'{config.model!r} has none (NNX models: {sorted(nnx_models.MODELS)}).'
      " Set config.model_api='linen', or pick one of those models."
    )
  if config.quant.method not in NNX_METHODS:
    raise ConfigError(
      f"config.model_api='nnx' trains quantized models by {NNX_METHODS}; "
      f'config.quant.method={config.quant.method!r} runs on linen models '
      "only: set config.model_api='linen'."
    )
  if config.half_precision:
    raise ConfigError(
      "config.model_api='nnx' runs in float32: drop "
      '--config.half_precision=True or use the linen model.'
    )


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any  # {collection: tree} that receives gradients
  state: Any  # other mutable collections (batch_stats, quant_stats)
  opt_state: Any
  bad_step: jax.Array  # first step with a non-finite loss/grad, or -1

  def variables(self):
    return {**self.trainable, **self.state}


def make_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), (AXIS,))


def build_module(config, *, axis_name: str | None = AXIS):
  kwargs = dict(config.model_kwargs)
  # A language model's classes are its vocabulary (256 bytes).
  classes_key = (
    'vocab_size' if data_lib.is_text(config.dataset) else 'num_classes'
  )
  kwargs.setdefault(classes_key, config.num_classes)
  if config.get('model_api', 'linen') == 'nnx':
    # The NNX model's weights come from the seed (linen: from init's rng).
    return nnx_models.get_model(
      config.model,
      rngs=nnx.Rngs(config.seed),
      bn_axis_name=axis_name,
      **kwargs,
    )
  if config.half_precision:
    kwargs['dtype'] = jnp.bfloat16
  return models.get_model(config.model, bn_axis_name=axis_name, **kwargs)


def sample_input(config, batch_size: int = 1):
  shape = data_lib.input_shape(
    config.dataset, config.get('image_size', 224), config.get('seq_len', 0)
  )
  dtype = jnp.int32 if data_lib.is_text(config.dataset) else jnp.float32
  return jnp.zeros((batch_size,) + shape, dtype)


def total_steps(config) -> int:
  if config.num_train_steps > 0:  # -1: from num_epochs
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * data_lib.steps_per_epoch(config)))


def create_train_state(
  config, wrapper, first_batch, rng, *, total: int, mesh: Mesh | None = None
):
  """Initial state: variables (calibrated on ``first_batch``) + optimizer.

  ``first_batch`` is this host's part of the first batch; calibration runs
  on the global batch over ``mesh`` (default: every device of every
  process), so the quantizer statistics do not depend on how the batch is
  split over devices and hosts.
  """
  x = jnp.asarray(data_lib.model_input(first_batch))
  variables = jax.jit(functools.partial(wrapper.init, train=False))(rng, x)
  variables = jax.tree_util.tree_map(lambda v: v, dict(variables))
  variables = calibrate_global(
    wrapper,
    variables,
    data_lib.model_input(first_batch),
    mesh if mesh is not None else make_mesh(),
  )
  return state_from_variables(config, wrapper, variables, total=total)


def calibrate_global(wrapper, variables, local_images, mesh: Mesh):
  """``wrapper.calibrate`` on the global batch made of every host's
  ``local_images``; returns this host's (single-device) copy."""
  images = to_global({'image': local_images}, mesh)['image']
  out = distributed.calibrate(
    wrapper, replicate(variables, mesh), images, mesh, AXIS
  )
  return jax.tree_util.tree_map(
    lambda v: jnp.asarray(distributed.local_value(v)), out
  )


def state_from_variables(config, wrapper, variables, *, total: int):
  trainable = {
    c: variables[c] for c in wrapper.trainable_collections if c in variables
  }
  state = {c: v for c, v in variables.items() if c not in trainable}
  tx, _ = optim.make_optimizer(
    config, trainable, total, data_lib.steps_per_epoch(config)
  )
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    state=state,
    opt_state=tx.init(trainable),
    bad_step=jnp.full((), -1, jnp.int32),
  ), tx


def cross_entropy(logits, labels, mask):
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  per = optax.softmax_cross_entropy(logits, onehot)
  return jnp.sum(per * mask), jnp.sum(mask)


def make_train_step(config, wrapper, tx, mesh: Mesh):
  """The jitted data-parallel step ``(state, batch) -> (state, metrics)``."""
  smoothing = config.label_smoothing
  nan_step = config.get('debug_nan_at_step', -1)
  aux_weight = config.get('aux_loss_weight', 0.4)
  seed = config.seed
  text = data_lib.is_text(config.dataset)

  def step_fn(state: TrainState, batch):
    # Text: y holds the next byte of every position; the loss below is the
    # mean cross-entropy over every position of every window.
    x, y = data_lib.model_input(batch), data_lib.model_target(batch)
    mask = jnp.ones(y.shape, jnp.float32)
    mutable = list(state.state.keys())

    # Dropout keys: a pure function of (seed, step, device), so a resumed
    # run draws exactly the masks an uninterrupted one would.
    key = jax.random.fold_in(
      jax.random.fold_in(jax.random.PRNGKey(seed), state.step),
      jax.lax.axis_index(AXIS),
    )

    def loss_fn(trainable):
      out, new_state = wrapper.apply(
        {**trainable, **state.state},
        x,
        train=True,
        mutable=mutable,
        rngs={'dropout': key},
      )
      logits, aux = out if isinstance(out, tuple) else (out, None)
      labels = jax.nn.one_hot(y, logits.shape[-1])
      if smoothing:
        labels = labels * (1 - smoothing) + smoothing / logits.shape[-1]
      task = jnp.mean(optax.softmax_cross_entropy(logits, labels))
      if aux is not None:  # e.g. Inception-V3's auxiliary classifier
        task += aux_weight * jnp.mean(optax.softmax_cross_entropy(aux, labels))
      if nan_step >= 0:  # fault injection, to test the guard rails
        task = jnp.where(state.step == nan_step, jnp.nan, task)
      pen, pen_metrics = wrapper.penalty(
        {**trainable, **state.state}, state.step
      )
      return task + pen, (task, logits, new_state, pen_metrics)

    (loss, (task, logits, new_state, pen_metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(state.trainable)
    grads = jax.lax.pmean(grads, AXIS)
    new_state = jax.tree_util.tree_map(
      lambda v: (
        jax.lax.pmean(v, AXIS) if jnp.issubdtype(v.dtype, jnp.floating) else v
      ),
      dict(new_state),
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    gnorm = optim.global_norm(grads)
    loss = jax.lax.pmean(loss, AXIS)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jnp.where(ok, n, o), new, old
    )
    correct = jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) == y), AXIS)
    count = jax.lax.psum(jnp.sum(mask), AXIS)
    new = TrainState(
      step=state.step + 1,
      trainable=keep(trainable, state.trainable),
      state=keep(new_state, state.state),
      opt_state=keep(opt_state, state.opt_state),
      bad_step=jnp.where(
        (state.bad_step < 0) & ~ok, state.step, state.bad_step
      ),
    )
    metrics = {
      'loss': loss,
      'task_loss': jax.lax.pmean(task, AXIS),
      'accuracy': correct / count,
      'grad_norm': gnorm,
    }
    if text:
      metrics['bits_per_byte'] = metrics['task_loss'] / math.log(2)
    metrics.update({k: jax.lax.pmean(v, AXIS) for k, v in pen_metrics.items()})
    return new, metrics

  sharded = jax.shard_map(
    step_fn,
    mesh=mesh,
    in_specs=(P(), P(AXIS)),
    out_specs=(P(), P()),
    check_vma=False,
  )
  return jax.jit(sharded, donate_argnums=(0,))


def make_eval_step(wrapper, mesh: Mesh):
  def step_fn(variables, batch):
    out = wrapper.apply(variables, data_lib.model_input(batch), train=False)
    logits = out[0] if isinstance(out, tuple) else out
    # Per example (images) or per position (text: next-byte loss, accuracy).
    mask = batch['mask'].astype(jnp.float32)
    labels = data_lib.model_target(batch)
    loss, n = cross_entropy(logits, labels, mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
    return jax.lax.psum(jnp.stack([loss, correct, n]), AXIS)

  return jax.jit(
    jax.shard_map(
      step_fn,
      mesh=mesh,
      in_specs=(P(), P(AXIS)),
      out_specs=P(),
      check_vma=False,
    )
  )


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of the mesh (all processes)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if not isinstance(x, (jax.Array, np.ndarray)):
      return x
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(
      host.shape, sharding, lambda idx: host[idx]
    )

  return jax.tree_util.tree_map(put, tree)


def to_global(batch, mesh: Mesh):
  """This host's part of a batch -> a global array sharded over the mesh."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in batch.items()
  }


def evaluate(config, wrapper, variables, mesh, eval_step=None):
  """Loss and accuracy over the whole eval split.

  Text: per predicted byte (``eval_examples`` counts bytes), plus
  ``eval_bits_per_byte`` (the loss in nats / ln 2).
  """
  eval_step = eval_step or make_eval_step(wrapper, mesh)
  tot = np.zeros(3)
  for batch in data_lib.eval_batches(config):
    tot += np.asarray(eval_step(variables, to_global(batch, mesh)))
  out = {
    'eval_loss': tot[0] / tot[2],
    'eval_accuracy': tot[1] / tot[2],
    'eval_examples': int(tot[2]),
  }
  if data_lib.is_text(config.dataset):
    out['eval_bits_per_byte'] = out['eval_loss'] / math.log(2)
  return out


def _check_finite(state: TrainState):
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise NonFiniteError(
      f'Non-finite loss or gradient norm at step {bad}; that update was '
      'not applied and no checkpoint was written from it (the last good '
      'checkpoint is kept). To continue from that checkpoint with safer '
      'settings, rerun the same command with e.g. '
      '--config.learning_rate=<lower> --config.grad_clip_norm=1.0 '
      '--config.resume_changes=learning_rate,grad_clip_norm; or check the '
      'input data.'
    )


def _bits_frozen(variables) -> bool:
  """True when ``quant_stats`` holds hard-assigned (frozen) bit-widths."""
  found = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(
    variables.get('quant_stats', {})
  ):
    name = str(getattr(path[-1], 'key', path[-1])) if path else ''
    if name.endswith('_hard_bits'):
      found.append(bool(np.all(np.asarray(jax.device_get(leaf)) >= 0)))
  return bool(found) and all(found)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains and evaluates ``config``, writing everything to ``workdir``.

  Returns the final evaluation metrics (plus the wrapper's metrics).
  """
  from clu import metric_writers

  check_config(config)
  mesh = make_mesh()
  n_dev = mesh.devices.size
  if config.batch_size % n_dev or config.eval_batch_size % n_dev:
    raise ConfigError(
      f'config.batch_size={config.batch_size} and '
      f'eval_batch_size={config.eval_batch_size} must divide '
      f'by the {n_dev} devices.'
    )
  # Reading the first batch before the workdir is touched: a missing or
  # unreadable dataset leaves no half-made workdir behind.
  first = next(data_lib.train_iterator(config, 0))
  # Text runs record the exact corpus (its bytes differ across Pythons).
  provenance = data_lib.provenance(config)
  if provenance:
    logging.info('Data: %s', provenance)
  changed = ckpt_lib.check_workdir(config, workdir)
  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0
  )
  mngr = None
  try:
    writer.write_hparams(
      {
        k: v
        for k, v in config.to_dict().items()
        if isinstance(v, (int, float, str, bool))
      }
      | provenance
    )
    mngr = ckpt_lib.manager(workdir, config)
    return (
      _run(config, workdir, mesh, writer, mngr, changed, first) | provenance
    )
  finally:
    # Close orbax's background threads and the event writer whatever
    # happened, so an error is the last thing printed (not interpreter
    # shutdown noise from threads still running).
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
    writer.flush()
    writer.close()


def _run(config, workdir, mesh, writer, mngr, changed, first) -> dict:
  """The body of :func:`train_and_evaluate` (writers and manager open)."""
  from clu import metrics as clu_metrics
  from clu import periodic_actions

  total = total_steps(config)
  module = build_module(config)
  wrapper = quant_config.build_model_wrapper(
    config, module, data_lib.model_input(first)[:1], total_steps=total
  )
  rng = jax.random.key(config.seed)
  state, tx = create_train_state(
    config, wrapper, first, rng, total=total, mesh=mesh
  )
  restored = ckpt_lib.restore_latest(mngr, state, workdir)
  if restored is not None:
    state = restored
    logging.info('Resumed from step %d.', int(state.step))
    if changed:
      lr = optim.make_schedule(config, total, data_lib.steps_per_epoch(config))(
        int(state.step)
      )
      logging.warning(
        'Resumed with changed %s: the schedule now runs to '
        'step %d and gives learning rate %.4g at the resumed '
        'step %d.',
        changed,
        total,
        float(lr),
        int(state.step),
      )
    hard_step = getattr(wrapper, 'hard_assign_step', None)
    if (
      hard_step is not None
      and not getattr(wrapper, 'hard', True)
      and _bits_frozen(state.state)
    ):
      # Bits were assigned before the checkpoint: they stay frozen even if
      # a changed schedule moved the assignment step past the resumed one.
      wrapper = wrapper.for_step(max(hard_step, int(state.step)))
      logging.info(
        'Restored bit-widths are hard-assigned: they stay frozen '
        '(%s, hard bits).',
        type(wrapper).__name__,
      )
  elif config.init_from:
    variables = ckpt_lib.load_variables(
      config.init_from, config.init_collections
    )
    merged = ckpt_lib.merge_variables(state.variables(), variables)
    merged = calibrate_global(
      wrapper, merged, data_lib.model_input(first), mesh
    )
    state, tx = state_from_variables(config, wrapper, merged, total=total)
    logging.info(
      'Initialised %s from %s.', config.init_collections, config.init_from
    )
  start = int(state.step)

  def switch(wrapper, state, step):
    w = wrapper.for_step(step)
    if w is not wrapper:
      if (
        getattr(w, 'hard', False)
        and step == getattr(wrapper, 'hard_assign_step', None)
        and jax.process_index() == 0
      ):
        # The learned fractional bits the hard assignment rounds
        # (bits_step<N>.{txt,json,png} at the assignment step).
        wrapper.report(state.variables(), workdir, step, writer)
      v = w.prepare(state.variables())
      trainable = {c: v[c] for c in state.trainable}
      state = state.replace(
        trainable=trainable, state={c: v[c] for c in state.state}
      )
      logging.info(
        'Step %d: switched to %s.',
        step,
        type(w).__name__
        + (' (hard bits)' if getattr(w, 'hard', False) else ''),
      )
    return w, state

  wrapper, state = switch(wrapper, state, start)
  state = replicate(state, mesh)
  distributed.assert_equal_across_hosts(state, f'the state at step {start}')
  train_step = make_train_step(config, wrapper, tx, mesh)
  eval_step = make_eval_step(wrapper, mesh)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
  schedule = optim.make_schedule(
    config, total, data_lib.steps_per_epoch(config)
  )
  try:
    it = data_lib.train_iterator(config, start)
    t0, logged, collection = time.time(), None, None
    eval_metrics = {}
    for step in range(start, total):
      new_wrapper, state = switch(wrapper, state, step)
      if new_wrapper is not wrapper:
        wrapper = new_wrapper
        state = replicate(state, mesh)
        train_step = make_train_step(config, wrapper, tx, mesh)
        eval_step = make_eval_step(wrapper, mesh)
      batch = to_global(next(it), mesh)
      state, metrics = train_step(state, batch)
      if collection is None or set(metrics) != set(collection.__annotations__):
        collection = clu_metrics.Collection.create(
          **{k: clu_metrics.Average.from_output(k) for k in metrics}
        )
        logged = None
      upd = collection.single_from_model_output(**metrics)
      logged = upd if logged is None else logged.merge(upd)
      report(step + 1)
      last = step + 1 == total
      if (step + 1) % config.log_every_steps == 0 or last:
        _check_finite(state)
        m = {k: float(v) for k, v in logged.compute().items()}
        logged = None
        m['learning_rate'] = float(schedule(step))
        writer.write_scalars(step + 1, m)
        rate = config.log_every_steps / max(time.time() - t0, 1e-9)
        logging.info(
          'step %d/%d  loss %.4f  acc %.4f  lr %.4g  %.1f steps/s  ETA %s',
          step + 1,
          total,
          m['loss'],
          m['accuracy'],
          m['learning_rate'],
          rate,
          time.strftime(
            '%H:%M:%S', time.gmtime((total - step - 1) / max(rate, 1e-9))
          ),
        )
        t0 = time.time()
      if (step + 1) % config.eval_every_steps == 0 or last:
        eval_metrics = evaluate(
          config, wrapper, state.variables(), mesh, eval_step
        )
        eval_metrics.update(wrapper.metrics(state.variables()))
        writer.write_scalars(step + 1, eval_metrics)
        logging.info('eval at step %d: %s', step + 1, eval_metrics)
      if (step + 1) % config.checkpoint_every_steps == 0 or last:
        _check_finite(state)
        distributed.assert_equal_across_hosts(
          state, f'the state at step {step + 1}'
        )
        ckpt_lib.save(mngr, step + 1, state)
  finally:
    # Let in-flight (good) checkpoint writes finish even when a guard rail
    # stops the run.
    mngr.wait_until_finished()
  if start >= total:
    eval_metrics = evaluate(config, wrapper, state.variables(), mesh, eval_step)
    eval_metrics.update(wrapper.metrics(state.variables()))
  if jax.process_index() == 0:
    wrapper.report(state.variables(), workdir, total, writer)
  writer.flush()
  if config.export and jax.process_index() == 0:
    eval_metrics.update(_export(config, wrapper, state, workdir))
  return eval_metrics


def _export(config, wrapper, state, workdir) -> dict:
  """Writes the export artifacts and the size report into ``workdir``.

  ``model.fracq.safetensors``: the packed weights (uniform QAT / FracBits);
  ``model.int.safetensors``: the integer-only program (F8Net always; QAT
  models whose structure lowers, see ``fracq.export.lowering``);
  ``model.onnx``: the same program as an ONNX QDQ graph;
  ``model.float.safetensors``: float pruned / clustered models, stripped.
  """
  if not (
    hasattr(wrapper, 'facts')
    or isinstance(wrapper, F8NetModel)
    or hasattr(wrapper, 'to_linen')
  ):
    raise ValueError(
      'config.export=True needs a quantized, pruned or '
      "clustered model (config.quant.method != 'none' or "
      'config.quant.preserve.mode set).'
    )
  variables = jax.device_get(state.variables())
  sample = data_lib.model_input(next(iter(data_lib.eval_batches(config))))
  if hasattr(wrapper, 'to_linen'):
    # An NNX model exports through its linen twin, checked on the sample to
    # compute what the NNX model computes (fracq.nnx.to_linen).
    wrapper, variables = wrapper.to_linen(variables, sample)
  meta = {'model': config.model, 'method': config.quant.method}
  out, texts = {}, []
  if not registry.get(config.quant.method).quantized:
    # Float pruning / clustering: the stripped float32 model (exact zeros
    # and centroid values in params), and its gzip size.
    path = os.path.join(workdir, 'model.float.safetensors')
    n = sizes.save_float_variables(
      preserve.strip(variables, qmodel=wrapper),
      path,
      overwrite=config.overwrite,
    )
    gz = sizes.gzip_bytes(path)
    out.update({'float32_bytes': n, 'float32_gzip_bytes': gz})
    texts.append(
      f'{path}\nfloat32 (stripped) {n:,} bytes; gzip -9 {gz:,} bytes'
    )
    return _write_size_report(workdir, texts, out)
  if hasattr(wrapper, 'facts'):
    path = os.path.join(workdir, 'model.fracq.safetensors')
    rep = export.export_model(
      wrapper, variables, path, overwrite=config.overwrite, metadata=meta
    )
    texts.append(f'{path}\n{rep.format()}')
    out['artifact_gzip_bytes'] = sizes.gzip_bytes(path)
    out.update(
      {
        'artifact_bytes': rep.artifact_bytes,
        'artifact_over_theoretical': rep.actual_over_theoretical,
        'artifact_theoretical_bytes': rep.theoretical_bytes,
        'artifact_structure_saved_bytes': rep.structure_saved_bytes,
        'artifact_compression_over_int8': rep.int8_artifact_bytes
        / rep.artifact_bytes,
      }
    )
  ipath = os.path.join(workdir, 'model.int.safetensors')
  try:
    irep = export.export_integer(
      wrapper,
      variables,
      sample,
      ipath,
      overwrite=config.overwrite,
      metadata=meta,
    )
  except ValueError as e:
    if isinstance(wrapper, F8NetModel):
      raise
    texts.append(f'integer-only program: not written ({e})')
  else:
    texts.append(
      f'{ipath} (integer-only program)\n{irep["summary"]}\n'
      f'program bytes {irep["program_bytes"]:,} (theoretical '
      f'{irep["program_theoretical_bytes"]:,.0f}); predictions equal to the '
      f'fake-quantized model on one eval batch: '
      f'{100 * irep["integer_prediction_match"]:.2f}%; max |logit diff| / '
      f'logit range {irep["integer_max_logit_diff_rel"]:.2e}'
      + (
        f'; teacher-forced check: {irep["integer_tied_codes"]:,} of '
        f'{irep["integer_checked_codes"]:,} layer input codes off by one at '
        'rounding ties'
        if 'integer_tied_codes' in irep
        else ''
      )
    )
    out.update({k: v for k, v in irep.items() if k != 'summary'})
    opath = os.path.join(workdir, 'model.onnx')
    try:
      orep = export.export_onnx(
        wrapper, variables, sample, opath, overwrite=config.overwrite
      )
    except ValueError as e:
      texts.append(f'ONNX export: not written ({e})')
    else:
      out.update(orep)
      texts.append(
        f'{opath} (ONNX QDQ, opset {orep["onnx_opset"]}): '
        f'{orep["onnx_bytes"]:,} bytes, {orep["onnx_int4_initializers"]} '
        'INT4 kernels; onnxruntime predictions equal to the integer '
        f'program on one eval batch: '
        f'{100 * orep["onnx_prediction_match"]:.2f}%'
      )
  return _write_size_report(workdir, texts, out)


def _write_size_report(workdir, texts, out) -> dict:
  text = '\n\n'.join(texts)
  with open(os.path.join(workdir, 'size_report.txt'), 'w') as f:
    f.write(text + '\n')
  logging.info('Exported:\n%s', text)
  return out
