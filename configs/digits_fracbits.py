"""FracBits mixed precision on the embedded digits: the README's quickstart.

Every conv learns a fractional weight bit-width under a model-size budget
equal to a uniform 3-bit model whose first conv and classifier stay at 8
bits (about 2.4x smaller than INT8); activations are 8-bit. At 80% of
training the bits are rounded (hard assignment, global offset bisected to
come as close to the budget as possible without exceeding it) and frozen; the rest fine-tunes at integer bits.
Learned bits start at the budget's uniform-equivalent bits + 0.5 and are
trained by SGD with the weights' schedule (``bits_optimizer``), as the
authors do; the penalty is relative to the target (``penalty_unit`` unset).

Run:
  python launch.py --config=configs/digits_fracbits.py --workdir=/tmp/digits_fb

Expected: test accuracy within 1 point of the float model (~98-100%),
integer compression over INT8 >= 2.0; a per-layer bit table in the log and
bits_step*.png in the workdir. About a minute on 2 CPU cores.

Variants (arg): seed=N, bits=K (the uniform-equivalent budget), bitops (a
BitOPs budget, activations searched too), smoke.
Starting from a trained float model (the paper's recipe):
  --config.init_from=/tmp/digits_float
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=3.0, bitops=False)
  c = common.digits_config(a.seed)
  # Authors: initial bits = the budget's uniform-equivalent bits + 0.5,
  # resolved from the cost model when the model is wrapped.
  common.digits_quant(
    c,
    'fracbits',
    budget=dict(uniform_bits=a.bits),
    init_bits='budget+0.5',
    weight_bit_bounds=(2.0, 8.0),
    learn_weight_bits=True,
    hard_assign_fraction=0.8,
  )
  if a.bitops:
    c.quant.budget.kind = 'bitops'
    c.quant.fracbits.learn_act_bits = True
  if a.smoke:
    common.apply_smoke(c)
  return c
