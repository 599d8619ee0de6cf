"""Float ResNet-50 v1.5 on ImageNet (torchvision layout).

Run (imagenet2012 prepared by TFDS, or its tar files in
DATA_DIR/downloads/manual/):
  python launch.py --config=configs/imagenet_resnet50.py --workdir=/tmp/r50 \
      --config.data_dir=DATA_DIR

Expected: ~76.1% top-1 after 90 epochs (SGD nesterov 0.1 x batch/256,
5 warm-up epochs, cosine, wd 1e-4, label smoothing 0.1), as torchvision's
reference. On several GPUs/TPUs the global batch is split over all devices;
on several hosts start one process per host with --coordinator_address.
Smoke run: configs/imagenet_resnet50.py:smoke (tiny bottleneck ResNet on
64x64 crops; works on tfds.testing.mock_data).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, batch_size=1024)
  c = common.base_config()
  c.seed = a.seed
  c.dataset = 'imagenet2012'
  c.num_classes = 1000
  c.image_size = 224
  c.model = 'resnet50'
  c.batch_size = a.batch_size
  c.eval_batch_size = a.batch_size
  c.num_epochs = 90.0
  c.learning_rate = 0.1 * a.batch_size / 256
  c.warmup_epochs = 5.0
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1
  c.half_precision = True
  c.log_every_steps = 100
  c.eval_every_steps = 1250
  c.checkpoint_every_steps = 1250
  if a.smoke:
    common.apply_smoke(c, tiny_model='resnet_tiny_bottleneck', image_size=64)
    c.half_precision = False
    c.num_classes = 1000
  return c
