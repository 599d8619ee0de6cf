"""The kernel transform of ``config.quant.preserve`` (pruning / clustering
kept through training, PQAT / CQAT / PCQAT), on top of any method but
F8Net.

:func:`preserve_transform`'s keyword arguments are the fields of
``config.quant.preserve``; the training layer's adapter
(:mod:`fracq.train.quant_config`) passes the block in.
"""

from __future__ import annotations

import numpy as np

from fracq.core import sparsity as sparsity_lib
from fracq.methods.preserve.transforms import PreserveTransform
from fracq.methods.preserve.transforms import PruningTransform

__all__ = [
  'PRESERVE_MODES',
  'PRUNE_SCHEDULES',
  'check_preserve',
  'min_bits_for',
  'preserve_transform',
]

PRESERVE_MODES = ('', 'prune', 'cluster', 'prune_cluster')
PRUNE_SCHEDULES = ('oneshot', 'polynomial')


def min_bits_for(clusters: int) -> float:
  """Bits needed to give ``clusters`` values distinct codes."""
  return float(max(1, int(np.ceil(np.log2(max(int(clusters), 2))))))


def check_preserve(
  *,
  mode: str,
  sparsity: float,
  prune_structure: str,
  prune_schedule: str,
  clusters: int,
  **unused,
) -> None:
  """Clear errors for bad ``config.quant.preserve`` fields (every field of
  the block is accepted; those not checked here are ignored)."""
  del unused
  if mode not in PRESERVE_MODES:
    raise ValueError(
      f'config.quant.preserve.mode={mode!r} is unknown; choose one of '
      f"{PRESERVE_MODES} ('prune' = PQAT, 'cluster' = CQAT, "
      "'prune_cluster' = PCQAT)."
    )
  if not mode:
    return
  s = float(sparsity)
  if s != -1.0 and not 0.0 <= s < 1.0:
    raise ValueError(
      f'config.quant.preserve.sparsity={s} is outside [0, 1) (use -1 '
      "to keep the starting model's zeros)."
    )
  if 'cluster' in mode:
    need = 2 if 'prune' in mode else 1
    if int(clusters) < need:
      raise ValueError(
        f'config.quant.preserve.clusters={clusters}: need at least {need}'
        + (' (the pinned zero is one of them)' if need == 2 else '')
        + '.'
      )
  if prune_structure not in sparsity_lib.STRUCTURES:
    raise ValueError(
      f'config.quant.preserve.prune_structure={prune_structure!r} is '
      f'unknown; choose one of {sparsity_lib.STRUCTURES}.'
    )
  if prune_schedule not in PRUNE_SCHEDULES:
    raise ValueError(
      f'config.quant.preserve.prune_schedule={prune_schedule!r} is '
      f'unknown; choose one of {PRUNE_SCHEDULES}.'
    )
  if prune_schedule == 'polynomial':
    if mode != 'prune':
      raise ValueError(
        "config.quant.preserve.prune_schedule='polynomial' (gradual "
        f"pruning) goes with mode='prune' only, not {mode!r}: prune "
        'gradually first, then cluster / PCQAT from that workdir '
        '(--config.init_from) with sparsity=-1.'
      )
    if not 0.0 < s < 1.0:
      raise ValueError(
        f'config.quant.preserve.sparsity={s}: gradual pruning needs a '
        'final sparsity in (0, 1).'
      )


def preserve_transform(
  *,
  total_steps: int | None = None,
  mode: str = '',
  layers: str = '',
  sparsity: float = -1.0,
  prune_structure: str = 'unstructured',
  prune_schedule: str = 'oneshot',
  prune_initial_sparsity: float = 0.0,
  prune_begin_step: int = 0,
  prune_end_step: int = -1,
  prune_frequency: int = 10,
  clusters: int = 16,
  cluster_grad: str = 'sum',
  cluster_init: str = 'kmeans++',
  cluster_per_channel: bool = False,
  cluster_min_bits: bool = True,
):
  """The kernel transform of ``config.quant.preserve`` (``None`` when
  ``mode`` is ''): a ``PruningTransform`` for gradual pruning
  (``prune_schedule='polynomial'``), else a ``PreserveTransform``.

  Args:
    total_steps: training steps (``prune_end_step < 0``: two thirds).
    mode: '' (off), 'prune' (PQAT: fixed mask), 'cluster' (CQAT: trainable
      centroids) or 'prune_cluster' (PCQAT: both, the zero centroid pinned).
    layers: regex of the layers it applies to ('' = all).
    sparsity: one-shot magnitude pruning at calibration to this sparsity
      (-1 keeps the starting model's zeros).
    prune_structure: 'unstructured', 'n:m' (e.g. '2:4') or 'channel'.
    prune_schedule: 'oneshot' or 'polynomial' (gradual, ``mode='prune'``).
    prune_initial_sparsity: gradual pruning starts here...
    prune_begin_step: ...at this step...
    prune_end_step: ...and reaches ``sparsity`` here (-1: 2/3 of training)...
    prune_frequency: ...updating the mask every this many steps.
    clusters: k (the zero counts for PCQAT).
    cluster_grad: 'sum' or 'mean' member gradients.
    cluster_init: 'kmeans++', 'linear' or 'density'.
    cluster_per_channel: clusters per output channel.
    cluster_min_bits: learned (FracBits) bits never below log2(clusters);
      read by the adapter, not here.
  """
  del cluster_min_bits  # a bound on FracBits' bits, not on the transform
  check_preserve(
    mode=mode,
    sparsity=sparsity,
    prune_structure=prune_structure,
    prune_schedule=prune_schedule,
    clusters=clusters,
  )
  if not mode:
    return None
  s = float(sparsity)
  if prune_schedule == 'polynomial':
    end = int(prune_end_step)
    if end < 0:
      if not total_steps:
        raise ValueError(
          'config.quant.preserve.prune_end_step=-1 needs the number of '
          'training steps; set prune_end_step explicitly.'
        )
      end = max(int(prune_begin_step) + 1, (2 * int(total_steps)) // 3)
    return PruningTransform(
      s,
      initial_sparsity=float(prune_initial_sparsity),
      begin_step=int(prune_begin_step),
      end_step=end,
      frequency=int(prune_frequency),
      structure=prune_structure,
      layers=layers or None,
    )
  return PreserveTransform(
    prune='prune' in mode,
    cluster='cluster' in mode,
    clusters=int(clusters),
    cluster_grad=cluster_grad,
    cluster_init=cluster_init,
    cluster_per_channel=bool(cluster_per_channel),
    sparsity=None if s < 0 else s,
    structure=prune_structure,
    layers=layers or None,
  )
