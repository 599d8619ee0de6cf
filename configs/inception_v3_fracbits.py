"""FracBits on ImageNet Inception-V3 (299x299).

NNCF's FracBits port: 78.16% top-1 (-0.82, i.e. above float) at 1.51x
over INT8. Weights searched under a model-size budget (compression over
INT8), activations 8-bit; the aux head is trained with weight 0.4 as in
torchvision's recipe only when the model returns it (train mode). Like the
first conv and the classifier, the whole aux head (``AuxLogits/conv0``,
``AuxLogits/conv1``, ``AuxLogits/fc``) stays at 8 bits: it only serves
training and is dropped at inference, so the search spends no budget on it.
Recipe, initial bits and penalty units as in configs/common.py
(fracbits_imagenet).

Run:
  python launch.py --config=configs/inception_v3_fracbits.py \
      --workdir=/tmp/incfb --config.data_dir=DATA_DIR --config.init_from=/tmp/inc

Variants: compression=R, epochs=N, smoke (a tiny ResNet stands in for the
graph on 32x32 mock data; the full model's parameter count and forward are
covered by tests/models).
"""

from configs import common

# The auxiliary classifier's layers (fracq/models/inception.py, InceptionAux).
AUX_HEAD_PATTERN = r'^AuxLogits/'


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, compression=1.5, epochs=30.0)
  c = common.base_config()
  c.seed = a.seed
  common.fracbits_imagenet(
    c, model='inception_v3', compression=a.compression, epochs=a.epochs
  )
  c.image_size = 299
  c.quant.layers.fixed += '|' + AUX_HEAD_PATTERN
  if a.smoke:
    common.apply_smoke(c, tiny_model='resnet_tiny', image_size=32)
    c.half_precision = False
    c.quant.layers.fixed = r'^conv_init$|^fc$'
  return c
