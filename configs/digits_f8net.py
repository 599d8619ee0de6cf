"""F8Net on the embedded digits: every conv and the classifier in 8-bit
fixed point (power-of-two scales), BatchNorm folded, formats from statistics.

Trained from scratch with the digits recipe (the fixed-point quantizers are
on from step 0). The exported integer-only model (fracq.export.integer_model)
reproduces this model's eval predictions exactly.

Run:
  python launch.py --config=configs/digits_f8net.py --workdir=/tmp/df8

Expected: within 0.5 points of the float model (~99.4-100%). Variants:
seed=N; weights=grid|std (weight FL rule); acts=grid|std; channel=True (one
weight FL per output channel); pact=True (fixed-point PACT: learned clips
folded into the producing conv); smoke.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    smoke=False,
    seed=0,
    weights='std',
    acts='std',
    channel=False,
    pact=False,
  )
  c = common.digits_config(a.seed)
  c.quant.method = 'f8net'
  f8 = c.quant.f8net
  f8.weight_format = a.weights
  f8.act_format = a.acts
  f8.weight_granularity = 'channel' if a.channel else 'layer'
  f8.pact = a.pact
  if a.smoke:
    common.apply_smoke(c)
  return c
