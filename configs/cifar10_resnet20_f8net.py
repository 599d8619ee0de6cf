"""F8Net on CIFAR-10 ResNet-20: 8-bit fixed point, BatchNorm folded.

Recipes: ``recipe=finetune`` (default; from ``--config.init_from`` of
configs/cifar10_resnet20.py, 30 epochs, SGD nesterov 0.01, cosine, wd 1e-4)
or ``recipe=train`` (from scratch, the float 200-epoch schedule).

Run:
  python launch.py --config=configs/cifar10_resnet20_f8net.py \
      --workdir=/tmp/r20f8 --config.data_dir=DATA_DIR --config.init_from=/tmp/r20

Expected: within a few tenths of the float model (~91.5-92.5%); not
measured here (no CIFAR-10 download on this machine). Variants:
recipe=train, dataset=cifar100, pact=True (fixed-point PACT clips inside the
blocks, conv1 -> conv2), smoke.
"""

from configs import cifar10_resnet20
from configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg, smoke=False, seed=0, recipe='finetune', dataset='cifar10', pact=False
  )
  if a.recipe not in ('finetune', 'train'):
    raise ValueError(f"recipe={a.recipe!r}: use 'finetune' or 'train'.")
  c = cifar10_resnet20.get_config(
    f'seed={a.seed},dataset={a.dataset}' + (',smoke=True' if a.smoke else '')
  )
  if a.recipe == 'finetune' and not a.smoke:
    c.num_epochs = 30.0
    c.learning_rate = 0.01
  c.quant.method = 'f8net'
  c.quant.f8net.pact = a.pact
  return c
