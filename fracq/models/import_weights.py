"""Import pretrained float weights from torchvision-format state dicts.

FracBits fine-tunes from a float model, so a pretrained starting point
matters. Sources: a ``.pth`` state dict (loaded with PyTorch only when it is
installed: an optional dependency) or a ``.npz`` holding the same key names
(``layer1.0.conv1.weight``...). Conversions: conv ``OIHW -> HWIO``
(depthwise ``(C, 1, kh, kw) -> (kh, kw, 1, C)``), linear ``(out, in) -> (in,
out)``, BatchNorm ``weight/bias/running_mean/running_var -> scale/bias/
mean/var``; ``num_batches_tracked`` is ignored.

Name maps exist for the ResNets, MobileNet-V2 and Inception-V3 (whose Flax
module names mirror torchvision's). Any missing key, unexpected key or shape
mismatch raises a ValueError naming the offending layers.
"""

from __future__ import annotations

import re

import jax
import numpy as np


def _resnet_name(path: str) -> str:
  path = path.replace('conv_init', 'conv1').replace('bn_init', 'bn1')
  path = re.sub(r'stage(\d+)_block(\d+)', r'layer\1.\2', path)
  path = path.replace('downsample_conv', 'downsample.0')
  path = path.replace('downsample_bn', 'downsample.1')
  return path.replace('/', '.')


def _mobilenet_v2_name(path: str, n_blocks: int) -> str:
  if path.startswith('stem_conv'):
    return 'features.0.0'
  if path.startswith('stem_bn'):
    return 'features.0.1'
  if path.startswith('head_conv'):
    return f'features.{n_blocks + 1}.0'
  if path.startswith('head_bn'):
    return f'features.{n_blocks + 1}.1'
  if path.startswith('classifier'):
    return 'classifier.1'
  m = re.match(r'block(\d+)/(\w+)', path)
  i, layer = int(m.group(1)), m.group(2)
  no_expand = {
    'dw_conv': 'conv.0.0',
    'dw_bn': 'conv.0.1',
    'project_conv': 'conv.1',
    'project_bn': 'conv.2',
  }
  expand = {
    'expand_conv': 'conv.0.0',
    'expand_bn': 'conv.0.1',
    'dw_conv': 'conv.1.0',
    'dw_bn': 'conv.1.1',
    'project_conv': 'conv.2',
    'project_bn': 'conv.3',
  }
  table = no_expand if i == 0 else expand
  return f'features.{i + 1}.{table[layer]}'


def torch_name_fn(family: str, variables):
  """``flax module path -> torchvision prefix`` for a model family."""
  if family == 'resnet':
    return _resnet_name
  if family == 'mobilenet_v2':
    n = len([k for k in variables['params'] if k.startswith('block')])
    return lambda p: _mobilenet_v2_name(p, n)
  if family == 'inception':
    return lambda p: p.replace('/', '.')
  raise ValueError(
    f'No torchvision name map for {family!r}; supported: '
    "'resnet', 'mobilenet_v2', 'inception'."
  )


def _modules(tree, prefix=''):
  """Yields (module path, leaf dict) for every module holding arrays."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
  if leaves:
    yield prefix, leaves
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _modules(v, f'{prefix}/{k}' if prefix else k)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a ``.pth`` (needs torch) or ``.npz`` state dict."""
  if path.endswith('.npz'):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch
  except ImportError as e:
    raise ValueError(
      f'Reading {path} needs PyTorch (pip install torch), or '
      'convert it to .npz with the same key names.'
    ) from e
  sd = torch.load(path, map_location='cpu', weights_only=True)
  if 'state_dict' in sd and isinstance(sd['state_dict'], dict):
    sd = sd['state_dict']
  not_tensors = sorted(k for k, v in sd.items() if not torch.is_tensor(v))
  if not_tensors:
    raise ValueError(
      f'{path} is not a plain state dict: {not_tensors[:10]} hold no '
      'tensors. Save model.state_dict() alone.'
    )
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def import_torchvision(variables, state_dict, family: str):
  """Fills Flax ``variables`` (params, batch_stats) from a state dict.

  Args:
    variables: the model's initialised variables (the shape template).
    state_dict: ``{torch key: array}``.
    family: ``'resnet'``, ``'mobilenet_v2'`` or ``'inception'``.

  Returns:
    New variables with every parameter and BN statistic replaced.

  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch.
  """
  name = torch_name_fn(family, variables)
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  stats = jax.tree_util.tree_map(np.asarray, variables.get('batch_stats', {}))
  stats_mods = dict(_modules(stats))
  used, missing, bad = set(), [], []
  out_p = jax.tree_util.tree_map(lambda x: x, params)
  out_s = jax.tree_util.tree_map(lambda x: x, stats)

  def put(tree, path, key, value, expect_shape, tkey):
    if value.shape != expect_shape:
      bad.append(
        f'{tkey}: checkpoint {tuple(value.shape)} vs model '
        f'{tuple(expect_shape)}'
      )
      return
    node = tree
    for part in path.split('/'):
      node = node[part]
    node[key] = value.astype(node[key].dtype)

  def fetch(tkey):
    if tkey not in state_dict:
      missing.append(tkey)
      return None
    used.add(tkey)
    return np.asarray(state_dict[tkey])

  for path, leaves in _modules(params):
    t = name(path)
    if 'kernel' in leaves:
      w = fetch(t + '.weight')
      if w is not None:
        w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
        put(out_p, path, 'kernel', w, leaves['kernel'].shape, t + '.weight')
      if 'bias' in leaves:
        b = fetch(t + '.bias')
        if b is not None:
          put(out_p, path, 'bias', b, leaves['bias'].shape, t + '.bias')
    elif 'scale' in leaves:
      for fk, tk in (('scale', 'weight'), ('bias', 'bias')):
        v = fetch(f'{t}.{tk}')
        if v is not None:
          put(out_p, path, fk, v, leaves[fk].shape, f'{t}.{tk}')
      for fk, tk in (('mean', 'running_mean'), ('var', 'running_var')):
        v = fetch(f'{t}.{tk}')
        if v is not None and path in stats_mods:
          put(out_s, path, fk, v, stats_mods[path][fk].shape, f'{t}.{tk}')
  unexpected = sorted(
    k
    for k in state_dict
    if k not in used and not k.endswith('num_batches_tracked')
  )
  if missing or unexpected or bad:
    raise ValueError(
      'State dict does not match the model: '
      f'missing {missing[:20]}{" ..." if len(missing) > 20 else ""}; '
      f'unexpected {unexpected[:20]}'
      f'{" ..." if len(unexpected) > 20 else ""}; '
      f'shape mismatches {bad[:20]}.'
    )
  return {**variables, 'params': out_p, 'batch_stats': out_s}
