"""A tiny GPT with group-wise kernels and a quantized embedding exports
exactly: freeze, bit-packing, the artifact round trip and the size report."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export
from fracq import models
from fracq.methods.uniform.lowering import _check_kernels


def _gpt(weight_spec, embed_spec, **kwargs):
  tokens = jnp.asarray(
    np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32
  )
  # gpt_tiny at one block, width 64, 16 positions: big enough that the file's
  # fixed container bytes stay well under 2% of it.
  rules = [
    fracq.Rule(layer_types=('Embed',), weight=embed_spec),
    fracq.Rule(weight=weight_spec),
  ]
  qm = fracq.quantize(
    models.get_model('gpt_tiny', num_layers=1, d_model=64, max_len=16),
    rules,
    tokens[:1],
    call_kwargs={'train': False},
    **kwargs,
  )
  # init sets the steps from the kernels (no calibration needed here).
  v = jax.jit(qm.init)(jax.random.key(0), tokens)
  return qm, v, tokens


def _check_round_trip(qm, v, tokens, tmp_path):
  path = str(tmp_path / 'gpt.fracq.safetensors')
  report = export.export_model(qm, v, path)
  codes, floats, manifest = export.read_artifact(path)
  deq = export.dequantized_kernels(codes, floats, manifest)
  fake_quant = export.fake_quant_kernels(qm, v, tokens)
  assert set(deq) == set(fake_quant)
  assert 'embed' in deq
  for layer, kernel in fake_quant.items():
    np.testing.assert_allclose(
      deq[layer], kernel, rtol=1e-6, atol=1e-8, err_msg=layer
    )
  return report, codes, floats, manifest


def test_group_wise_gpt_round_trips_within_two_percent(tmp_path):
  qm, v, tokens = _gpt(
    fracq.TensorSpec(bits=4, granularity='group', group_size=16),
    fracq.TensorSpec(bits=8, granularity='channel'),
  )
  report, codes, floats, manifest = _check_round_trip(qm, v, tokens, tmp_path)
  groups = manifest['metadata']['groups']
  # Every Dense / DenseGeneral kernel is group-wise; the embedding per row.
  assert 'embed' not in groups and len(groups) == len(codes) - 1
  assert codes['embed/embedding.packed'].shape == (256, 64)
  assert floats['embed/embedding.scale'].shape == (256,)
  assert 'params/embed/embedding' not in floats
  mlp = 'block_0/mlp_down'
  assert groups[mlp] == {'group_size': 16, 'out_axes': [1]}
  # 256 input features in groups of 16, 64 output channels.
  assert floats[f'{mlp}/kernel.scale'].shape == (16, 64)
  # Theoretical size: params x bits / 8, every scale (the group scales and
  # the embedding's), the float parts; the file is within 2% of it.
  frozen = export.freeze(qm, v)
  kernel_bytes = sum(fl.codes.size * int(fl.bits) / 8 for fl in frozen.values())
  scale_bytes = sum(
    a.nbytes for name, a in floats.items() if name.endswith('.scale')
  )
  float_bytes = sum(
    a.nbytes for name, a in floats.items() if not name.endswith('.scale')
  )
  assert frozen['embed'].codes.size == 256 * 64
  assert report.theoretical_bytes == pytest.approx(
    kernel_bytes + scale_bytes + float_bytes
  )
  assert 1.0 <= report.actual_over_theoretical < 1.02


class _EmbedNet(nn.Module):
  """An Embed, a Dense, and the Embed again as a tied output head."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    embed = nn.Embed(16, 8, name='embed')
    x = nn.Dense(8, name='dense')(embed(tokens))
    return embed.attend(x)


def _embed_net(spec, embed_spec, **kwargs):
  tokens = jnp.asarray(
    np.random.RandomState(1).randint(0, 16, (4, 5)), jnp.int32
  )
  rules = [
    fracq.Rule(layer_types=('Embed',), weight=embed_spec),
    fracq.Rule(weight=spec),
  ]
  qm = fracq.quantize(
    _EmbedNet(), rules, tokens[:1], call_kwargs={'train': False}, **kwargs
  )
  v = qm.calibrate(qm.init(jax.random.key(0), tokens), tokens)
  return qm, v, tokens


def test_group_wise_fracbits_and_embed_round_trip(tmp_path):
  spec = fracq.FracBitsSpec(bits=4.0, granularity='group', group_size=4)
  qm, v, tokens = _embed_net(
    spec,
    fracq.TensorSpec(bits=6, granularity='group', group_size=4),
    budget=fracq.Budget(kind='size', uniform_bits=4),
    hard_assign_step=0,
  )
  hard = qm.for_step(0)
  v = hard.prepare(v)
  _, codes, floats, manifest = _check_round_trip(hard, v, tokens, tmp_path)
  groups = manifest['metadata']['groups']
  assert groups['embed'] == {'group_size': 4, 'out_axes': [0]}
  # 2 groups of 4 features per token row; 2 groups per Dense output.
  assert floats['embed/embedding.scale'].shape == (2, 16)
  assert floats['dense/kernel.scale'].shape == (2, 8)
  assert manifest['tensors']['embed/embedding.packed']['bits'] == 6
  assert np.abs(codes['embed/embedding.packed']).max() <= 31


@pytest.mark.parametrize(
  'method,symmetric',
  [
    ('lsq_plus', False),
    ('minmax', False),
    ('ema_minmax', True),
    ('percentile', False),
  ],
)
def test_group_wise_range_methods_round_trip(method, symmetric, tmp_path):
  # Offsets and zero points are per group too, stored (groups, channels).
  spec = fracq.TensorSpec(
    bits=3,
    granularity='group',
    group_size=4,
    range_method=method,
    symmetric=symmetric,
    percentile=90.0,
  )
  qm, v, tokens = _embed_net(spec, spec)
  _, _, floats, _ = _check_round_trip(qm, v, tokens, tmp_path)
  part = 'offset' if method == 'lsq_plus' else 'zero_point'
  if not symmetric:
    assert floats[f'dense/kernel.{part}'].shape == (2, 8)
    assert floats[f'embed/embedding.{part}'].shape == (2, 16)


def test_integer_lowering_refuses_group_wise_kernels_and_embed():
  qm, v, _ = _embed_net(
    fracq.TensorSpec(bits=4, granularity='group', group_size=4),
    fracq.TensorSpec(bits=8),
  )
  frozen = export.freeze(qm, v)
  with pytest.raises(ValueError, match='Embed table'):
    _check_kernels(None, frozen)
  frozen.pop('embed')
  with pytest.raises(ValueError, match='group-wise kernel'):
    _check_kernels(None, frozen)
