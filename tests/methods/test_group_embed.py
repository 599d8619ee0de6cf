"""Group-wise kernels and quantized embedding tables.

Group-wise fake quantization is checked against a numpy reference (one
scale per group of consecutive input features per output channel, round half
to even, clipping to the grid) for uniform LSQ, the min/max observer and
FracBits at integer bits; ``nn.Embed`` tables quantize weight-only through
an ``Embed`` rule, in the lookup and in ``attend``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export
from fracq import interception


class _Mlp(nn.Module):
  """A Dense with 8 input features (two groups of 4) and 3 outputs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(3, name='dense')(x)


class _EmbedNet(nn.Module):
  """An Embed, a Dense, and the Embed again as a tied output head."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    embed = nn.Embed(16, 8, name='embed')
    x = nn.Dense(8, name='dense')(embed(tokens))
    return embed.attend(x)


def _columns(kernel, group_size):
  """The numpy reference grouping of a (in, out) kernel: ``[g, :, n]`` is
  group ``g`` of output channel ``n``."""
  fan_in, out = kernel.shape
  return kernel.reshape(fan_in // group_size, group_size, out)


def _reference(kernel, step, group_size, qmin, qmax):
  """``clip(round(w / s), qmin, qmax) * s`` with ``s`` per group and output
  channel (``step`` in the layout ``[g * out + n]``)."""
  blocks = _columns(kernel, group_size)
  s = np.asarray(step, np.float32).reshape(blocks.shape[0], 1, -1)
  q = np.clip(np.round(blocks / s), qmin, qmax)
  return (q * s).reshape(kernel.shape)


def _tiny(spec, **kwargs):
  x = jnp.asarray(np.random.RandomState(0).randn(6, 8), jnp.float32)
  qm = fracq.quantize(
    _Mlp(),
    [fracq.Rule(weight=spec)],
    x[:1],
    call_kwargs={'train': False},
    **kwargs,
  )
  v = qm.calibrate(qm.init(jax.random.key(0), x), x)
  kernel = np.asarray(v['params']['dense']['kernel'], np.float32)
  fake_quant = export.fake_quant_kernels(qm, v, x)['dense']
  return qm, v, kernel, fake_quant


def test_group_lsq_equals_numpy_reference():
  spec = fracq.TensorSpec(bits=3, granularity='group', group_size=4)
  _, v, kernel, fake_quant = _tiny(spec)
  step = np.asarray(v['quant']['dense']['kernel_step'])
  assert step.shape == (2 * 3,)
  # LSQ's initial step per group: 2 mean|w| / sqrt(Qp), capped at max|w|/Qp.
  blocks = np.abs(_columns(kernel, 4))
  init = np.minimum(2 * blocks.mean(1) / np.sqrt(3), blocks.max(1) / 3)
  np.testing.assert_allclose(step, init.reshape(-1), rtol=1e-5)
  # Signed symmetric 3-bit kernels use the narrow grid [-3, 3].
  expected = _reference(kernel, step, 4, -3, 3)
  np.testing.assert_allclose(fake_quant, expected, rtol=1e-6, atol=1e-7)
  # Each group of each output channel holds at most 7 levels of its step.
  for g in range(2):
    for n in range(3):
      values = fake_quant[4 * g : 4 * g + 4, n] / step[3 * g + n]
      np.testing.assert_allclose(values, np.round(values), atol=1e-5)


def test_group_minmax_equals_numpy_reference():
  spec = fracq.TensorSpec(
    bits=4, granularity='group', group_size=4, range_method='minmax'
  )
  _, v, kernel, fake_quant = _tiny(spec)
  blocks = _columns(kernel, 4)
  # The observer keeps each group's min/max; the scale widens them to 0.
  np.testing.assert_allclose(
    np.asarray(v['quant_stats']['dense']['kernel_max']).reshape(2, 3),
    blocks.max(1),
  )
  lo = np.minimum(blocks.min(1), 0)
  hi = np.maximum(blocks.max(1), 0)
  # Symmetric observer scale max(-min, max) / ((qmax - qmin) / 2), [-7, 7].
  scale = np.maximum(-lo, hi) / 7.0
  expected = _reference(kernel, scale, 4, -7, 7)
  np.testing.assert_allclose(fake_quant, expected, rtol=1e-6, atol=1e-7)


def test_group_fracbits_at_integer_bits_equals_numpy_reference():
  spec = fracq.FracBitsSpec(bits=3.0, granularity='group', group_size=4)
  qm, v, kernel, fake_quant = _tiny(
    spec,
    budget=fracq.Budget(kind='size', uniform_bits=3),
    hard_assign_step=0,
  )
  assert v['quant']['dense']['kernel_bits'].shape == ()  # bits per layer
  shared = np.asarray(v['quant']['dense']['kernel_range'])
  assert shared.shape == (2 * 3,)  # a range per group
  expected = _reference(kernel, shared / 3.0, 4, -3, 3)
  np.testing.assert_allclose(fake_quant, expected, rtol=1e-6, atol=1e-7)
  # Hard-assigned at 3 bits: the same kernel, frozen with per-group scales.
  hard = qm.for_step(0)
  v = hard.prepare(v)
  frozen = export.freeze(hard, v)['dense']
  assert frozen.group_size == 4 and frozen.scale.shape == (2, 3)
  assert int(frozen.bits) == 3
  np.testing.assert_allclose(frozen.dequantize(), expected, rtol=1e-6)


def test_group_size_must_divide_the_contraction_length():
  spec = fracq.TensorSpec(bits=4, granularity='group', group_size=3)
  with pytest.raises(ValueError, match=r'dense: group_size=3 .* length 8'):
    _tiny(spec)


@pytest.mark.parametrize(
  'rule, match',
  [
    (
      fracq.Rule(act=fracq.TensorSpec(granularity='group', group_size=4)),
      "granularity='group' is for weights",
    ),
    (
      fracq.Rule(
        weight=fracq.TensorSpec(
          granularity='group', group_size=4, range_method='dorefa'
        )
      ),
      'no scale to group',
    ),
    (
      fracq.Rule(
        weight=fracq.FracBitsSpec(
          bits=3.0,
          bits_per_channel=True,
          granularity='group',
          group_size=4,
        )
      ),
      'bits per layer',
    ),
    (
      fracq.Rule(
        layer_types=('Embed', 'Dense'),
        weight=fracq.TensorSpec(),
        act=fracq.TensorSpec(),
      ),
      'token ids',
    ),
  ],
)
def test_bad_group_and_embed_rules_are_refused(rule, match):
  with pytest.raises(ValueError, match=match):
    interception.validate_rules([rule])


def _embed_model(rules):
  tokens = jnp.asarray(
    np.random.RandomState(1).randint(0, 16, (4, 5)), jnp.int32
  )
  qm = fracq.quantize(
    _EmbedNet(), rules, tokens[:1], call_kwargs={'train': False}
  )
  v = qm.calibrate(qm.init(jax.random.key(0), tokens), tokens)
  return qm, v, tokens


@pytest.mark.parametrize('granularity', ['channel', 'group'])
def test_embed_table_is_quantized_in_lookup_and_attend(granularity):
  spec = fracq.TensorSpec(
    bits=4,
    granularity=granularity,
    group_size=4 if granularity == 'group' else None,
  )
  qm, v, tokens = _embed_model(
    [
      fracq.Rule(layer_types=('Embed',), weight=spec),
      fracq.Rule(weight=fracq.TensorSpec(bits=8)),
    ]
  )
  table = np.asarray(v['params']['embed']['embedding'])
  step = np.asarray(v['quant']['embed']['kernel_step'])
  # Per row (one scale per token) or per group of 4 features of each row.
  if granularity == 'channel':
    assert step.shape == (16,)
    expected = np.clip(np.round(table / step[:, None]), -7, 7) * step[:, None]
  else:
    assert step.shape == (2 * 16,)
    s = step.reshape(2, 16).T  # [token, group]
    blocks = table.reshape(16, 2, 4) / s[:, :, None]
    expected = (np.clip(np.round(blocks), -7, 7) * s[:, :, None]).reshape(16, 8)
  fake_quant = export.fake_quant_kernels(qm, v, tokens)['embed']
  np.testing.assert_allclose(fake_quant, expected, rtol=1e-6, atol=1e-7)
  # The model computes with the quantized table in both uses: replacing the
  # float table by it leaves the output unchanged.
  out = np.asarray(qm.apply(v, tokens))
  params = jax.tree_util.tree_map(lambda a: a, v['params'])
  params['embed']['embedding'] = jnp.asarray(expected)
  np.testing.assert_allclose(
    out, np.asarray(qm.apply({**v, 'params': params}, tokens)), rtol=1e-6
  )
  # Facts: the lookup multiplies nothing; attend is (tokens x 16 x 8) MACs.
  facts = qm.facts['embed']
  assert facts.layer_type == 'Embed' and facts.weight_quantized
  assert facts.calls == 2 and facts.macs == 5 * 16 * 8
  assert facts.numel == 16 * 8
  # The size cost counts the table: numel x bits.
  costs = {layer.path: layer for layer in qm.cost_model.layers}
  assert costs['embed'].numel == 128 and costs['embed'].weight.fixed == 4


def test_rules_without_layer_types_leave_embed_float():
  qm, v, tokens = _embed_model([fracq.Rule(weight=fracq.TensorSpec(bits=4))])
  assert 'embed' not in v['quant'] and 'dense' in v['quant']
  assert not qm.facts['embed'].weight_quantized
  assert qm.facts['embed'].macs == 5 * 16 * 8
