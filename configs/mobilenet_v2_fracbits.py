"""FracBits on MobileNet-V2: ImageNet (default) or CIFAR-100 32x32.

NNCF's FracBits port: MobileNet-V2 ImageNet 71.19% (drop 0.68) at 1.53x
over INT8; CIFAR-100 67.26% (drop 0.45) at 1.5x. Same budget form here
(compression over the INT8 model), weights searched, activations 8-bit.
Bits start at the budget's uniform-equivalent + 0.5 (about 3.77 + 0.5 at
1.5x over INT8, resolved from the cost model and logged); the penalty is
the paper's kappa = 1 per MB of weights (quant.fracbits.penalty_unit=8e6).

Run:
  python launch.py --config=configs/mobilenet_v2_fracbits.py \
      --workdir=/tmp/mbv2fb --config.data_dir=DATA_DIR --config.init_from=/tmp/mbv2
  python launch.py --config=configs/mobilenet_v2_fracbits.py:dataset=cifar100 \
      --workdir=/tmp/mbv2c100 --config.data_dir=DATA_DIR --config.init_from=...

Variants: dataset=cifar100, compression=R, epochs=N, smoke.
"""

from configs import common
from fracq.models import default_fixed_layers


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    smoke=False,
    seed=0,
    compression=1.5,
    dataset='imagenet2012',
    epochs=30.0,
  )
  c = common.base_config()
  c.seed = a.seed
  common.fracbits_imagenet(
    c, model='mobilenet_v2', compression=a.compression, epochs=a.epochs
  )
  if a.dataset == 'cifar100':
    c.dataset = 'cifar100'
    c.model = 'mobilenet_v2_cifar'
    c.num_classes = 100
    c.batch_size = 128
    c.eval_batch_size = 500
    c.learning_rate = 0.01
    c.half_precision = False
    c.quant.layers.fixed = default_fixed_layers('mobilenet_v2_cifar')
  if a.smoke:
    common.apply_smoke(c, tiny_model='mobilenet_v2_tiny', image_size=32)
    c.half_precision = False
    c.num_classes = 100 if a.dataset == 'cifar100' else 1000
  return c
