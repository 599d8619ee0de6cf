"""FracBits on ImageNet ResNet-50: the user's entry point.

NNCF's FracBits port reports 76.12% top-1 (drop 0.04) at a 1.54x
model-size compression over INT8 (8x V100, mean of 5). This config states
the same kind of budget (compression over the INT8 model) and the authors'
recipe (configs/common.py: fracbits_imagenet): weights learn fractional
bits, activations 8-bit PACT, first conv and classifier fixed at 8 bits.
Bits start at the budget's uniform-equivalent + 0.5 (about 5.1 + 0.5 at
1.5x over INT8, resolved from the cost model and logged) and the penalty is
the paper's kappa = 1 per MB of weights (quant.fracbits.penalty_unit=8e6).

Run (start from a float ResNet-50 trained with configs/imagenet_resnet50.py
or imported from torchvision weights with
``python -m fracq.tools.import_weights --model resnet50 --weights
resnet50-11ad3fa6.pth --workdir /tmp/r50``):
  python launch.py --config=configs/resnet50_fracbits.py --workdir=/tmp/r50fb \
      --config.data_dir=DATA_DIR --config.init_from=/tmp/r50

Variants: compression=R (default 1.5), bits=K (uniform-equivalent budget
instead), epochs=N, smoke (tiny bottleneck ResNet on 64x64 mock data).
Expected: within ~0.5 point of the float model at 1.5x over INT8 (NNCF's
figure above); the integer compression is printed at every evaluation.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg, smoke=False, seed=0, compression=1.5, bits=0.0, epochs=30.0
  )
  c = common.base_config()
  c.seed = a.seed
  common.fracbits_imagenet(
    c,
    model='resnet50',
    uniform_bits=a.bits or None,
    compression=None if a.bits else a.compression,
    epochs=a.epochs,
  )
  if a.smoke:
    common.apply_smoke(c, tiny_model='resnet_tiny_bottleneck', image_size=64)
    c.half_precision = False
    c.quant.layers.fixed = r'^conv_init$|^fc$'
  return c
