"""Sparsity/cluster preservation through the training system (launch-level).

Digits: float -> PCQAT (one-shot prune + cluster at calibration) -> export,
the exported kernels exactly as sparse and clustered as asked, and the
packed artifact smaller than the same model stored dense. CIFAR-10
ResNet-20: the prune -> cluster -> PCQAT pipeline on mock TFDS, each stage
after the first from the previous one's workdir.
"""

import importlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fracq.export import artifact
from fracq.train import train as tr


def get_config(name, arg):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def _kernels(path):
  codes, _, manifest = artifact.read_artifact(path)
  return codes, manifest


@pytest.fixture(scope='module')
def float_digits(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('float'))
  c = get_config('digits_float', 'smoke')
  tr.train_and_evaluate(c, wd)
  return wd


def test_digits_pcqat_export_keeps_structure(float_digits, tmp_path):
  c = get_config('digits_pcqat', 'smoke,sparsity=0.5,clusters=8')
  c.init_from = float_digits
  c.export = True
  m = tr.train_and_evaluate(c, str(tmp_path))
  codes, _ = _kernels(os.path.join(tmp_path, 'model.fracq.safetensors'))
  assert len(codes) == 6
  for name, q in codes.items():
    q = np.asarray(q)
    # One-shot magnitude pruning to 50% per kernel, kept through training;
    # the quantizer's zero is exact.
    assert abs(np.mean(q == 0) - 0.5) < 0.01, name
    assert np.unique(q).size <= 8, name
  # The sparse+codebook encodings beat the dense size at the same bits.
  assert m['artifact_structure_saved_bytes'] > 0
  assert m['artifact_bytes'] < 0.6 * m['artifact_theoretical_bytes']
  assert m['integer_prediction_match'] == 1.0
  assert m['onnx_prediction_match'] == 1.0


@pytest.mark.parametrize(
  'bad,match',
  [
    ('sparsity=1.0', 'outside'),
    ('clusters=1', 'at least 2'),
  ],
)
def test_digits_pcqat_bad_values(float_digits, tmp_path, bad, match):
  c = get_config('digits_pcqat', f'smoke,{bad}')
  c.init_from = float_digits
  with pytest.raises(ValueError, match=match):
    tr.train_and_evaluate(c, str(tmp_path))


def test_unknown_preserve_mode_is_clear(tmp_path):
  c = get_config('digits_uniform', 'smoke')
  c.quant.preserve.mode = 'prune_all'
  with pytest.raises(ValueError, match='preserve'):
    tr.train_and_evaluate(c, str(tmp_path))


def test_cifar10_prune_cluster_pcqat_pipeline_on_mock_tfds(tmp_path):
  wds = {s: str(tmp_path / s) for s in ('prune', 'cluster', 'pcqat')}

  def run(name, arg, stage, init_from=None):
    c = get_config(name, arg)
    c.num_train_steps = 3
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    if init_from:
      c.init_from = wds[init_from]
    with tfds.testing.mock_data(num_examples=16):
      return tr.train_and_evaluate(c, wds[stage])

  # The prune stage starts from the random init here (a float run first
  # would add nothing the checks below see).
  run('cifar10_resnet20_pcqat', 'smoke,stage=prune', 'prune')
  run('cifar10_resnet20_pcqat', 'smoke,stage=cluster', 'cluster', 'prune')
  m = run('cifar10_resnet20_pcqat', 'smoke,stage=pcqat', 'pcqat', 'cluster')
  assert np.isfinite(m['eval_loss'])
  codes, _ = _kernels(os.path.join(wds['pcqat'], 'model.fracq.safetensors'))
  assert codes
  for name, q in codes.items():
    q = np.asarray(q)
    # The gradual schedule reached 50% on every kernel in the prune stage;
    # the cluster and PCQAT stages kept those zeros and <= 16 values.
    assert np.mean(q == 0) >= 0.49, name
    assert np.unique(q).size <= 16, name


def test_gradual_pruning_config_errors_and_schedule():
  from fracq.methods import preserve
  from fracq.methods.preserve import factory as preserve_factory

  c = get_config('cifar10_resnet20_pcqat', 'stage=prune')
  p = c.quant.preserve
  tr_ = preserve_factory.preserve_transform(total_steps=300, **p)
  assert isinstance(tr_, preserve.PruningTransform)
  assert (tr_.begin_step, tr_.end_step, tr_.final_sparsity) == (0, 200, 0.5)
  assert tr_.sparsity_at(0) == 0.0 and tr_.sparsity_at(200) == 0.5
  with pytest.raises(ValueError, match='needs the number of training steps'):
    preserve_factory.preserve_transform(**p)
  p.mode = 'prune_cluster'
  with pytest.raises(ValueError, match="mode='prune' only"):
    preserve_factory.check_preserve(**p)
  p.mode, p.sparsity = 'prune', -1.0
  with pytest.raises(ValueError, match='final sparsity'):
    preserve_factory.check_preserve(**p)
  p.sparsity, p.prune_schedule = 0.5, 'cubic'
  with pytest.raises(ValueError, match='prune_schedule'):
    preserve_factory.check_preserve(**p)
  with pytest.raises(ValueError, match='stage'):
    get_config('cifar10_resnet20_pcqat', 'stage=quantize')
