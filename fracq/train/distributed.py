"""Same model on any number of devices and hosts: calibration and checks.

* :func:`calibrate` runs a wrapper's ``calibrate`` inside ``shard_map`` over
  the mesh, on the global batch: the quantizer statistics see the same data
  (through the same collectives as the train step) whether the batch is split
  over 1 or 8 devices, 1 or 2 hosts, so every host starts from the same
  values.
* :func:`assert_equal_across_hosts` checks that a tree meant to be
  replicated holds the same bytes on every process (the loop calls it at
  startup and before each checkpoint) and names the first leaf that differs.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P


def local_value(x):
  """This process's copy of a replicated array, as numpy (other leaves are
  returned unchanged)."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(x.addressable_data(0))
  return np.asarray(x) if isinstance(x, np.ndarray) else x


def calibrate(wrapper, variables, images, mesh: Mesh, axis: str = 'batch'):
  """``wrapper.calibrate(variables, images)`` on the global batch.

  Args:
    wrapper: a model wrapper (``calibrate(variables, x) -> variables``).
    variables: replicated variables (global arrays on ``mesh``).
    images: the global batch, sharded over ``axis`` of ``mesh``.
    mesh: the data-parallel mesh.
    axis: its batch axis (the model's BatchNorm axis).

  Returns:
    The calibrated variables, replicated (every device and host holds the
    statistics of the whole batch).
  """
  fn = jax.shard_map(
    wrapper.calibrate,
    mesh=mesh,
    in_specs=(P(), P(axis)),
    out_specs=P(),
    check_vma=False,
  )
  return jax.jit(fn)(variables, images)


def _fingerprint(value) -> int:
  a = np.ascontiguousarray(value)
  head = f'{a.dtype}{a.shape}'.encode()
  # 31 bits: the gather runs through JAX, whose default integers are int32.
  return zlib.crc32(a.tobytes(), zlib.crc32(head)) & 0x7FFFFFFF


def assert_equal_across_hosts(tree, what: str) -> None:
  """Raises ``ValueError`` unless every process holds the same ``tree``.

  Compares a checksum of each leaf (this process's copy of replicated
  arrays) across processes; every process must call it (it is a collective).
  A no-op in a single process.

  Args:
    tree: a pytree of replicated arrays.
    what: what the tree is, for the message (e.g. ``'the state at step 20'``).
  """
  if jax.process_count() == 1:
    return
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  values = [local_value(v) for _, v in leaves]
  prints = np.array([_fingerprint(v) for v in values], np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(prints))
  differ = np.nonzero(np.any(everyone != everyone[:1], axis=0))[0]
  if differ.size == 0:
    return
  first = int(differ[0])
  name = jax.tree_util.keystr(leaves[first][0])
  # Every process found the same leaf; gather it to say by how much.
  detail = ''
  shapes = multihost_utils.process_allgather(
    np.array(np.shape(values[first]) or (1,), np.int32)
  )
  if np.all(np.asarray(shapes) == np.asarray(shapes)[:1]):
    copies = np.asarray(
      multihost_utils.process_allgather(np.asarray(values[first], np.float32))
    )
    gap = np.max(np.abs(copies - copies[:1]))
    detail = f'; max |difference| from process 0: {gap:.6g}'
  raise ValueError(
    f'{what} differs across the {jax.process_count()} processes: '
    f'{differ.size} leaves, first {name}{detail}. Replicated values must be '
    'computed from the global batch (or broadcast from one process); check '
    'that every process runs the same code, config and data order.'
  )
