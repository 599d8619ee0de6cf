"""Float baseline on the embedded digits (the quickstart's reference).

Run:
  python launch.py --config=configs/digits_float.py --workdir=/tmp/digits_float

Expected: test accuracy ~98% (>= 97%) in well under 3 minutes on 2 CPU cores;
TensorBoard events and an orbax checkpoint in the workdir.
Smoke run (seconds): --config=configs/digits_float.py:smoke
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0)
  c = common.base_config()
  c.seed = a.seed
  c.dataset = 'digits'
  c.num_classes = 10
  c.model = 'digits_cnn'
  c.batch_size = 128
  c.num_epochs = 30.0
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.log_every_steps = 50
  c.eval_every_steps = 110
  c.checkpoint_every_steps = 110
  if a.smoke:
    common.apply_smoke(c)
  return c
