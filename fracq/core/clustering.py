"""Weight clustering: 1-D k-means and a cluster-preserving straight-through op.

* :func:`kmeans` — k-means of a kernel's values (per tensor or per output
  channel), with k-means++, linear or density (CDF) initialisation, a fixed
  number of Lloyd iterations (jit-able) and a sparsity-aware mode.
* :func:`assign` — nearest-centroid indices.
* :func:`clustered_weight` — the forward ``centroids[assign(w)]``; the
  gradient to each centroid is the sum (or mean) of its members' gradients,
  the gradient to ``w`` is straight-through (identity), so weights can move
  between clusters while the number of distinct values stays at most ``k``.

Sparsity-aware scheme (``preserve_zeros`` / ``zero_pinned``): centroid 0 is
pinned at exactly ``0.0`` and *counts as one of the k clusters*. The other
``k - 1`` centroids are fitted on the nonzero weights only. Zero weights (or,
with an explicit ``keep`` mask, the weights outside it) map to centroid 0;
the other weights map only to centroids ``1..k-1``, never to the pinned one,
so the zero pattern is exactly preserved and no kept weight becomes 0. The
pinned centroid's value is forced to 0 in the forward and gets no gradient.

Centroid layout: per tensor ``(k,)``; per channel ``(C, k)`` with ``C`` the
size of ``per_channel_axis``. Without ``preserve_zeros`` the centroids are
sorted ascending; with it, centroid 0 is the zero and ``1..k-1`` ascending.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

INITS = ('kmeans++', 'linear', 'density')
GRADS = ('sum', 'mean')


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


# -- layout helpers -----------------------------------------------------------
def _to_rows(w, axis):
  """``w`` as ``(C, N)`` rows (one per channel) or ``(1, N)`` per tensor."""
  if axis is None:
    return w.reshape(1, -1)
  ax = axis % w.ndim
  t = jnp.moveaxis(w, ax, 0)
  return t.reshape(t.shape[0], -1)


def _from_rows(rows, shape, axis):
  if axis is None:
    return rows.reshape(shape)
  ax = axis % len(shape)
  moved = (shape[ax],) + tuple(s for i, s in enumerate(shape) if i != ax)
  return jnp.moveaxis(rows.reshape(moved), 0, ax)


def _rows_centroids(centroids, per_channel: bool):
  return centroids if per_channel else centroids.reshape(1, -1)


# -- 1-D weighted k-means -----------------------------------------------------
def _nearest(x, c):
  """argmin_k |x_i - c_k| for x (N,), c (k,); ties go to the lower index."""
  d = jnp.abs(x.reshape(-1, 1) - c.reshape(1, -1))
  return jnp.argmin(d, axis=1).astype(jnp.int32)


def _weighted_quantiles(x, wt, qs):
  order = jnp.argsort(x, stable=True)
  xs, ws = x[order], wt[order]
  cdf = jnp.cumsum(ws)
  total = jnp.maximum(cdf[-1], 1e-30)
  idx = jnp.searchsorted(cdf / total, qs, side='left')
  return xs[jnp.clip(idx, 0, x.shape[0] - 1)]


def _init_linear(x, wt, k):
  big = jnp.finfo(jnp.float32).max
  lo = jnp.min(jnp.where(wt > 0, x, big))
  hi = jnp.max(jnp.where(wt > 0, x, -big))
  return jnp.linspace(0.0, 1.0, k, dtype=jnp.float32) * (hi - lo) + lo


def _init_density(x, wt, k):
  qs = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
  return _weighted_quantiles(x, wt, qs)


def _init_kmeanspp(x, wt, k, key):
  keys = jax.random.split(key, k)

  def logits(p):
    p = jnp.where(jnp.sum(p) > 0, p, wt)  # all points already centroids
    return jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-38)), -jnp.inf)

  first = x[jax.random.categorical(keys[0], logits(wt))]
  c = jnp.full((k,), first, jnp.float32)
  d2 = (x - first) ** 2

  def body(j, carry):
    c, d2 = carry
    pick = x[jax.random.categorical(keys[j], logits(wt * d2))]
    return c.at[j].set(pick), jnp.minimum(d2, (x - pick) ** 2)

  c, _ = jax.lax.fori_loop(1, k, body, (c, d2))
  return c


def _kmeans_row(x, wt, k, init, iters, key):
  """Weighted Lloyd k-means of one row; points with weight 0 are ignored."""
  if init == 'linear':
    c = _init_linear(x, wt, k)
  elif init == 'density':
    c = _init_density(x, wt, k)
  else:
    c = _init_kmeanspp(x, wt, k, key)

  def body(_, c):
    idx = _nearest(x, c)
    onehot = jax.nn.one_hot(idx, k, dtype=jnp.float32) * wt.reshape(-1, 1)
    cnt = jnp.sum(onehot, axis=0)
    tot = jnp.sum(onehot * x.reshape(-1, 1), axis=0)
    return jnp.where(cnt > 0, tot / jnp.maximum(cnt, 1e-30), c)

  c = jax.lax.fori_loop(0, int(iters), body, c)
  return jnp.sort(c)


def kmeans(
  w,
  k: int,
  *,
  init: str = 'kmeans++',
  iters: int = 25,
  key=None,
  per_channel_axis: int | None = None,
  preserve_zeros: bool = False,
):
  """k-means clustering of the values of ``w``.

  Args:
    w: the kernel (any shape).
    k: number of clusters (with ``preserve_zeros``, including the pinned zero
      cluster).
    init: ``'kmeans++'`` (D^2 sampling, uses ``key``), ``'linear'`` (evenly
      spaced between min and max) or ``'density'`` (evenly spaced in the
      CDF).
    iters: Lloyd iterations (fixed, so the function is jit-able).
    key: PRNG key for k-means++ (default ``jax.random.key(0)``).
    per_channel_axis: cluster each slice along this axis separately
      (centroids ``(C, k)``); ``None``: one set ``(k,)``.
    preserve_zeros: pin centroid 0 at exactly 0.0 for the zero weights and
      fit the other ``k - 1`` centroids on the nonzero weights only.

  Returns:
    ``(centroids, indices)``; ``indices`` has the shape of ``w`` (int32) and
    ``centroids[indices]`` (per channel: along the channel) is the clustered
    kernel.

  Raises:
    ValueError: ``k < 1`` (``k < 2`` with ``preserve_zeros``), more clusters
      than weights (nonzero weights with ``preserve_zeros``; checked on
      concrete inputs), unknown ``init``.
  """
  w = jnp.asarray(w)
  k = int(k)
  if init not in INITS:
    raise ValueError(f'init={init!r} is unknown; choose one of {INITS}.')
  if int(iters) < 0:
    raise ValueError(f'iters={iters} must be >= 0.')
  if k < 1:
    raise ValueError(f'k={k} clusters: need k >= 1.')
  if preserve_zeros and k < 2:
    raise ValueError(
      f'k={k} with preserve_zeros=True: the zero cluster is one of the k, '
      'so k >= 2 is needed to keep any nonzero weight.'
    )
  rows = _to_rows(w.astype(jnp.float32), per_channel_axis)
  per_row = rows.shape[1]
  where = 'per channel' if per_channel_axis is not None else 'in the tensor'
  if k > per_row:
    raise ValueError(
      f'k={k} clusters but only {per_row} weights {where} (shape '
      f'{tuple(w.shape)}): use k <= {per_row}.'
    )
  free = k - 1 if preserve_zeros else k
  if preserve_zeros and _is_concrete(rows):
    nnz = int(np.min(np.sum(np.asarray(rows) != 0, axis=1)))
    if free > nnz:
      raise ValueError(
        f'k={k} with preserve_zeros=True needs k - 1 = {free} nonzero '
        f'weights {where}, but only {nnz} are nonzero: lower k to at most '
        f'{nnz + 1} (or prune less).'
      )
  key = jax.random.key(0) if key is None else key
  return _kmeans_jit(
    w,
    key,
    k=k,
    init=init,
    iters=int(iters),
    per_channel_axis=per_channel_axis,
    preserve_zeros=bool(preserve_zeros),
  )


@functools.partial(
  jax.jit,
  static_argnames=('k', 'init', 'iters', 'per_channel_axis', 'preserve_zeros'),
)
def _kmeans_jit(w, key, *, k, init, iters, per_channel_axis, preserve_zeros):
  rows = _to_rows(w.astype(jnp.float32), per_channel_axis)
  free = k - 1 if preserve_zeros else k
  wt = (rows != 0) if preserve_zeros else jnp.ones(rows.shape, bool)
  wt = wt.astype(jnp.float32)
  keys = jax.random.split(key, rows.shape[0])
  fit = jax.vmap(lambda x, m, kk: _kmeans_row(x, m, free, init, iters, kk))
  c = fit(rows, wt, keys)  # (R, free)
  if preserve_zeros:
    c = jnp.concatenate([jnp.zeros((c.shape[0], 1), jnp.float32), c], axis=1)
  centroids = c if per_channel_axis is not None else c.reshape(-1)
  return centroids, assign(
    w, centroids, per_channel_axis=per_channel_axis, zero_pinned=preserve_zeros
  )


def assign(
  w,
  centroids,
  *,
  per_channel_axis: int | None = None,
  zero_pinned: bool = False,
  keep=None,
):
  """Nearest-centroid indices (int32, shape of ``w``).

  Per channel when ``centroids`` is ``(C, k)`` (``per_channel_axis`` then
  required). With ``zero_pinned``: positions outside ``keep`` (default
  ``w != 0``) get index 0, the others the nearest of centroids ``1..k-1``.
  """
  w = jnp.asarray(w)
  centroids = jnp.asarray(centroids)
  per_channel = centroids.ndim == 2
  if per_channel and per_channel_axis is None:
    raise ValueError(
      'centroids of shape (C, k) are per channel: pass '
      'per_channel_axis (the kernel axis of size C).'
    )
  if centroids.ndim not in (1, 2):
    raise ValueError(
      f'centroids must be (k,) or (C, k), got shape {centroids.shape}.'
    )
  axis = per_channel_axis if per_channel else None
  rows = _to_rows(w.astype(jnp.float32), axis)
  c = _rows_centroids(centroids.astype(jnp.float32), per_channel)
  if per_channel and c.shape[0] != rows.shape[0]:
    raise ValueError(
      f'{c.shape[0]} centroid rows for {rows.shape[0]} '
      f'channels on axis {per_channel_axis}.'
    )
  if zero_pinned:
    if c.shape[1] < 2:
      raise ValueError(
        'zero_pinned needs k >= 2 centroids (centroid 0 is the pinned zero).'
      )
    cand = c[:, 1:]
  else:
    cand = c
  d = jnp.abs(
    rows.reshape(rows.shape + (1,))
    - cand.reshape(cand.shape[0], 1, cand.shape[1])
  )
  idx = jnp.argmin(d, axis=2).astype(jnp.int32)
  if zero_pinned:
    kr = _to_rows(_keep_mask(w, keep), axis)
    idx = jnp.where(kr, idx + 1, 0)
  return _from_rows(idx, w.shape, axis)


def _keep_mask(w, keep):
  if keep is None:
    return w != 0
  keep = jnp.asarray(keep)
  if keep.shape != w.shape:
    raise ValueError(f'keep mask shape {keep.shape} != kernel shape {w.shape}.')
  return keep.astype(bool) if keep.dtype == bool else keep != 0


def _gather(c_rows, idx_rows):
  """c_rows (R, k), idx_rows (R, N) -> (R, N): c[r, idx[r, n]]."""
  return jnp.take_along_axis(c_rows, idx_rows, axis=1)


def clustered_weight(
  w,
  centroids,
  *,
  grad: str = 'sum',
  zero_pinned: bool = False,
  keep=None,
  per_channel_axis: int | None = None,
  indices=None,
):
  """Cluster-preserving straight-through weight.

  Forward: ``centroids[assign(w, centroids)]`` (exactly the centroid values;
  with ``zero_pinned`` the pinned centroid is exactly 0). Backward: the
  gradient to ``w`` is the incoming gradient (straight-through); the
  gradient to centroid ``j`` is the sum (``grad='sum'``) or mean
  (``'mean'``) of the incoming gradients of the weights assigned to it (0 for
  an empty cluster and for the pinned zero).

  Args:
    w: the (trainable copy of the) kernel.
    centroids: ``(k,)`` or per channel ``(C, k)`` (with
      ``per_channel_axis``).
    grad: ``'sum'`` or ``'mean'``.
    zero_pinned: centroid 0 is the pinned zero (see :func:`assign`).
    keep: with ``zero_pinned``, the positions allowed to be nonzero (default
      ``w != 0``), e.g. a fixed pruning mask.
    indices: precomputed :func:`assign` indices (recomputed when ``None``).
  """
  if grad not in GRADS:
    raise ValueError(f'grad={grad!r} is unknown; choose one of {GRADS}.')
  w = jnp.asarray(w)
  centroids = jnp.asarray(centroids)
  per_channel = centroids.ndim == 2
  axis = per_channel_axis if per_channel else None
  if indices is None:
    indices = assign(
      jax.lax.stop_gradient(w),
      jax.lax.stop_gradient(centroids),
      per_channel_axis=per_channel_axis,
      zero_pinned=zero_pinned,
      keep=keep,
    )
  indices = jax.lax.stop_gradient(indices)
  c = _rows_centroids(centroids, per_channel)
  if zero_pinned:  # exactly 0 forward, no gradient
    c = jnp.concatenate([jnp.zeros((c.shape[0], 1), c.dtype), c[:, 1:]], axis=1)
  k = c.shape[1]
  idx_rows = _to_rows(indices, axis)
  g = _gather(c, idx_rows)  # (R, N), differentiable in c
  g_val = jax.lax.stop_gradient(g)
  term = g - g_val  # 0 forward; d/dc = scatter
  if grad == 'mean':
    cnt = jnp.sum(jax.nn.one_hot(idx_rows, k, dtype=jnp.float32), axis=1)
    per_pos = _gather(jnp.maximum(cnt, 1.0), idx_rows)
    term = term / jax.lax.stop_gradient(per_pos).astype(term.dtype)
  out_rows = g_val + term
  out = _from_rows(out_rows, w.shape, axis).astype(w.dtype)
  # Straight-through to w: + (w - sg(w)) is exactly 0 in the forward.
  return out + (w - jax.lax.stop_gradient(w))


def cluster(w, k: int, **kwargs):
  """``w`` replaced by its k-means centroid values (a plain array)."""
  centroids, idx = kmeans(w, k, **kwargs)
  axis = kwargs.get('per_channel_axis')
  c = _rows_centroids(centroids, centroids.ndim == 2)
  return _from_rows(
    _gather(c, _to_rows(idx, axis if centroids.ndim == 2 else None)),
    w.shape,
    axis if centroids.ndim == 2 else None,
  ).astype(w.dtype)
