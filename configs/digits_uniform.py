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


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=4, act_bits=8)
  c = common.digits_config(a.seed)
  common.digits_quant(
    c, 'uniform', weight_bits=float(a.bits), act_bits=float(a.act_bits)
  )
  if a.smoke:
    common.apply_smoke(c)
  return c
