"""Float ResNet-20 on CIFAR-10 (He et al. 2016 recipe).

Run (CIFAR-10 prepared in TFDS format under DATA_DIR):
  python launch.py --config=configs/cifar10_resnet20.py --workdir=/tmp/r20 \
      --config.data_dir=DATA_DIR

Expected: ~91.5-92.5% test accuracy after 200 epochs (SGD 0.1, nesterov,
cosine, wd 1e-4, batch 128). Smoke run: configs/cifar10_resnet20.py:smoke
(tiny ResNet, a few steps; works on tfds.testing.mock_data).
Variant: dataset=cifar100.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, dataset='cifar10')
  c = common.base_config()
  c.seed = a.seed
  c.dataset = a.dataset
  c.num_classes = 100 if a.dataset == 'cifar100' else 10
  c.model = 'resnet20'
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 200.0
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  if a.smoke:
    common.apply_smoke(c, tiny_model='resnet_tiny')
  return c
