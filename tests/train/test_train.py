"""The training system: steps, data parallelism, checkpoints, guard rails."""

import glob
import importlib
import os

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from fracq import data as data_lib
from fracq.train import checkpoint as ckpt_lib
from fracq.train import quant_config
from fracq.train import train as tr


def get_config(name, arg='smoke'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def test_digits_smoke_run_writes_events_and_checkpoint(tmp_path):
  c = get_config('digits_float')
  m = tr.train_and_evaluate(c, str(tmp_path))
  assert m['eval_examples'] == 360 and 0 <= m['eval_accuracy'] <= 1
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']


@pytest.mark.parametrize(
  'name,arg',
  [
    ('cifar10_resnet20', 'smoke'),
    ('cifar10_resnet20', 'smoke,dataset=cifar100'),
    ('imagenet_resnet50', 'smoke'),
  ],
)
def test_one_train_step_on_mock_tfds(name, arg, tmp_path):
  c = get_config(name, arg)
  c.num_train_steps = 1
  c.eval_every_steps = 1
  c.checkpoint_every_steps = 1
  with tfds.testing.mock_data(num_examples=20):
    m = tr.train_and_evaluate(c, str(tmp_path))
  assert m['eval_examples'] == 20
  assert np.isfinite(m['eval_loss'])


def _state_after_steps(mesh, steps=2, name='digits_float'):
  """The train state after ``steps`` data-parallel steps of config ``name``
  (batch 16) on ``mesh``."""
  c = get_config(name)
  c.batch_size = 16
  module = tr.build_module(c)
  first = data_lib.digits.train_batch(0, 16, 0)
  wrapper = quant_config.build_model_wrapper(
    c, module, first['image'], total_steps=10
  )
  state, tx = tr.create_train_state(
    c, wrapper, first, jax.random.key(0), total=10
  )
  step = tr.make_train_step(c, wrapper, tx, mesh)
  for t in range(steps):
    b = data_lib.digits.train_batch(t, 16, 0)
    state, metrics = step(state, tr.to_global(b, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_data_parallel_step_equals_single_device():
  assert jax.device_count() == 8
  s8, m8 = _state_after_steps(Mesh(np.array(jax.devices()), ('batch',)))
  s1, m1 = _state_after_steps(Mesh(np.array(jax.devices()[:1]), ('batch',)))
  chex.assert_trees_all_close(s8.trainable, s1.trainable, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(
    s8.state['batch_stats'], s1.state['batch_stats'], rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  # The step really moved the parameters.
  assert not np.allclose(s1.trainable['params']['head']['kernel'], 0)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
  c = get_config('digits_float')
  c.num_train_steps = 12
  c.checkpoint_every_steps = 2
  c.log_every_steps = 2
  c.debug_nan_at_step = 5
  with pytest.raises(tr.NonFiniteError, match='at step 5'):
    tr.train_and_evaluate(c, str(tmp_path))
  # Checkpoints written before the blow-up are intact and finite.
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints'))
  assert steps == [2, 4], 'the good checkpoints must survive'
  raw = ckpt_lib.restore_raw(str(tmp_path), steps[-1])
  leaves = jax.tree_util.tree_leaves(raw['trainable'])
  assert all(np.all(np.isfinite(x)) for x in leaves)


def test_workdir_of_another_config_is_refused(tmp_path):
  c = get_config('digits_float')
  tr.train_and_evaluate(c, str(tmp_path))
  c2 = get_config('digits_float')
  c2.learning_rate = 0.05
  with pytest.raises(
    ValueError,
    match=r'different configuration .*'
    r'learning_rate.*overwrite=True',
  ):
    tr.train_and_evaluate(c2, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  c2.overwrite = True
  tr.train_and_evaluate(c2, str(tmp_path))


def test_resume_finished_run_and_init_from(tmp_path):
  c = get_config('digits_float')
  m1 = tr.train_and_evaluate(c, str(tmp_path / 'a'))
  # Resuming a finished run re-evaluates the restored state.
  m2 = tr.train_and_evaluate(c, str(tmp_path / 'a'))
  assert m1['eval_accuracy'] == m2['eval_accuracy']
  c2 = get_config('digits_float')
  c2.init_from = str(tmp_path / 'a')
  c2.num_train_steps = -1
  c2.num_epochs = 0.0  # evaluation only
  m3 = tr.train_and_evaluate(c2, str(tmp_path / 'b'))
  np.testing.assert_allclose(m3['eval_loss'], m1['eval_loss'], rtol=1e-4)


def test_missing_dataset_message(tmp_path):
  c = get_config('cifar10_resnet20')
  c.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match='tfds build cifar10'):
    tr.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd'), 'no half-made workdir'
  c = get_config('imagenet_resnet50')
  c.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match='downloads/manual'):
    tr.train_and_evaluate(c, str(tmp_path / 'wd2'))


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('batch_size', 0, 'batch_size=0; it must be a positive integer'),
    (
      'num_train_steps',
      0,
      'num_train_steps=0; give a positive step count, or -1',
    ),
    ('export', True, 'export=True needs a quantized'),
  ],
)
def test_bad_config_refused_before_any_work(
  key, value, match, tmp_path, monkeypatch
):
  def no_data(*args, **kwargs):
    raise AssertionError('data was read before the config was checked')

  monkeypatch.setattr(data_lib, 'train_iterator', no_data)
  c = get_config('digits_float')
  c[key] = value
  with pytest.raises(tr.ConfigError, match=match):
    tr.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd')


def test_tfds_read_error_reports_the_real_cause(tmp_path, monkeypatch):
  class Broken:
    data_dir = str(tmp_path)

    def as_dataset(self, **kwargs):
      raise PermissionError('cannot read shard 3: permission denied')

  monkeypatch.setattr(tfds, 'builder', lambda name, data_dir: Broken())
  from fracq.data import tfds_data

  with pytest.raises(
    data_lib.DatasetError, match='PermissionError: cannot read shard 3'
  ) as err:
    # pylint: disable-next=protected-access
    tfds_data._load('cifar10', 'train', str(tmp_path))
  assert 'tfds build' not in str(err.value)
