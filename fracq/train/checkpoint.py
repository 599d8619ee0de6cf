"""Orbax checkpoints: periodic saves, keep-N, resume, init-from, guard rails.

The workdir keeps ``config.json`` (the run's configuration) beside the
checkpoints. Starting a run in a workdir whose checkpoints belong to a
different configuration is refused unless ``config.overwrite`` is set, so a
mistyped ``--workdir`` never silently mixes or destroys earlier results.
Fields that do not change what is trained (logging cadence, ``overwrite``,
``export``, ``num_train_steps`` extensions...) may differ on resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

# Fields that may change between a run and its resumption.
_RESUMABLE = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'overwrite', 'export', 'num_train_steps',
              'num_epochs', 'data_dir')


def _comparable(cfg: dict) -> dict:
  return {k: v for k, v in cfg.items() if k not in _RESUMABLE}


def check_workdir(config, workdir: str) -> None:
  """Refuses a workdir holding another configuration's checkpoints."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  has_ckpt = os.path.isdir(ckpt_dir) and any(
      d.isdigit() for d in os.listdir(ckpt_dir))
  if os.path.exists(path) and has_ckpt:
    with open(path) as f:
      old = json.load(f)
    if _comparable(old) != _comparable(new):
      diff = sorted(k for k in set(old) | set(new)
                    if k not in _RESUMABLE and old.get(k) != new.get(k))
      if not config.overwrite:
        raise ValueError(
            f'Workdir {workdir} holds checkpoints of a different '
            f'configuration (differs in: {diff}). Use another --workdir, or '
            'pass --config.overwrite=True to delete them and start over.')
      logging.warning('Overwriting the checkpoints in %s (config differs '
                      'in %s).', workdir, diff)
      if jax.process_index() == 0:
        shutil.rmtree(ckpt_dir)
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def manager(workdir: str, config) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                      create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, template):
  """The latest checkpoint restored into ``template``'s structure, or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(template))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Checkpoint at step {step} in {mngr.directory} could not be '
        f'restored ({type(e).__name__}: {e}). It may be corrupt or come from '
        'a different model; use another --workdir or '
        '--config.overwrite=True.') from e


def restore_raw(workdir: str, step: int | None = None) -> dict:
  """A run's latest (or ``step``) checkpoint as a plain pytree on this host,
  whatever topology (devices, processes) wrote it."""
  path = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(path):
    raise ValueError(f'{workdir!r} has no checkpoints/ directory; point it '
                     'at a fracq workdir.')
  mngr = ocp.CheckpointManager(
      path, item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'No checkpoint found in {path}.')
  meta = mngr.item_metadata(step)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
  return mngr.restore(step, args=ocp.args.StandardRestore(template))


def load_variables(workdir: str, collections: str) -> dict:
  """Model variables (``params``, ``batch_stats``, ...) of another run
  (pruned / clustered kernels as that run computed them)."""
  raw = restore_raw(workdir)
  wanted = [c.strip() for c in collections.split(',') if c.strip()]
  flat = {}
  for group in ('trainable', 'state'):
    flat.update(raw.get(group, {}))
  if 'params' in flat:
    # A pruned / clustered run keeps masks and centroids beside the raw
    # kernels: hand on the kernels it computed with (exact zeros, centroid
    # values), so the next stage starts from the pruned/clustered model.
    from fracq.methods import preserve  # pylint: disable=g-import-not-at-top
    flat = preserve.strip(flat, keep_quant=True)
  out = {}
  for col in wanted:
    if col in flat:
      out[col] = flat[col]
    if col not in out:
      raise ValueError(f'init_from checkpoint has no collection {col!r}.')
  return out


def merge_variables(target: dict, source: dict) -> dict:
  """``target`` with the collections of ``source`` put in, shapes checked."""
  out = dict(target)
  for col, tree in source.items():
    if col not in target:
      raise ValueError(f'The model has no collection {col!r} to initialise.')
    t_paths = dict(jax.tree_util.tree_leaves_with_path(target[col]))
    s_paths = dict(jax.tree_util.tree_leaves_with_path(tree))
    missing = sorted(map(jax.tree_util.keystr, set(t_paths) - set(s_paths)))
    extra = sorted(map(jax.tree_util.keystr, set(s_paths) - set(t_paths)))
    bad = sorted(jax.tree_util.keystr(k) for k in set(t_paths) & set(s_paths)
                 if t_paths[k].shape != s_paths[k].shape)
    if missing or extra or bad:
      raise ValueError(f'init_from {col}: missing {missing[:10]}, unexpected '
                       f'{extra[:10]}, shape mismatch {bad[:10]}.')
    out[col] = jax.tree_util.tree_map(
        lambda t, s: jax.numpy.asarray(s, t.dtype), target[col], tree)
  return out
