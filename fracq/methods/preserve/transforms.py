"""Sparsity- and cluster-preserving QAT (PQAT, CQAT, PCQAT) and pruning.

Kernel transforms for :class:`fracq.methods.qat.QATModel`
(``kernel_transform=``); the provider applies them to each matched layer's
kernel *before* the kernel fake-quantizer.

:class:`PreserveTransform`
  * PQAT (``prune=True``): a fixed keep-mask ``quant_stats/.../kernel_mask``
    (float32 0/1), taken as ``kernel != 0`` at ``init`` and re-taken by
    ``QATModel.calibrate`` (run it after loading the pruned model). The
    forward uses ``kernel * mask``; the kernel quantizers for weights are
    symmetric (zero point 0), so pruned weights stay exactly 0 after
    fake-quantization. With ``sparsity=s`` the mask is instead the
    magnitude mask at sparsity ``s`` of the current kernel (one-shot pruning
    at calibration, for a float starting model).
  * CQAT (``cluster=True``): trainable centroids ``quant/.../
    kernel_centroids`` (k-means of the kernel, at init and re-fitted by
    ``calibrate``); the kernel used is :func:`fracq.core.clustering.
    clustered_weight` (indices recomputed every step, centroid gradients
    summed or averaged over members, straight-through to the kernel).
  * PCQAT (both): centroid 0 pinned at exactly 0 for the masked weights; the
    kept weights only ever map to the ``k - 1`` other centroids.

:class:`PruningTransform`
  Gradual magnitude pruning for a (float or quantized) training phase: the
  mask follows :func:`fracq.core.sparsity.polynomial_decay_sparsity`, with the
  step read from a ``quant_stats/.../prune_step`` counter that every
  training ``apply`` (``quant_stats`` mutable) advances by one.

:func:`strip` writes masks and clusters into ``params`` (exact zeros and
centroid values) and drops the transform's variables.

Per-layer settings come from ``Rule.options`` (``rule.option(key)``):
``prune``, ``cluster`` (bools), ``clusters`` (k), ``sparsity``,
``structure``, ``cluster_per_channel``; the transform's arguments are the
defaults. Depthwise and grouped convs are treated like any other kernel.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import clustering
from fracq.core import sparsity as sparsity_lib

TRAINABLE = 'quant'
STATE = 'quant_stats'
MASK = 'kernel_mask'
CENTROIDS = 'kernel_centroids'
COUNTER = 'prune_step'

# Kernel quantizers whose grid has an exact 0 (zero point 0).
_NOT_ZERO_PRESERVING = ('lsq_plus', 'dorefa')


def _check_zero_preserving(site):
  spec = site.rule.weight
  if spec is None:
    return
  if spec.range_method in _NOT_ZERO_PRESERVING or not spec.symmetric:
    raise ValueError(
      f'{site.path}: pruning keeps weights at exactly 0 only with a '
      'symmetric kernel quantizer (zero point 0), but the rule '
      f'{site.rule.label!r} uses range_method={spec.range_method!r}, '
      f'symmetric={spec.symmetric}. Use range_method="lsq" (or an '
      'observer) with symmetric=True for the weights, or prune=False.'
    )


def _refresh(site, col, calibrate: bool) -> bool:
  return bool(calibrate) and site.is_mutable(col) and not site.is_initializing


class PreserveTransform:
  """PQAT / CQAT / PCQAT kernel transform (see the module docstring).

  Args:
    prune: keep the sparsity pattern (fixed mask).
    cluster: keep the weights clustered (trainable centroids).
    clusters: default number of clusters ``k`` (with ``prune`` the pinned
      zero is one of them).
    cluster_grad: ``'sum'`` or ``'mean'`` of the members' gradients.
    cluster_init: ``'kmeans++'``, ``'linear'`` or ``'density'``.
    cluster_iters: Lloyd iterations.
    cluster_per_channel: one set of ``k`` centroids per output channel.
    sparsity: ``None``: the mask is ``kernel != 0`` (the starting model is
      already pruned); a float: one-shot magnitude pruning of the kernel to
      this sparsity at init/calibration (nonzero pattern of the result).
    structure, n, m: pruning structure for ``sparsity`` (see
      :func:`fracq.core.sparsity.magnitude_mask`).
    seed: k-means++ seed (mixed with each layer's path).
    layers: regex of the module paths to transform (``None``: every layer
      the rules match).
  """

  def __init__(
    self,
    prune: bool = True,
    cluster: bool = False,
    *,
    clusters: int = 8,
    cluster_grad: str = 'sum',
    cluster_init: str = 'kmeans++',
    cluster_iters: int = 25,
    cluster_per_channel: bool = False,
    sparsity: float | None = None,
    structure: str = 'unstructured',
    n: int = 2,
    m: int = 4,
    seed: int = 0,
    layers: str | None = None,
  ):
    if not (prune or cluster):
      raise ValueError(
        'PreserveTransform(prune=False, cluster=False) does '
        'nothing: enable prune (PQAT), cluster (CQAT) or both '
        '(PCQAT).'
      )
    if cluster_grad not in clustering.GRADS:
      raise ValueError(
        f'cluster_grad={cluster_grad!r} is unknown; choose one '
        f'of {clustering.GRADS}.'
      )
    if cluster_init not in clustering.INITS:
      raise ValueError(
        f'cluster_init={cluster_init!r} is unknown; choose '
        f'one of {clustering.INITS}.'
      )
    if cluster and int(clusters) < (2 if prune else 1):
      raise ValueError(
        f'clusters={clusters}: need at least '
        f'{2 if prune else 1} (with prune=True the pinned zero '
        'is one of the clusters).'
      )
    if sparsity is not None and not 0 <= float(sparsity) < 1:
      raise ValueError(f'sparsity={sparsity} is outside [0, 1).')
    if structure not in sparsity_lib.STRUCTURES:
      raise ValueError(
        f'structure={structure!r} is unknown; choose one of '
        f'{sparsity_lib.STRUCTURES}.'
      )
    self.prune = bool(prune)
    self.cluster = bool(cluster)
    self.clusters = int(clusters)
    self.cluster_grad = cluster_grad
    self.cluster_init = cluster_init
    self.cluster_iters = int(cluster_iters)
    self.cluster_per_channel = bool(cluster_per_channel)
    self.sparsity = sparsity
    self.structure = structure
    self.n, self.m = int(n), int(m)
    self.seed = int(seed)
    self.layers = layers

  @property
  def method(self) -> str:
    return {
      (True, False): 'pqat',
      (False, True): 'cqat',
      (True, True): 'pcqat',
    }[(self.prune, self.cluster)]

  def _key(self, path: str):
    return jax.random.fold_in(
      jax.random.key(self.seed), zlib.crc32(path.encode()) & 0x7FFFFFFF
    )

  def _mask_value(self, site, kernel):
    opt = site.rule.option
    s = opt('sparsity', self.sparsity)
    nz = kernel != 0
    if s is None:
      return nz.astype(jnp.float32)
    keep = sparsity_lib.magnitude_mask(
      jax.lax.stop_gradient(kernel),
      s,
      structure=opt('structure', self.structure),
      n=opt('n', self.n),
      m=opt('m', self.m),
      channel_axis=site.kernel_channel_axis,
    )
    return (keep & nz).astype(jnp.float32)

  def __call__(self, site, kernel, calibrate: bool = False):
    if self.layers is not None and not re.search(self.layers, site.path):
      return kernel
    opt = site.rule.option
    prune = bool(opt('prune', self.prune))
    cluster = bool(opt('cluster', self.cluster))
    w = kernel
    mask = None
    try:
      if prune:
        _check_zero_preserving(site)
        mv = site.variable(STATE, MASK, lambda: self._mask_value(site, kernel))
        if _refresh(site, STATE, calibrate):
          mv.value = self._mask_value(site, kernel)
        mask = jax.lax.stop_gradient(mv.value)
        w = w * mask.astype(w.dtype)
      if cluster:
        k = int(opt('clusters', self.clusters))
        per_ch = bool(opt('cluster_per_channel', self.cluster_per_channel))
        axis = site.kernel_channel_axis if per_ch else None
        w_fit = jax.lax.stop_gradient(w)

        def init_fn():
          c, _ = clustering.kmeans(
            w_fit,
            k,
            init=opt('cluster_init', self.cluster_init),
            iters=self.cluster_iters,
            key=self._key(site.path),
            per_channel_axis=axis,
            preserve_zeros=prune,
          )
          return c

        cv = site.variable(TRAINABLE, CENTROIDS, init_fn)
        if _refresh(site, TRAINABLE, calibrate):
          cv.value = init_fn()
        keep = (mask != 0) if mask is not None else None
        w = clustering.clustered_weight(
          w,
          cv.value,
          grad=opt('cluster_grad', self.cluster_grad),
          zero_pinned=prune,
          keep=keep,
          per_channel_axis=axis,
        )
    except ValueError as e:
      if str(e).startswith(site.path):
        raise
      raise ValueError(
        f'{site.path} ({site.layer_type}, kernel {tuple(kernel.shape)}): {e}'
      ) from None
    return w

  def strip(self, variables, qmodel=None, keep_quant: bool = False):
    """See :func:`strip`."""
    return strip(variables, qmodel=qmodel, keep_quant=keep_quant)


class PruningTransform:
  """Gradual magnitude pruning (polynomial-decay schedule) as a transform.

  The mask lives in ``quant_stats/.../kernel_mask`` (all ones at init) and
  the step in ``quant_stats/.../prune_step``; every ``apply`` with
  ``quant_stats`` mutable (a training step; not init, not calibrate) uses the
  counter as the step, recomputes the mask when the schedule says so and
  advances the counter. The new mask is taken on ``kernel * old_mask``, so
  pruned weights stay pruned (sparsity never decreases). The forward uses
  ``kernel * mask`` (pruned weights get no gradient); :func:`strip` writes
  the zeros into ``params`` at the end.

  Args:
    final_sparsity: target sparsity (rule option ``sparsity`` overrides).
    initial_sparsity, begin_step, end_step, power, frequency: the schedule.
    structure, n, m: see :func:`fracq.core.sparsity.magnitude_mask` (for
      ``'n:m'`` the whole N:M pattern is applied at every update).
    step: use this step (int or traced scalar) instead of the counter.
    layers: regex of the module paths to prune (``None``: every layer the
      rules match).
  """

  def __init__(
    self,
    final_sparsity: float = 0.5,
    *,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    end_step: int = 1000,
    power: float = 3,
    frequency: int = 100,
    structure: str = 'unstructured',
    n: int = 2,
    m: int = 4,
    step=None,
    layers: str | None = None,
  ):
    # Validates the schedule once, eagerly.
    sparsity_lib.polynomial_decay_sparsity(
      0,
      initial_sparsity,
      final_sparsity,
      begin_step,
      end_step,
      power,
      frequency,
    )
    if structure not in sparsity_lib.STRUCTURES:
      raise ValueError(
        f'structure={structure!r} is unknown; choose one of '
        f'{sparsity_lib.STRUCTURES}.'
      )
    self.final_sparsity = final_sparsity
    self.initial_sparsity = initial_sparsity
    self.begin_step, self.end_step = int(begin_step), int(end_step)
    self.power, self.frequency = power, int(frequency)
    self.structure, self.n, self.m = structure, int(n), int(m)
    self.step = step
    self.layers = layers

  def sparsity_at(self, step, final=None):
    return sparsity_lib.polynomial_decay_sparsity(
      step,
      self.initial_sparsity,
      self.final_sparsity if final is None else final,
      self.begin_step,
      self.end_step,
      self.power,
      self.frequency,
    )

  def __call__(self, site, kernel, calibrate: bool = False):
    if self.layers is not None and not re.search(self.layers, site.path):
      return kernel
    opt = site.rule.option
    if not bool(opt('prune', True)):
      return kernel
    _check_zero_preserving(site)
    counter = site.variable(STATE, COUNTER, lambda: jnp.zeros((), jnp.int32))
    mv = site.variable(STATE, MASK, lambda: jnp.ones(kernel.shape, jnp.float32))
    training = (
      site.is_mutable(STATE) and not site.is_initializing and not calibrate
    )
    if training:
      step = counter.value if self.step is None else self.step
      structure = opt('structure', self.structure)
      s = self.sparsity_at(step, opt('sparsity', None))
      w_old = jax.lax.stop_gradient(kernel) * mv.value.astype(kernel.dtype)
      try:
        keep = sparsity_lib.magnitude_mask(
          w_old,
          None if structure == 'n:m' else s,
          structure=structure,
          n=opt('n', self.n),
          m=opt('m', self.m),
          channel_axis=site.kernel_channel_axis,
        )
      except ValueError as e:
        raise ValueError(f'{site.path}: {e}') from None
      due = sparsity_lib.pruning_step_due(
        step, self.begin_step, self.end_step, self.frequency
      )
      mv.value = jnp.where(due, keep.astype(jnp.float32) * mv.value, mv.value)
      counter.value = counter.value + 1
    return kernel * jax.lax.stop_gradient(mv.value).astype(kernel.dtype)

  def strip(self, variables, qmodel=None, keep_quant: bool = False):
    return strip(variables, qmodel=qmodel, keep_quant=keep_quant)


# -- whole-model helpers --------------------------------------------------------
def _walk(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, 'items'):
      yield from _walk(v, prefix + (k,))
    else:
      yield prefix, k, v


def _to_dict(tree):
  if hasattr(tree, 'items'):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _get(tree, path):
  for p in path:
    if not hasattr(tree, 'items') or p not in tree:
      return None
    tree = tree[p]
  return tree


def strip(variables, qmodel=None, keep_quant: bool = False):
  """Plain variables with masks and clusters applied to ``params``.

  Every ``params/.../kernel`` whose layer has a ``kernel_mask`` and/or
  ``kernel_centroids`` is replaced by the kernel the transform computes
  (before fake-quantization): exact zeros outside the mask, exact centroid
  values. Per-channel centroids use the output axis from ``qmodel.facts``
  when given, else axis -1.

  Returns ``params`` and the model's other collections (``batch_stats``);
  ``keep_quant=True`` also keeps ``quant``/``quant_stats`` unchanged (the QAT
  model then computes the same kernels from the stripped params).
  """
  variables = _to_dict(variables)
  params = jax.tree_util.tree_map(lambda v: v, variables['params'])
  quant = variables.get(TRAINABLE, {})
  stats = variables.get(STATE, {})
  paths = set()
  for tree, name in ((stats, MASK), (quant, CENTROIDS)):
    for prefix, k, _ in _walk(tree):
      if k == name:
        paths.add(prefix)
  for prefix in sorted(paths):
    node = _get(params, prefix)
    if node is None or 'kernel' not in node:
      continue
    w = jnp.asarray(node['kernel'])
    mask = _get(stats, prefix + (MASK,))
    cents = _get(quant, prefix + (CENTROIDS,))
    if mask is not None:
      w = w * jnp.asarray(mask).astype(w.dtype)
    if cents is not None:
      cents = jnp.asarray(cents)
      axis = None
      if cents.ndim == 2:
        axis = -1
        if qmodel is not None and '/'.join(prefix) in qmodel.facts:
          axis = qmodel.facts['/'.join(prefix)].out_axes[-1]
      keep = (jnp.asarray(mask) != 0) if mask is not None else None
      w = clustering.clustered_weight(
        w, cents, zero_pinned=mask is not None, keep=keep, per_channel_axis=axis
      )
    node['kernel'] = w
  out = {
    k: v
    for k, v in variables.items()
    if keep_quant or k not in (TRAINABLE, STATE)
  }
  out['params'] = params
  return out


def _map_kernels(params, fn, paths: str | None):
  params = jax.tree_util.tree_map(lambda v: v, _to_dict(params))
  for prefix, k, v in list(_walk(params)):
    path = '/'.join(prefix)
    if k != 'kernel' or (paths is not None and not re.search(paths, path)):
      continue
    _get(params, prefix)[k] = fn(path, jnp.asarray(v))
  return params


def prune_params(
  params, sparsity: float, *, paths: str | None = None, **mask_kwargs
):
  """One-shot magnitude pruning of every ``kernel`` (module path matching the
  regex ``paths``, all when ``None``) in a ``params`` tree."""

  def fn(path, w):
    try:
      return sparsity_lib.prune(w, sparsity, **mask_kwargs)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None

  return _map_kernels(params, fn, paths)


def cluster_params(
  params,
  k: int,
  *,
  paths: str | None = None,
  preserve_zeros: bool = True,
  seed: int = 0,
  **kmeans_kwargs,
):
  """Every matched ``kernel`` replaced by its k-means cluster values (zeros
  kept exactly with ``preserve_zeros``)."""

  def fn(path, w):
    key = jax.random.fold_in(
      jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF
    )
    try:
      return clustering.cluster(
        w, k, key=key, preserve_zeros=preserve_zeros, **kmeans_kwargs
      )
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None

  return _map_kernels(params, fn, paths)


def kernel_summary(kernels: dict) -> dict:
  """Per layer: sparsity and number of distinct values (numpy)."""
  out = {}
  for path, w in kernels.items():
    w = np.asarray(w)
    out[path] = {
      'sparsity': float(np.mean(w == 0)),
      'distinct': int(np.unique(w).size),
    }
  return out
