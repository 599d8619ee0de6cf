"""F8Net on ImageNet: ResNet-18/50 or MobileNet-V2, 8-bit fixed point.

Two recipes:
* ``recipe=finetune`` (default): from a trained float model
  (``--config.init_from``), 20 epochs of F8Net QAT, SGD nesterov
  0.01 x batch/256, cosine, wd 4e-5 on kernels only — a short fracq recipe,
  not the paper's;
* ``recipe=train``: from scratch with the float schedule (90 epochs, lr 0.1 x
  batch/256, 5 warm-up epochs, wd 1e-4 / 4e-5 for MobileNet-V2, label
  smoothing 0.1), quantizers on from step 0 as in the paper.

Every Conv/Dense and its BatchNorm are folded and quantized; residual adds
stay in the simulated (fake-quantized) domain: the integer-only lowering of
fracq covers chain models (see fracq/export/integer_model.py), so these
configs export the packed weights only.

Run:
  python launch.py --config=configs/f8net_imagenet.py:model=resnet18 \
      --workdir=/tmp/r18f8 --config.data_dir=DATA_DIR --config.init_from=/tmp/r18

Published (F8Net, ImageNet top-1, float / 8-bit fixed point): ResNet-18
70.3 / 71.0, ResNet-50b 77.6 / 77.6, MobileNet-V2b 72.7 / 72.6.
Variants: model=resnet18|resnet50|mobilenet_v2, recipe=finetune|train,
epochs=N, batch_size=N, pact=True (fixed-point PACT clips on the ReLU
links inside the ResNet blocks; MobileNet-V2 uses ReLU6, which has no such
link, and F8Net refuses pact=True there), smoke.
"""

from configs import common

_SMOKE_MODEL = {
  'resnet18': 'resnet_tiny',
  'resnet50': 'resnet_tiny_bottleneck',
  'mobilenet_v2': 'mobilenet_v2_tiny',
}


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    smoke=False,
    seed=0,
    model='resnet18',
    recipe='finetune',
    epochs=0.0,
    batch_size=256,
    pact=False,
  )
  if a.model not in _SMOKE_MODEL:
    raise ValueError(f'model={a.model!r}: choose one of {list(_SMOKE_MODEL)}.')
  if a.recipe not in ('finetune', 'train'):
    raise ValueError(f"recipe={a.recipe!r}: use 'finetune' or 'train'.")
  c = common.base_config()
  c.seed = a.seed
  c.dataset = 'imagenet2012'
  c.num_classes = 1000
  c.image_size = 224
  c.model = a.model
  c.batch_size = a.batch_size
  c.eval_batch_size = a.batch_size
  c.half_precision = True
  c.decay_pattern = r'^params/.*kernel$'
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  if a.recipe == 'finetune':
    c.num_epochs = a.epochs or 20.0
    c.learning_rate = 0.01 * a.batch_size / 256
    c.weight_decay = 4e-5
  else:
    c.num_epochs = a.epochs or 90.0
    c.learning_rate = 0.1 * a.batch_size / 256
    c.warmup_epochs = 5.0
    c.weight_decay = 4e-5 if a.model == 'mobilenet_v2' else 1e-4
    c.label_smoothing = 0.1
  c.quant.method = 'f8net'
  c.quant.f8net.pact = a.pact
  if a.smoke:
    common.apply_smoke(c, tiny_model=_SMOKE_MODEL[a.model], image_size=32)
    c.half_precision = False
  return c
