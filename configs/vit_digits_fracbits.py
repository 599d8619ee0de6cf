"""FracBits mixed precision on the digits ViT, under a size budget.

Fine-tunes a trained float ViT (configs/vit_digits_float.py) with the
schedule of configs/vit_digits_uniform.py: every attention and MLP kernel
learns a fractional bit-width under the size of a uniform K-bit model
(patch embedding and classifier at 8 bits, 8-bit LSQ inputs); bits start
at the budget + 0.5, trained by SGD (lr 0.05, nesterov 0.9, cosine); hard
assignment at 80% of the steps.

Run:
  python launch.py --config=configs/vit_digits_float.py --workdir=/tmp/vit_digits
  python launch.py --config=configs/vit_digits_fracbits.py:bits=3 \
      --workdir=/tmp/vit_fb3 --config.init_from=/tmp/vit_digits

Expected (measured, seed 0, from the float ViT at 96.1%): bits=3 97.2%
test accuracy, integer weights 2.64x smaller than INT8, 50 s wall on 2 idle
CPU cores; every kernel rounded to 3 bits (learned about 3.2 for attention
and 2.8 for the MLP kernels before hard assignment: the size penalty's
allocation, see experiments/results/lm_bits.md). Per-layer bit tables in
the log and bits_step*.png in the workdir.
Variants (arg): bits=K, seed=N, group=G, smoke.
"""

from configs import common
from configs import vit_digits_float


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=3.0, group=0)
  c = vit_digits_float.get_config(f'seed={a.seed}')
  common.vit_digits_finetune(c)
  common.digits_quant(
    c,
    'fracbits',
    budget=dict(uniform_bits=a.bits),
    init_bits='budget+0.5',
    weight_bit_bounds=(2.0, 8.0),
    learn_weight_bits=True,
    hard_assign_fraction=0.8,
  )
  if a.group:
    c.quant.fracbits.weight_granularity = 'group'
    c.quant.fracbits.weight_group_size = a.group
  c.bits_optimizer = 'sgd'
  c.bits_learning_rate = 0.05
  if a.smoke:
    common.apply_smoke(c, tiny_model='vit_tiny')
  return c
