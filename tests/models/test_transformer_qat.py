"""Tiny LM and ViT through the quantized configs: training, hard assignment
within the budget, export of the packed artifact (embedding included), and
HAWQ's Hessian search on next-byte loss."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export
from fracq import models
from fracq.methods import hawq as hawq_lib
from fracq.train import train as tr


@pytest.mark.parametrize(
  'config,embed',
  [('lm_fracbits', True), ('vit_digits_uniform', False)],
)
def test_quantized_transformer_config_trains_and_exports(
  config, embed, tmp_path
):
  c = importlib.import_module(f'configs.{config}').get_config('smoke')
  c.export = True
  m = tr.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(m['eval_loss'])
  # Hard assignment lands within 1% below the size budget (FracBits), and
  # a uniform run reports its integer cost as the target it would meet.
  target = m.get('cost_target', m['cost_integer'])
  assert 0.99 * target <= m['cost_integer'] <= target
  codes, floats, manifest = export.read_artifact(
    str(tmp_path / 'model.fracq.safetensors')
  )
  layers = {name.split('/kernel')[0] for name in codes if '/kernel' in name}
  assert any(layer.endswith('attn/query') for layer in layers)
  assert any(layer.endswith('mlp_down') for layer in layers)
  # The byte embedding is packed at its 8 bits with one scale per row.
  assert ('embed/embedding.packed' in codes) == embed
  if embed:
    assert manifest['tensors']['embed/embedding.packed']['bits'] == 8
    assert floats['embed/embedding.scale'].shape == (256,)
    assert 'params/embed/embedding' not in floats


def test_lm_configs_fix_the_embedding_at_8_bits_and_share_the_schedule():
  configs = {
    name: importlib.import_module(f'configs.{name}').get_config('bits=3')
    for name in ('lm_uniform', 'lm_fracbits', 'lm_hawq')
  }
  for c in configs.values():
    assert c.quant.layers.embed == '^embed$' and c.quant.layers.embed_bits == 8
    # Tied embeddings: no separate head to fix.
    assert c.quant.layers.fixed == ''
    assert c.init_collections == 'params'
  schedules = {
    (c.num_train_steps, c.learning_rate, c.optimizer, c.seq_len, c.batch_size)
    for c in configs.values()
  }
  assert len(schedules) == 1
  untied = importlib.import_module('configs.lm_uniform').get_config()
  untied.model_kwargs.tie_embeddings = False
  from configs import common

  common.text_quant(untied, 'uniform')
  assert untied.quant.layers.fixed == '^head$'


def test_hawq_searches_a_language_model_on_next_byte_loss():
  model = models.get_model('gpt_tiny')
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, 256, (4, 17)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  rules = [
    fracq.Rule(layer_types=('Embed',), weight=fracq.TensorSpec(bits=8)),
    fracq.Rule(
      weight=fracq.FracBitsSpec(
        bits=3.0,
        bit_bounds=(2.0, 8.0),
        granularity='group',
        group_size=16,
      ),
      act=fracq.TensorSpec(bits=8),
    ),
  ]
  qm = fracq.quantize(
    model,
    rules,
    batch['inputs'],
    budget=fracq.Budget(kind='size', uniform_bits=3),
    call_kwargs={'train': False},
  )
  variables = model.init(jax.random.key(0), batch['inputs'], train=False)
  choice, info = hawq_lib.search(
    model,
    variables,
    qm.facts,
    qm.rules,
    qm.target,
    'size',
    [batch],
    candidates=(2, 3, 4, 8),
    num_probes=2,
  )
  dense = {p for p, f in qm.facts.items() if f.layer_type != 'Embed'}
  assert set(choice) == dense and 'embed' not in choice
  # Hutchinson estimates on the next-byte loss of every searched layer (2
  # probes on an untrained model: finite, not necessarily positive).
  traces = [info['traces'][layer]['avg_trace'] for layer in dense]
  assert np.all(np.isfinite(traces)) and np.any(np.abs(traces) > 0)
  cost = sum(qm.facts[p].numel * b for p, b in choice.items())
  cost += qm.facts['embed'].numel * 8
  assert cost <= qm.target
  # The chosen bits become uniform-QAT rules that keep the group size.
  per_layer = hawq_lib.rules_for_bits(qm.rules, choice)
  searched = [r for r in per_layer if (r.name or '').startswith('hawq_')]
  assert len(searched) == len(dense)
  assert {r.weight.group_size for r in searched} == {16}
