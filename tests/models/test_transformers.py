"""GPT decoder and ViT: causality, tied embeddings, shapes, training."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fracq import models
from fracq.data import digits
from fracq.train import train as tr


def init(model, x):
  return jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), x
  )


def apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


@pytest.fixture(scope='module')
def gpt_tiny():
  """gpt_tiny (tied embeddings) and its variables, initialised once."""
  model = models.get_model('gpt_tiny')
  return model, init(model, jnp.zeros((1, 16), jnp.int32))


def test_gpt_is_causal(gpt_tiny):
  model, variables = gpt_tiny
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  logits = apply(model)(variables, tokens)
  assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
  changed = apply(model)(variables, tokens.at[:, 9].add(1))
  np.testing.assert_array_equal(logits[:, :9], changed[:, :9])
  assert not np.allclose(logits[:, 9:], changed[:, 9:])


@pytest.mark.parametrize('tied', [True, False])
def test_gpt_tied_embeddings_share_the_table(gpt_tiny, tied):
  model, variables = gpt_tiny
  params = dict(variables['params'])
  assert 'head' not in params
  if not tied:
    model = models.get_model('gpt_tiny', tie_embeddings=False)
    shapes = jax.eval_shape(
      functools.partial(model.init, train=False),
      jax.random.key(0),
      jnp.zeros((1, 16), jnp.int32),
    )
    head = shapes['params']['head']
    assert head['kernel'].shape == (32, 256)
    params['head'] = {'kernel': jnp.ones((32, 256)), 'bias': jnp.zeros(256)}
  tokens = jnp.zeros((1, 8), jnp.int32)  # only row 0 of the table is read

  def output_of_byte_5(params):
    return model.apply({'params': params}, tokens, train=False)[..., 5].sum()

  grads = jax.jit(jax.grad(output_of_byte_5))(params)
  row5 = grads['embed']['embedding'][5]
  # Row 5 reaches the output only through the tied head.
  assert bool(jnp.any(row5 != 0)) is tied


def test_gpt_refuses_sequences_longer_than_max_len():
  model = models.get_model('gpt_tiny')
  with pytest.raises(ValueError, match='max_len'):
    init(model, jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize('pool,tokens', [('cls', 5), ('mean', 4)])
def test_vit_shapes(pool, tokens):
  model = models.get_model('vit_tiny', pool=pool)
  x = jnp.zeros((3, 8, 8, 1))
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), x
  )
  params = variables['params']
  assert params['patch_embed']['kernel'].shape == (4, 4, 1, 16)
  assert params['pos_embed'].shape == (1, tokens, 16)
  out = jax.eval_shape(
    functools.partial(model.apply, train=False), variables, x
  )
  assert out.shape == (3, 10) and out.dtype == jnp.float32


def test_vit_on_digits_training_reduces_the_loss():
  model = models.get_model('vit_tiny')
  batch = digits.train_batch(0, 32, 0)
  params = init(model, batch['image'][:1])['params']
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['label']
    ).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(10):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(10), rel=1e-3)  # zero-init head
  assert losses[-1] < losses[0] - 0.2


def test_vit_refuses_indivisible_patches():
  with pytest.raises(ValueError, match='patch_size'):
    init(models.get_model('vit_tiny', patch_size=3), jnp.zeros((1, 8, 8, 1)))


def test_transformer_registry_and_fixed_layers():
  assert {'gpt_tiny', 'gpt_small', 'vit_digits', 'vit_s16'} <= set(
    models.list_models()
  )
  assert models.default_fixed_layers('gpt_small') == '^embed$|^head$'
  assert models.default_fixed_layers('vit_s16') == '^patch_embed$|^head$'


def test_lm_float_smoke_trains_and_reports_bits_per_byte(tmp_path):
  c = importlib.import_module('configs.lm_float').get_config('smoke')
  m = tr.train_and_evaluate(c, str(tmp_path))
  assert m['eval_bits_per_byte'] == pytest.approx(m['eval_loss'] / np.log(2))
  assert m['eval_examples'] > 0 and len(m['corpus_sha256']) == 64
  # Six steps from uniform logits (8 bits per byte) already learn something.
  assert m['eval_bits_per_byte'] < 8.0


@pytest.mark.parametrize('arg', ['', 'smoke'])
def test_vit_digits_config_builds_for_the_digits_input(arg):
  c = importlib.import_module('configs.vit_digits_float').get_config(arg)
  module = tr.build_module(c)
  x = tr.sample_input(c, 2)
  variables = jax.eval_shape(
    functools.partial(module.init, train=False), jax.random.key(0), x
  )
  out = jax.eval_shape(
    functools.partial(module.apply, train=False), variables, x
  )
  assert out.shape == (2, 10)
