"""The integer program packs kernel-wise FracBits kernels channel by channel,
and its theoretical size is params x bits / 8 from the bits alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Dense(6, name='d0')(x))
    return nn.Dense(3, name='d1')(x)


def _kernelwise_model():
  x = jnp.asarray(np.random.RandomState(0).randn(16, 10), jnp.float32)
  spec = fracq.FracBitsSpec(
    bits=4.0,
    bit_bounds=(0.0, 8.0),
    granularity='channel',
    bits_per_channel=True,
  )
  qm = fracq.quantize(
    _Mlp(),
    [fracq.Rule(weight=spec, act=fracq.TensorSpec(bits=8))],
    x[:1],
    budget=fracq.Budget(kind='size', uniform_bits=4),
    hard_assign_step=0,
    call_kwargs={'train': False},
  )
  v = qm.calibrate(qm.init(jax.random.key(0), x), x)
  hard = qm.for_step(0)
  v = hard.prepare(v)
  stats = jax.tree_util.tree_map(lambda s: s, v['quant_stats'])
  stats['d0']['kernel_hard_bits'] = jnp.asarray([2, 7, 0, 3, 5, 8], jnp.float32)
  stats['d1']['kernel_hard_bits'] = jnp.asarray([3, 6, 2], jnp.float32)
  return hard, {**v, 'quant_stats': stats}, x


def test_program_packs_each_channel_at_its_bits(tmp_path):
  hard, v, x = _kernelwise_model()
  path = str(tmp_path / 'model.int.safetensors')
  rep = export.export_integer(hard, v, x, path)
  # By hand: d0 has 10 inputs per channel at 2+7+0+3+5+8 = 25 bits -> 250
  # bits; d1 has 6 inputs at 3+6+2 = 11 bits -> 66 bits: 316 bits = 39.5 B.
  # The rest is int32: d0 bias (6) + sign, m0, exp (3 x 6); d1 bias (3) +
  # output scale (3): 4 x 30 = 120 B.
  assert rep['program_theoretical_bytes'] == 39.5 + 120
  _, _, manifest = export.read_artifact(path)
  assert manifest['tensors']['d0/kernel']['bits'] == [2, 7, 0, 3, 5, 8]
  assert manifest['tensors']['d1/kernel']['bits'] == [3, 6, 2]
  # Packed per channel (byte-aligned blocks): d0 1+9+0+4+7+10 = 31 B, d1
  # 3+5+2 = 10 B, vs 10*6 B + 6*3*6/8 = 73.5 B at the widest channel.
  codes, _, _ = export.read_artifact(path)
  prog = export.load_program(path)
  np.testing.assert_array_equal(
    np.asarray(prog(prog.quantize_input(x))),
    np.asarray(export.lower_qat(hard, v, x)(prog.quantize_input(x))),
  )
  assert not codes['d0/kernel'][:, 2].any()  # the pruned channel
  # The loaded program keeps the widths: written again, it packs the same.
  assert prog.layers[0].kernel_bits == [2, 7, 0, 3, 5, 8]
  again = str(tmp_path / 'again.int.safetensors')
  assert export.save_program(prog, again) == rep['program_bytes']
  manifest = export.read_artifact(again)[2]
  assert manifest['tensors']['d1/kernel']['bits'] == [3, 6, 2]
  # The file is the theoretical size plus the container (manifest, header).
  assert rep['program_bytes'] < rep['program_theoretical_bytes'] + 4096


def test_lowering_refuses_affine_kernels_by_name():
  x = jnp.asarray(np.random.RandomState(0).randn(8, 10), jnp.float32)
  rule = fracq.Rule(
    weight=fracq.TensorSpec(bits=4, range_method='minmax', symmetric=False),
    act=fracq.TensorSpec(bits=8),
  )
  qm = fracq.quantize(_Mlp(), [rule], x[:1], call_kwargs={'train': False})
  v = qm.calibrate(qm.init(jax.random.key(0), x), x)
  with pytest.raises(ValueError, match=r'd0: its kernel grid is affine'):
    export.lower_qat(qm, v, x)
  # The packed artifact stores the same kernels exactly.
  frozen = export.freeze(qm, v)
  fq = export.fake_quant_kernels(qm, v, x)
  for layer, fl in frozen.items():
    assert fl.affine
    np.testing.assert_array_equal(fl.dequantize(), fq[layer])
