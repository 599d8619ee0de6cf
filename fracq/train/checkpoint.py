"""Orbax checkpoints: periodic saves, keep-N, resume, init-from, guard rails.

The workdir keeps ``config.json`` (the run's configuration) beside the
checkpoints. Starting a run in a workdir whose checkpoints belong to a
different configuration is refused, so a mistyped ``--workdir`` never
silently mixes or destroys earlier results. Fields that do not change what
is trained (logging cadence, ``export``, ``data_dir``...) may differ on
resume; optimisation and schedule fields (``learning_rate``,
``grad_clip_norm``, ``num_train_steps``...) may differ only when listed in
``config.resume_changes``; model and quantization fields never.

``config.overwrite=True`` starts over: the previous run's outputs (the files
listed in ``RUN_OUTPUTS``) move into ``<workdir>/previous-<UTC time>/``;
nothing else in the workdir is touched.

Every checkpoint records a SHA-256 digest of each saved array (orbax custom
metadata). Restoring verifies them; a checkpoint that fails to restore or to
verify is skipped for the newest older one that does, and the skipped ones
move into ``<workdir>/checkpoints-corrupt/``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fracq.methods import preserve


class CheckpointError(ValueError):
  """The workdir's checkpoints cannot be used as asked."""


# Fields that may change between a run and its resumption.
_RESUMABLE = (
  'log_every_steps',
  'eval_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'overwrite',
  'export',
  'data_dir',
  'debug_nan_at_step',
  'resume_changes',
)
# Fields added to the configuration after runs were written with it: a saved
# config.json without one reads as this default (the value every earlier
# run had), so those runs still resume.
ADDED_FIELDS = {'model_api': 'linen'}
# Fields that may change on resume when listed in config.resume_changes:
# optimisation and schedule settings, which leave the saved state's
# structure alone.
RESUME_CHANGEABLE = (
  'learning_rate',
  'lr_schedule',
  'warmup_epochs',
  'momentum',
  'nesterov',
  'b1',
  'b2',
  'weight_decay',
  'decay_pattern',
  'lr_multipliers',
  'grad_clip_norm',
  'label_smoothing',
  'aux_loss_weight',
  'num_train_steps',
  'num_epochs',
)
# What a run writes into its workdir (glob patterns); overwrite=True moves
# exactly these aside.
RUN_OUTPUTS = (
  'config.json',
  'checkpoints',
  'checkpoints-corrupt',
  'events.out.tfevents.*',
  'model.fracq.safetensors',
  'model.int.safetensors',
  'model.onnx',
  'model.float.safetensors',
  'size_report.txt',
  'bits_step*.png',
  'bits_step*.txt',
  'bits_step*.json',
  'f8net_step*.json',
  'import.json',
)


def resume_changes(config) -> list[str]:
  """The keys of ``config.resume_changes``, checked."""
  raw = config.get('resume_changes', '') or ''
  keys = [k.strip() for k in raw.split(',') if k.strip()]
  bad = [k for k in keys if k not in RESUME_CHANGEABLE]
  if bad:
    raise CheckpointError(
      f'config.resume_changes lists {bad}, which cannot change when a run '
      'resumes (they change the model, the quantization or the saved '
      'state). Only optimisation, schedule and logging keys may: '
      f'{", ".join(RESUME_CHANGEABLE)}. To change the others, start a new '
      'run (another --workdir, or --config.overwrite=True).'
    )
  return keys


def _run_outputs(workdir: str) -> list[str]:
  if not os.path.isdir(workdir):
    return []
  return sorted(
    name
    for name in os.listdir(workdir)
    if any(fnmatch.fnmatch(name, p) for p in RUN_OUTPUTS)
  )


def _has_checkpoints(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(ckpt_dir) and any(
    d.isdigit() for d in os.listdir(ckpt_dir)
  )


def move_previous_run(workdir: str) -> str | None:
  """Moves the previous run's outputs into ``previous-<UTC time>/``."""
  names = _run_outputs(workdir)
  if not names:
    return None
  dest = os.path.join(
    workdir, 'previous-' + time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  )
  base, n = dest, 1
  while os.path.exists(dest):
    dest, n = f'{base}-{n}', n + 1
  if jax.process_index() == 0:
    os.makedirs(dest)
    for name in names:
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  logging.warning(
    "overwrite=True: moved the previous run's outputs (%s) into %s.",
    ', '.join(names),
    dest,
  )
  return dest


def check_workdir(config, workdir: str) -> list[str]:
  """Refuses a workdir holding another configuration's checkpoints.

  Returns the ``resume_changes`` keys that really differ from the saved
  configuration (empty for a fresh run or an unchanged one).
  """
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  allowed = resume_changes(config)
  changed = []
  if config.overwrite:
    move_previous_run(workdir)
  elif os.path.exists(path) and _has_checkpoints(workdir):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(
      k
      for k in set(old) | set(new)
      if k not in _RESUMABLE
      and old.get(k, ADDED_FIELDS.get(k)) != new.get(k, ADDED_FIELDS.get(k))
    )
    changed = [k for k in diff if k in allowed]
    refused = [k for k in diff if k not in allowed]
    if refused:
      fixable = [k for k in refused if k in RESUME_CHANGEABLE]
      hint = (
        f'To resume with the changed {fixable} on purpose, pass '
        f'--config.resume_changes={",".join(fixable + changed)}. '
        if fixable and len(fixable) == len(refused)
        else ''
      )
      raise CheckpointError(
        f'Workdir {workdir} holds checkpoints of a different '
        f'configuration (differs in: {refused}). {hint}Otherwise use '
        'another --workdir, or pass --config.overwrite=True to move the '
        "previous run's outputs into <workdir>/previous-<time>/ and start "
        'over.'
      )
    for k in changed:
      logging.warning(
        'Resuming with config.%s changed from %r to %r '
        '(config.resume_changes).',
        k,
        old.get(k),
        new.get(k),
      )
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('fracq_check_workdir')
  return changed


def manager(workdir: str, config) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints, create=True
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')), options=opts
  )


def _canonical_leaves(tree) -> dict[str, Any]:
  """``tree``'s leaves by a path that survives a save/restore round trip.

  Attribute, field and dict keys all become names (orbax stores dataclasses
  and named tuples as dicts), and a sequence index becomes the rank among
  the siblings that hold arrays: an optimizer chain that gains or loses a
  stateless link (``grad_clip_norm`` switched on) keeps its paths.
  """

  def entry(key):
    if isinstance(key, jax.tree_util.SequenceKey):
      return ('i', key.idx)
    for attr in ('key', 'name'):
      if hasattr(key, attr):
        return ('k', str(getattr(key, attr)))
    return ('k', str(key))

  leaves = [
    ([entry(k) for k in path], leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  ]
  siblings = {}
  for path, _ in leaves:
    for j, (kind, value) in enumerate(path):
      if kind == 'i':
        siblings.setdefault(tuple(path[:j]), set()).add(value)
  ranks = {prefix: sorted(idx) for prefix, idx in siblings.items()}
  out = {}
  for path, leaf in leaves:
    parts = []
    for j, (kind, value) in enumerate(path):
      parts.append(
        str(ranks[tuple(path[:j])].index(value)) if kind == 'i' else value
      )
    out['/'.join(parts)] = leaf
  return out


def digests(tree) -> dict[str, str]:
  """SHA-256 of each array of ``tree`` (dtype, shape and bytes), by path."""
  out = {}
  for path, leaf in _canonical_leaves(tree).items():
    host = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h = hashlib.sha256(f'{host.dtype.str}{host.shape}'.encode())
    h.update(host.tobytes())
    out[path] = h.hexdigest()
  return out


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(
    step,
    args=ocp.args.StandardSave(state),
    custom_metadata={'sha256': digests(state)},
  )


def _verify(mngr, step: int, restored) -> None:
  meta = mngr.metadata(step)
  recorded = (getattr(meta, 'custom_metadata', None) or {}).get('sha256')
  if not recorded:
    logging.warning(
      'Checkpoint at step %d has no checksums (written by an '
      'older fracq); restored unverified.',
      step,
    )
    return
  actual = digests(restored)
  bad = sorted(
    k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k)
  )
  if bad:
    raise CheckpointError(
      f'checksum mismatch in {len(bad)} array(s), e.g. {bad[:3]}'
    )


def restore_latest(mngr: ocp.CheckpointManager, template, workdir=None):
  """The newest checkpoint that restores into ``template``'s structure and
  matches its checksums, or None when there is none.

  Newer checkpoints that fail are logged with the reason and moved into
  ``<workdir>/checkpoints-corrupt/`` (so later saves at their steps are
  possible); when every checkpoint fails nothing is moved and the error
  lists each reason.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  reasons = []
  for step in steps:
    try:
      restored = _restore_into(mngr, step, template)
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
      reasons.append((step, reason[:300]))
      logging.warning(
        'Checkpoint at step %d in %s cannot be used (%s); trying an older one.',
        step,
        mngr.directory,
        reason,
      )
      continue
    if reasons:
      skipped = [s for s, _ in reasons]
      logging.warning(
        'Resuming from the checkpoint at step %d; skipped the '
        'newer unusable checkpoint(s) %s.',
        step,
        skipped,
      )
      _move_aside(mngr, skipped, workdir)
    return restored
  listing = '; '.join(f'step {s}: {r}' for s, r in reasons)
  raise CheckpointError(
    f'No checkpoint in {mngr.directory} could be restored ({listing}). '
    'They are corrupt or were written by a different model. Use another '
    "--workdir, or pass --config.overwrite=True to move this run's outputs "
    'into <workdir>/previous-<time>/ and start over.'
  )


def _restore_into(mngr, step: int, template):
  """Checkpoint ``step`` restored, checksum-verified, in ``template``'s
  structure; a saved tree whose structure differs only by stateless links
  (see ``_canonical_leaves``) is mapped over leaf by leaf."""
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(template))
  except ValueError as e:
    if 'structures do not match' not in str(e):
      raise
  else:
    _verify(mngr, step, restored)
    return restored
  meta = mngr.item_metadata(step)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  raw = mngr.restore(
    step,
    args=ocp.args.StandardRestore(
      jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta
      )
    ),
  )
  _verify(mngr, step, raw)
  saved = _canonical_leaves(raw)
  wanted = _canonical_leaves(template)
  bad = sorted(
    k
    for k in set(saved) | set(wanted)
    if k not in saved
    or k not in wanted
    or saved[k].shape != wanted[k].shape
    or saved[k].dtype != wanted[k].dtype
  )
  if bad:
    raise CheckpointError(
      f"the saved state does not fit this configuration's model and "
      f'optimizer (paths {bad[:5]} differ)'
    )
  leaves = [saved[k] for k in wanted]
  return jax.tree_util.tree_unflatten(
    jax.tree_util.tree_structure(template), leaves
  )


def _move_aside(mngr, steps, workdir) -> None:
  root = os.fspath(mngr.directory)
  dest = os.path.join(workdir or os.path.dirname(root), 'checkpoints-corrupt')
  if jax.process_index() == 0:
    os.makedirs(dest, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    for step in steps:
      target = os.path.join(dest, f'{step}-{stamp}')
      shutil.move(os.path.join(root, str(step)), target)
      logging.warning(
        'Moved the unusable checkpoint at step %d to %s.', step, target
      )
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('fracq_move_corrupt')
  mngr.reload()


def restore_raw(workdir: str, step: int | None = None) -> dict:
  """A run's latest (or ``step``) checkpoint as a plain pytree on this host,
  whatever topology (devices, processes) wrote it."""
  path = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(path):
    raise ValueError(
      f'{workdir!r} has no checkpoints/ directory; point it at a fracq workdir.'
    )
  mngr = ocp.CheckpointManager(
    path, item_handlers=ocp.StandardCheckpointHandler()
  )
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'No checkpoint found in {path}.')
  meta = mngr.item_metadata(step)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree_util.tree_map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta
  )
  return mngr.restore(step, args=ocp.args.StandardRestore(template))


def save_variables(
  workdir: str, variables: dict, *, trainable: tuple[str, ...] = ('params',)
) -> None:
  """Writes model ``variables`` as a step-0 checkpoint of ``workdir``.

  The layout is the training state's (``trainable`` collections in one
  group, the others such as ``batch_stats`` in ``state``), written by
  :func:`save` with its checksums, so :func:`load_variables` (a run's
  ``--config.init_from=<workdir>``) reads it like a finished run.
  """
  tree = {
    'step': np.zeros((), np.int32),
    'trainable': {c: v for c, v in variables.items() if c in trainable},
    'state': {c: v for c, v in variables.items() if c not in trainable},
  }
  mngr = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')),
    options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
  )
  try:
    save(mngr, 0, tree)
    mngr.wait_until_finished()
  finally:
    mngr.close()


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
    bad = sorted(
      jax.tree_util.keystr(k)
      for k in set(t_paths) & set(s_paths)
      if t_paths[k].shape != s_paths[k].shape
    )
    if missing or extra or bad:
      raise ValueError(
        f'init_from {col}: missing {missing[:10]}, unexpected '
        f'{extra[:10]}, shape mismatch {bad[:10]}.'
      )
    out[col] = jax.tree_util.tree_map(
      lambda t, s: jax.numpy.asarray(s, t.dtype), target[col], tree
    )
  return out
