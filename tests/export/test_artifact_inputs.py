"""The packed artifact describes the activation side too: every quantized
input's bits, sign and scale, readable back from the manifest."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fracq
from fracq import export
from fracq.interception import QuantizedModule


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Dense(6, name='d0')(x))
    return nn.Dense(3, name='d1')(x)


def _quantized_inputs(qm, v, x):
  """``{path: (input, quantized input)}`` as the model computes them."""
  seen = {}

  class Capture:
    def quantize_kernel(self, site, k):
      return qm.provider.quantize_kernel(site, k)

    def quantize_input(self, site, a):
      out = qm.provider.quantize_input(site, a)
      seen[site.path] = (np.asarray(a), np.asarray(out))
      return out

  QuantizedModule(qm.module, qm.rules, Capture(), on_unused='warn').apply(
    v, x, **qm.call_kwargs
  )
  return seen


def test_learned_activation_bits_are_in_the_manifest(tmp_path):
  x = jnp.asarray(np.random.RandomState(0).randn(16, 10), jnp.float32)
  rule = fracq.Rule(
    weight=fracq.FracBitsSpec(bits=4.0),
    act=fracq.FracBitsSpec(bits=6.0, bit_bounds=(2.0, 8.0)),
  )
  qm = fracq.quantize(
    _Mlp(),
    [rule],
    x[:1],
    budget=fracq.Budget(kind='bitops', uniform_bits=4),
    hard_assign_step=0,
    call_kwargs={'train': False},
  )
  v = qm.calibrate(qm.init(jax.random.key(0), x), x)
  hard = qm.for_step(0)
  v = hard.prepare(v)
  stats = jax.tree_util.tree_map(lambda s: s, v['quant_stats'])
  stats['d0']['input_hard_bits'] = jnp.asarray(5.0)
  stats['d1']['input_hard_bits'] = jnp.asarray(3.0)
  v = {**v, 'quant_stats': stats}
  path = str(tmp_path / 'model.fracq.safetensors')
  export.export_model(hard, v, path)
  _, _, manifest = export.read_artifact(path)
  inputs = manifest['metadata']['inputs']
  assert set(inputs) == {'d0', 'd1'}
  # d0 reads the (signed) data, d1 a ReLU output (unsigned).
  assert inputs['d0']['bits'] == 5 and inputs['d0']['signed']
  assert inputs['d1']['bits'] == 3 and not inputs['d1']['signed']
  # By hand: signed 5 bits -> [-15, 15] on [-r, r]; unsigned 3 bits -> [0, 7].
  assert (inputs['d0']['qmin'], inputs['d0']['qmax']) == (-15, 15)
  assert (inputs['d1']['qmin'], inputs['d1']['qmax']) == (0, 7)
  for layer, levels in (('d0', 15), ('d1', 7)):
    r = abs(float(v['quant'][layer]['input_range']))
    np.testing.assert_allclose(inputs[layer]['scale'], [r / levels], rtol=1e-6)
  # The manifest's grid reproduces the quantized inputs the model uses.
  for layer, (a, a_hat) in _quantized_inputs(hard, v, x).items():
    e = inputs[layer]
    scale = np.float32(e['scale'][0])
    codes = np.round(np.clip(a / scale, e['qmin'], e['qmax']))
    np.testing.assert_allclose(codes * scale, a_hat, rtol=1e-6, atol=1e-7)
  # The hard-assigned learned input bits lower to an integer program: its
  # teacher-forced check sees every layer read the model's own codes.
  prog = export.lower(hard, v, x)
  assert prog.input_range == (-15, 15)
  assert prog.layers[0].out_range == (0, 7)
  assert sorted(prog.verification.layers) == ['d0', 'd1']
  assert prog.verification.flipped_codes == 0
