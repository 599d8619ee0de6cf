"""Uniform QAT on the embedded digits: every conv at K-bit weights.

The first conv and the classifier stay at 8 bits, activations at 8 bits,
LSQ learned steps (per-channel for weights) — the same range method and
fixed layers as configs/digits_fracbits.py, so the two compare at equal
integer model size.

Run:
  python launch.py --config=configs/digits_uniform.py:bits=3 --workdir=/tmp/du3

Expected: ~99-100% test accuracy at 3 bits; variants bits=2,4,8; seed=N;
act_bits=K; smoke.
"""

from configs import common
from fracq.models import default_fixed_layers


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=4, act_bits=8)
  c = common.base_config()
  c.seed = a.seed
  c.dataset = 'digits'
  c.num_classes = 10
  c.model = 'digits_cnn'
  c.batch_size = 128
  c.num_epochs = 40.0
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.log_every_steps = 55
  c.eval_every_steps = 220
  c.checkpoint_every_steps = 220
  q = c.quant
  q.method = 'uniform'
  q.fixed_layers = default_fixed_layers('digits_cnn')
  q.weight_range = 'lsq'
  q.act_range = 'lsq'
  q.weight_bits = float(a.bits)
  q.act_bits = float(a.act_bits)
  if a.smoke:
    common.apply_smoke(c)
  return c
