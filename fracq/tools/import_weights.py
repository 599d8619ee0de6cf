"""Pretrained torchvision weights into a checkpoint runs can start from.

  python -m fracq.tools.import_weights --model resnet50 \\
      --weights resnet50-11ad3fa6.pth --workdir runs/r50
  python launch.py --config=configs/resnet50_fracbits.py --workdir=runs/r50fb \\
      --config.data_dir=DATA_DIR --config.init_from=runs/r50

``--weights`` is a torchvision state dict: a ``.pth``/``.pt`` file written by
``torch.save(model.state_dict(), path)`` (reading it needs PyTorch) or an
``.npz`` holding the same key names (``layer1.0.conv1.weight``...). The
conversion is :mod:`fracq.models.import_weights`; every parameter and
BatchNorm statistic of the Flax model must come from the file, and a
missing key, an unexpected key, a shape mismatch or a non-finite value is
an error naming them.

The workdir receives ``checkpoints/`` (a step-0 checkpoint in the training
state's layout, written by :func:`fracq.train.checkpoint.save_variables`,
with ``params`` and ``batch_stats``: the default
``config.init_collections``) and ``import.json`` (the model, its keyword
arguments and the SHA-256 of the weights file). Everything is written into a
temporary directory beside the workdir first and moved in only when
complete: a failed import leaves the workdir as it was. A workdir that is
not empty is refused unless ``--overwrite``, which moves its previous run
outputs into ``<workdir>/previous-<UTC time>/`` (as
``--config.overwrite=True`` does for a training run).

The classifier's size comes from the weights (1000 for ImageNet weights);
the run that starts from the checkpoint needs the same
``config.num_classes``. Inception-V3 weights without the auxiliary head
(no ``AuxLogits.*`` keys) give a model with ``aux_logits=False``: pass
``--config.model_kwargs`` accordingly. torchvision's Inception-V3 ImageNet
weights expect its ``transform_input`` (pixels scaled to [-1, 1]); the
import folds it into the stem convolution and BatchNorm exactly
(:func:`fold_transform_input`), so every imported model takes the
ImageNet-normalised images of fracq's ``imagenet2012`` pipeline
(``--no-transform_input`` for Inception weights trained without it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fracq import models
from fracq.models import import_weights as convert
from fracq.train import checkpoint as ckpt_lib

__all__ = [
  'MODELS',
  'ImportWeightsError',
  'fold_transform_input',
  'import_weights',
  'main',
]

# Zoo model -> (name-map family, torchvision constructor, input side).
MODELS = {
  'resnet18': ('resnet', 'torchvision.models.resnet18', 224),
  'resnet34': ('resnet', 'torchvision.models.resnet34', 224),
  'resnet50': ('resnet', 'torchvision.models.resnet50', 224),
  'mobilenet_v2': ('mobilenet_v2', 'torchvision.models.mobilenet_v2', 224),
  'inception_v3': ('inception', 'torchvision.models.inception_v3', 299),
}
# The classifier's weight in each family's state dict.
_CLASSIFIER_KEY = {
  'resnet': 'fc.weight',
  'mobilenet_v2': 'classifier.1.weight',
  'inception': 'fc.weight',
}
_INCEPTION_AUX_KEY = 'AuxLogits.fc.weight'
METADATA_FILE = 'import.json'
# torchvision's Inception-V3 ``transform_input``: its ImageNet weights were
# ported from TensorFlow and expect pixels scaled to [-1, 1]; torchvision
# maps ImageNet-normalised input x to x * STD / 0.5 + (MEAN - 0.5) / 0.5.
_TV_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
_TV_STD = np.array([0.229, 0.224, 0.225], np.float64)
_INCEPTION_STEM = 'Conv2d_1a_3x3'


class ImportWeightsError(ValueError):
  """The model name, weights file or workdir cannot be used as given."""


def _check_model(model: str) -> None:
  if model not in MODELS:
    raise ImportWeightsError(
      f'No torchvision counterpart for model {model!r}; importable: '
      f"{', '.join(sorted(MODELS))} (the zoo's other models have no "
      'torchvision weights).'
    )


def _check_workdir(workdir: str, overwrite: bool) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ImportWeightsError(
      f'--workdir {workdir} exists and is not a directory; choose another.'
    )
  names = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  if names and not overwrite:
    shown = ', '.join(names[:5]) + (' ...' if len(names) > 5 else '')
    raise ImportWeightsError(
      f'--workdir {workdir} is not empty (it holds {shown}). Choose another '
      "--workdir, or pass --overwrite to move its previous run's outputs "
      'into <workdir>/previous-<time>/.'
    )


def _read_weights(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise ImportWeightsError(f'--weights {path}: no such file.')
  try:
    state_dict = convert.load_state_dict(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ImportWeightsError(
      f'Cannot read --weights {path} as a state dict ({type(e).__name__}: '
      f'{e}). Give a torchvision state dict (torch.save(model.state_dict(), '
      'path), read with PyTorch) or an .npz with the same key names.'
    ) from e
  if not state_dict:
    raise ImportWeightsError(f'--weights {path} holds no arrays.')
  bad = sorted(
    key
    for key, value in state_dict.items()
    if np.issubdtype(value.dtype, np.floating)
    and not np.all(np.isfinite(value))
  )
  if bad:
    raise ImportWeightsError(
      f'--weights {path} has non-finite values (NaN or inf) in {bad[:20]}'
      f'{" ..." if len(bad) > 20 else ""}; the file is corrupt.'
    )
  return state_dict


def _model_kwargs(family: str, state_dict) -> dict:
  """The zoo model's keyword arguments that the weights decide."""
  kwargs = {}
  head = state_dict.get(_CLASSIFIER_KEY[family])
  if head is not None and head.ndim == 2:
    kwargs['num_classes'] = int(head.shape[0])
  if family == 'inception':
    kwargs['aux_logits'] = _INCEPTION_AUX_KEY in state_dict
  return kwargs


def fold_transform_input(state_dict: dict) -> dict:
  """Folds torchvision's Inception-V3 ``transform_input`` into the weights.

  The per-channel affine map ``x * a + b`` before the stem convolution
  becomes the kernel scaled by ``a`` and the BatchNorm mean lowered by the
  kernel's response to ``b``; exact, because the stem convolution is
  unpadded (every output sees a full window) and bias-free. The model then
  takes ImageNet-normalised input, as fracq's ``imagenet2012`` pipeline
  gives.
  """
  weight_key = f'{_INCEPTION_STEM}.conv.weight'
  mean_key = f'{_INCEPTION_STEM}.bn.running_mean'
  out = dict(state_dict)
  weight = np.asarray(state_dict[weight_key], np.float64)
  scale = _TV_STD / 0.5
  shift = (_TV_MEAN - 0.5) / 0.5
  out[weight_key] = (weight * scale[None, :, None, None]).astype(
    state_dict[weight_key].dtype
  )
  response = np.einsum('ochw,c->o', weight, shift)
  out[mean_key] = (
    np.asarray(state_dict[mean_key], np.float64) - response
  ).astype(state_dict[mean_key].dtype)
  return out


def _template(model: str, kwargs: dict) -> dict:
  """The model's variables as zero arrays (shapes only: no random init)."""
  module = models.get_model(model, **kwargs)
  side = MODELS[model][2]
  shapes = jax.eval_shape(
    lambda: module.init(
      jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False
    )
  )
  return jax.tree_util.tree_map(
    lambda s: np.zeros(s.shape, s.dtype), dict(shapes)
  )


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _move_into(tmp: str, workdir: str) -> None:
  """Moves the complete import in ``tmp`` into ``workdir``."""
  if not os.path.exists(workdir):
    os.rename(tmp, workdir)
    return
  # The checkpoint last: its presence marks a complete import.
  for name in (METADATA_FILE, 'checkpoints'):
    os.rename(os.path.join(tmp, name), os.path.join(workdir, name))
  os.rmdir(tmp)


def import_weights(
  model: str,
  weights: str,
  workdir: str,
  *,
  overwrite: bool = False,
  transform_input: bool | None = None,
) -> dict:
  """Converts torchvision ``weights`` for zoo ``model`` into ``workdir``.

  Args:
    model: a name of :data:`MODELS`.
    weights: the ``.pth``/``.pt`` or ``.npz`` state dict.
    workdir: where the checkpoint goes (absent or empty, or ``overwrite``).
    overwrite: move the workdir's previous run outputs aside first.
    transform_input: Inception-V3 only (default on): fold torchvision's
      ``transform_input`` into the stem (:func:`fold_transform_input`), as
      its ImageNet weights need; off for weights trained without it.

  Returns:
    What ``import.json`` records (``model``, ``model_kwargs``,
    ``parameters``, ``weights_file``, ``weights_sha256``...) and the
    absolute ``workdir``.

  Raises:
    ImportWeightsError: an unknown model, an unreadable or mismatched
      weights file (naming the keys and shapes), or a non-empty workdir;
      the workdir is then left untouched.
  """
  _check_model(model)
  family = MODELS[model][0]
  if family != 'inception' and transform_input:
    raise ImportWeightsError(
      f'--transform_input applies to inception_v3 only, not {model!r}; drop it.'
    )
  transform_input = family == 'inception' and transform_input is not False
  _check_workdir(workdir, overwrite)
  state_dict = _read_weights(weights)
  kwargs = _model_kwargs(family, state_dict)
  if transform_input and f'{_INCEPTION_STEM}.conv.weight' in state_dict:
    state_dict = fold_transform_input(state_dict)
  try:
    variables = convert.import_torchvision(
      _template(model, kwargs), state_dict, family
    )
  except ValueError as e:
    raise ImportWeightsError(
      f'--weights {weights} does not fit model {model!r} '
      f'({MODELS[model][1]} layout, {kwargs}): {e}'
    ) from e
  variables = {c: variables[c] for c in ('params', 'batch_stats')}
  summary = {
    'model': model,
    'model_kwargs': kwargs,
    'parameters': sum(
      int(x.size) for x in jax.tree_util.tree_leaves(variables['params'])
    ),
    'weights_file': os.path.basename(weights),
    'weights_sha256': _sha256(weights),
    'collections': 'params,batch_stats',
  }
  if family == 'inception':
    summary['transform_input_folded'] = transform_input
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(
    prefix=f'.{os.path.basename(workdir)}.import-', dir=parent
  )
  try:
    ckpt_lib.save_variables(tmp, variables)
    with open(os.path.join(tmp, METADATA_FILE), 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True)
    if overwrite:
      ckpt_lib.move_previous_run(workdir)
    _move_into(tmp, workdir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {**summary, 'workdir': workdir}


def _parser() -> argparse.ArgumentParser:
  models_help = '; '.join(
    f'{name} ({ctor}, trained at {side}x{side})'
    for name, (_, ctor, side) in sorted(MODELS.items())
  )
  parser = argparse.ArgumentParser(
    prog='python -m fracq.tools.import_weights',
    description=(
      'Writes torchvision weights as a checkpoint that '
      'launch.py --config.init_from=WORKDIR starts from.'
    ),
    epilog=f'Importable models: {models_help}.',
  )
  parser.add_argument(
    '--model',
    required=True,
    help=f'The zoo model: {", ".join(sorted(MODELS))}.',
  )
  parser.add_argument(
    '--weights',
    required=True,
    help='torchvision state dict: .pth/.pt (needs PyTorch) or .npz.',
  )
  parser.add_argument(
    '--workdir',
    required=True,
    help='Where the checkpoint goes (absent or empty).',
  )
  parser.add_argument(
    '--transform_input',
    action=argparse.BooleanOptionalAction,
    default=None,
    help="inception_v3 only, on by default: fold torchvision's "
    'transform_input (which its ImageNet weights need) into the stem, so the '
    'model takes ImageNet-normalised images; --no-transform_input for '
    'weights trained without it.',
  )
  parser.add_argument(
    '--overwrite',
    action='store_true',
    help="Move a non-empty workdir's previous outputs into "
    '<workdir>/previous-<time>/ first.',
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (1: bad input, 2: usage)."""
  args = _parser().parse_args(argv)
  try:
    summary = import_weights(
      args.model,
      args.weights,
      args.workdir,
      overwrite=args.overwrite,
      transform_input=args.transform_input,
    )
  except ImportWeightsError as e:
    print(f'import_weights: error: {e}', file=sys.stderr)
    return 1
  print(
    f'Imported {summary["parameters"]:,} parameters of {summary["model"]} '
    f'{summary["model_kwargs"]} into {summary["workdir"]}. Start a run '
    f'from it with --config.init_from={summary["workdir"]} (the config '
    'needs the same model and num_classes).'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
