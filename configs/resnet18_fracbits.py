"""FracBits on ImageNet ResNet-18 under a BitOPs budget (weights and
activations searched).

The FracBits paper states ResNet-18 budgets as the BitOPs of a uniform
k-bit model with the first conv at 8w/8a and the classifier weights at 8
bits: 34.70 G (4-bit) and 22.83 G (3-bit). This config computes that cost
from the recorded per-layer MACs (budget uniform_bits=K). Weight and
activation bits start at K + 0.5 (the budget's uniform-equivalent + 0.5);
the penalty is the paper's kappa = 1 per GBitOPs (quant.fracbits.penalty_unit=1e9).

Run:
  python launch.py --config=configs/resnet18_fracbits.py:bits=4 \
      --workdir=/tmp/r18fb --config.data_dir=DATA_DIR --config.init_from=/tmp/r18

Expected (paper, ImageNet top-1): 70.6 at 4-bit BitOPs, 69.6 at 3-bit.
Variants: bits=K, epochs=N, smoke.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=4.0, epochs=30.0)
  c = common.base_config()
  c.seed = a.seed
  common.fracbits_imagenet(
    c,
    model='resnet18',
    budget_kind='bitops',
    uniform_bits=a.bits,
    learn_acts=True,
    epochs=a.epochs,
  )
  if a.smoke:
    common.apply_smoke(c, tiny_model='resnet_tiny', image_size=32)
    c.half_precision = False
  return c
