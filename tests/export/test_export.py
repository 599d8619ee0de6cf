"""Freeze + pack a FracBits model: exact kernels, real size, corruption."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export
from fracq import models
from fracq.data import digits
from fracq.train import quant_config as mcfg


def _hard_digits_model(per_channel=False, seed=0):
  x = jnp.asarray(digits.load_digits_split()[0][:32])
  rules = [
    fracq.fixed_bits(models.default_fixed_layers('digits_cnn')),
    fracq.Rule(
      weight=fracq.FracBitsSpec(
        bits=3.5,
        granularity='channel',
        bits_per_channel=per_channel,
      ),
      act=fracq.TensorSpec(bits=8),
    ),
  ]
  qm = fracq.quantize(
    models.get_model('digits_cnn'),
    rules,
    x[:1],
    budget=fracq.Budget(kind='size', uniform_bits=3),
    hard_assign_step=0,
    call_kwargs={'train': False},
  )
  v = qm.calibrate(qm.init(jax.random.key(seed), x), x)
  rng = np.random.RandomState(seed)
  for p in ('conv1', 'conv2', 'conv3', 'conv4'):
    b = v['quant'][p]['kernel_bits']
    v['quant'][p]['kernel_bits'] = jnp.asarray(
      rng.uniform(2.0, 5.0, size=b.shape), jnp.float32
    )
  hard = qm.for_step(0)
  return hard, hard.prepare(v), x


@pytest.mark.parametrize('per_channel', [False, True])
def test_packed_kernels_equal_fake_quant_and_size_is_real(
  per_channel, tmp_path
):
  hard, v, x = _hard_digits_model(per_channel)
  path = str(tmp_path / 'model.fracq.safetensors')
  rep = export.export_model(hard, v, path)
  codes, floats, manifest = export.read_artifact(path)
  deq = export.dequantized_kernels(codes, floats, manifest)
  fq = export.fake_quant_kernels(hard, v, x)
  assert set(deq) == set(fq) == set(hard.facts)
  for layer in fq:
    np.testing.assert_allclose(deq[layer], fq[layer], rtol=1e-6, atol=1e-7)
  assert abs(rep.overhead) < 0.02, rep.format()
  assert rep.artifact_bytes == os.path.getsize(path)
  # Integer cost of the model == the packed kernels' bits.
  assert rep.mean_kernel_bits * rep.kernel_params == pytest.approx(
    hard.metrics(v)['cost_integer']
  )
  assert rep.int8_artifact_bytes > rep.artifact_bytes
  assert rep.float32_bytes > rep.int8_artifact_bytes
  assert 'actual / theoretical' in rep.format()


def test_refuses_overwrite_and_detects_corruption(tmp_path):
  hard, v, _ = _hard_digits_model()
  path = str(tmp_path / 'm.safetensors')
  export.export_model(hard, v, path)
  with pytest.raises(FileExistsError, match='overwrite=True'):
    export.export_model(hard, v, path)
  blob = open(path, 'rb').read()
  # Flip one byte near the end (inside tensor data).
  bad = bytearray(blob)
  bad[-5] ^= 0xFF
  p2 = str(tmp_path / 'flipped')
  open(p2, 'wb').write(bytes(bad))
  with pytest.raises(export.ArtifactError, match='checksum|corrupt'):
    export.read_artifact(p2)
  p3 = str(tmp_path / 'truncated')
  open(p3, 'wb').write(blob[: len(blob) // 2])
  with pytest.raises(export.ArtifactError, match='truncated or corrupt'):
    export.read_artifact(p3)
  with pytest.raises(export.ArtifactError, match='No artifact'):
    export.read_artifact(str(tmp_path / 'missing'))


def test_resnet50_random_bits_size_accounting(tmp_path):
  q = mcfg.default_quant_config('fracbits')
  q.layers.fixed = models.default_fixed_layers('resnet50')
  q.fracbits.weight_bits = 4.5
  q.fracbits.hard_assign_step = 0
  q.budget.uniform_bits = 4.0
  module = models.get_model('resnet50')
  qm = mcfg.build(
    q,
    module,
    jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
    total_steps=1,
  )
  shapes = jax.eval_shape(
    lambda: qm.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  )
  rng = np.random.RandomState(0)
  v = jax.tree_util.tree_map(
    lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.05, shapes
  )
  for path, f in qm.facts.items():
    if f.rule == 'default':
      node = v['quant']
      for p in path.split('/'):
        node = node[p]
      node['kernel_range'] = np.abs(node['kernel_range']) + 0.1
      node['kernel_bits'] = np.float32(rng.randint(2, 9))
  hard = qm.for_step(0)
  v = {
    **v,
    'quant_stats': jax.tree_util.tree_map(
      lambda a: np.full_like(a, -1.0), v['quant_stats']
    ),
  }
  v['quant_stats'] = jax.tree_util.tree_map(lambda a: a, v['quant_stats'])
  # Random integer bits, frozen as hard assignment would freeze them.
  from fracq.methods import fracbits

  v['quant_stats'] = fracbits.write_hard_bits(v['quant_stats'], v['quant'])
  rep = export.export_model(hard, v, str(tmp_path / 'r50'))
  assert rep.kernel_params > 25_000_000
  assert abs(rep.overhead) < 0.02, rep.format()


def test_launch_export_flag_writes_artifact_and_report(tmp_path):
  import importlib
  from fracq.train import train as tr

  c = importlib.import_module('configs.digits_fracbits').get_config('smoke')
  c.export = True
  m = tr.train_and_evaluate(c, str(tmp_path))
  assert (tmp_path / 'model.fracq.safetensors').exists()
  assert 'actual / theoretical' in (tmp_path / 'size_report.txt').read_text()
  assert abs(m['artifact_over_theoretical'] - 1) < 0.02
  codes, floats, man = export.read_artifact(
    str(tmp_path / 'model.fracq.safetensors')
  )
  assert man['metadata']['method'] == 'fracbits'
