"""Sizes on disk of float models and of any file compressed.

``save_float_variables`` writes a model's variables as one float32
safetensors file (the baseline every compression ratio is against, and the
artifact of a float pruned or clustered model); ``gzip_bytes`` is the size
of a file after gzip -9, the measure TFMOT reports for pruned and clustered
models (runs of zeros and repeated values compress; dense random codes do
not).
"""

from __future__ import annotations

import gzip
import os

import jax
import numpy as np

from fracq.export import artifact


def _key(kp) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in kp)


def save_float_variables(
  variables: dict, path: str, *, overwrite: bool = False
) -> int:
  """Writes every array of ``variables`` as float32 into one safetensors
  file (atomically; refuses to replace ``path`` unless ``overwrite``);
  returns its bytes on disk."""
  from safetensors.numpy import save_file

  if os.path.exists(path) and not overwrite:
    raise FileExistsError(
      f'{path} exists; pass overwrite=True (or '
      '--config.overwrite=True) to replace it.'
    )
  flat = {
    _key(kp): np.ascontiguousarray(np.asarray(v, np.float32))
    for kp, v in jax.tree_util.tree_leaves_with_path(variables)
  }
  tmp = path + '.tmp'
  save_file(flat, tmp)
  artifact.publish(tmp, path)
  return os.path.getsize(path)


def gzip_bytes(path: str) -> int:
  """Bytes of ``path`` after gzip at level 9 (not written to disk)."""
  with open(path, 'rb') as f:
    return len(gzip.compress(f.read(), compresslevel=9, mtime=0))
