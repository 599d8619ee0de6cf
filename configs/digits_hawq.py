"""HAWQ-style mixed precision on digits: the baseline FracBits is compared to.

From a trained float model, per-layer Hessian traces (Hutchinson) and an ILP
pick integer weight bits under the same size budget as
configs/digits_fracbits.py (uniform K-bit equivalent, first conv and
classifier at 8 bits); the model is then fine-tuned with uniform QAT at
those bits, with the same schedule.

Run:
  python launch.py --config=configs/digits_float.py --workdir=/tmp/df
  python launch.py --config=configs/digits_hawq.py --workdir=/tmp/dh \
      --config.init_from=/tmp/df

Expected: ~99-100% test accuracy at the 3-bit budget; the bit allocation
table is in the log. Variants: bits=K, seed=N, smoke.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=3.0)
  c = common.digits_config(a.seed)
  common.digits_quant(c, 'hawq', budget=dict(uniform_bits=a.bits))
  if a.smoke:
    common.apply_smoke(c)
    c.quant.hawq.probes = 4
    c.quant.hawq.batches = 1
  return c
