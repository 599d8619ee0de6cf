"""Hessian traces by Hutchinson's estimator (HAWQ-style sensitivity).

``tr(H) = E[v^T H v]`` for Rademacher probes ``v``. One full-tree probe gives
every group's block-diagonal term ``v_g^T (H v)_g`` at once (HAWQ uses the
trace of each layer's own block), so probes are batched with ``vmap`` and
shared by all groups.

References: Hutchinson 1990; Dong et al., "HAWQ-V2", NeurIPS 2020
(arXiv 1911.03852); Yao et al., "HAWQ-V3", ICML 2021 (arXiv 2011.10680).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def hvp(loss_fn: Callable, params, v, *args):
  """Hessian-vector product (forward-over-reverse)."""
  return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def _group_masks(params, groups: Mapping[str, Sequence]):
  """Per group, a pytree of 0/1 masks selecting its leaves (by key path)."""
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  out = {}
  for g, members in groups.items():
    members = set(members)
    masks = [
      jnp.ones_like(x) if p in members else jnp.zeros_like(x)
      for p, x in zip(paths, jax.tree_util.tree_leaves(params))
    ]
    if not any(p in members for p in paths):
      raise ValueError(f'group {g!r} selects no parameter.')
    out[g] = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params), masks
    )
  return out


def hutchinson_traces(
  loss_fn: Callable,
  params,
  key,
  *,
  groups: Mapping[str, Sequence],
  num_probes: int = 64,
  batches: Sequence = (None,),
  chunk: int = 16,
):
  """Per-group Hessian trace estimates.

  Args:
    loss_fn: ``loss_fn(params, batch)`` (``batch`` may be ignored).
    params: the parameters the Hessian is taken over.
    key: PRNG key for the probes.
    groups: ``name -> list of leaf key paths`` (``jax.tree_util`` paths).
    num_probes: Rademacher probes per batch.
    batches: the data batches averaged over.
    chunk: probes evaluated together with ``vmap``.

  Returns:
    ``{name: {'trace', 'avg_trace', 'stderr', 'n'}}`` with ``avg_trace =
    trace / n`` (n: the group's parameter count).
  """
  masks = _group_masks(params, groups)
  leaves, tdef = jax.tree_util.tree_flatten(params)

  @jax.jit
  def probe_terms(keys, batch):
    def one(k):
      ks = jax.random.split(k, len(leaves))
      v = [
        jax.random.rademacher(kk, x.shape, x.dtype) for kk, x in zip(ks, leaves)
      ]
      v = jax.tree_util.tree_unflatten(tdef, v)
      hv = hvp(loss_fn, params, v, batch)
      return {
        g: sum(
          jnp.vdot(a * m, b)
          for a, b, m in zip(
            jax.tree_util.tree_leaves(v),
            jax.tree_util.tree_leaves(hv),
            jax.tree_util.tree_leaves(mask),
          )
        )
        for g, mask in masks.items()
      }

    return jax.vmap(one)(keys)

  samples = {g: [] for g in groups}
  for bi, batch in enumerate(batches):
    done = 0
    while done < num_probes:
      n = min(chunk, num_probes - done)
      keys = jax.random.split(jax.random.fold_in(key, bi * 100003 + done), n)
      terms = probe_terms(keys, batch)
      for g in groups:
        samples[g].extend(np.asarray(terms[g]).tolist())
      done += n
  out = {}
  for g in groups:
    s = np.asarray(samples[g])
    n = int(
      sum(np.asarray(x).sum() for x in jax.tree_util.tree_leaves(masks[g]))
    )
    out[g] = {
      'trace': float(s.mean()),
      'avg_trace': float(s.mean()) / n,
      'stderr': float(s.std(ddof=1) / np.sqrt(len(s)))
      if len(s) > 1
      else float('nan'),
      'n': n,
    }
  return out


def exact_hessian_trace(loss_fn: Callable, params, *, groups, batch=None):
  """Dense per-group Hessian traces (small models only; a test reference)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  h = jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)
  masks = _group_masks(params, groups)
  diag = np.asarray(jnp.diag(h))
  out = {}
  for g, m in masks.items():
    mf = np.asarray(jax.flatten_util.ravel_pytree(m)[0]).astype(bool)
    out[g] = float(diag[mf].sum())
  return out


def hawq_sensitivity(
  avg_trace: float, w, quantize_fn: Callable, bits_candidates: Sequence[int]
) -> dict[int, float]:
  """HAWQ-V2/V3: ``Omega(b) = avg_trace * ||Q_b(W) - W||^2`` per candidate."""
  w = jnp.asarray(w, jnp.float32)
  return {
    int(b): float(avg_trace * jnp.sum((quantize_fn(w, int(b)) - w) ** 2))
    for b in bits_candidates
  }


def symmetric_per_channel(w, bits: int):
  """Symmetric per-output-channel min/max quantization (last axis)."""
  qp = 2.0 ** (bits - 1) - 1
  amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
  s = jnp.maximum(amax / qp, 1e-12)
  return jnp.clip(jnp.round(w / s), -qp, qp) * s
