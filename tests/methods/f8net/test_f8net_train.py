"""F8Net through the training system: mock TFDS configs, data parallelism."""

import importlib

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from fracq.train import train as tr
from tests.train.test_train import _state_after_steps


def get_config(name, arg='smoke'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.mark.parametrize(
  'name,arg',
  [
    ('cifar10_resnet20_f8net', 'smoke,pact=True'),  # PACT in the blocks
    ('f8net_imagenet', 'smoke,model=mobilenet_v2'),  # depthwise convs
  ],
)
def test_f8net_configs_train_on_mock_tfds(name, arg, tmp_path):
  c = get_config(name, arg)
  assert c.quant.method == 'f8net'
  c.num_train_steps = 2
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  with tfds.testing.mock_data(num_examples=16):
    m = tr.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(m['eval_loss'])


def test_bad_f8net_config_values_are_clear():
  with pytest.raises(ValueError, match='recipe'):
    get_config('f8net_imagenet', 'recipe=pretrain')
  with pytest.raises(ValueError, match='model'):
    get_config('f8net_imagenet', 'model=vgg')


def _f8_state_after_steps(mesh, steps):
  return _state_after_steps(mesh, steps, name='digits_f8net')


def test_f8net_data_parallel_step_equals_single_device():
  """Folding and activation formats use statistics of the global batch.

  One step: after it, parameters differ by float-reduction noise (~1e-8),
  and a later step may round one weight code differently on 8 devices than
  on 1 (a legitimate discrete difference, not a bug).
  """
  s8, m8 = _f8_state_after_steps(
    Mesh(np.array(jax.devices()), ('batch',)), steps=1
  )
  s1, m1 = _f8_state_after_steps(
    Mesh(np.array(jax.devices()[:1]), ('batch',)), steps=1
  )
  chex.assert_trees_all_close(s8.trainable, s1.trainable, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(s8.state, s1.state, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
