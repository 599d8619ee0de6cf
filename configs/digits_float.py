"""Float baseline on the embedded digits (the quickstart's reference).

Run:
  python launch.py --config=configs/digits_float.py --workdir=/tmp/digits_float

Expected: test accuracy ~99-100% (>= 97%) in well under 3 minutes on 2 CPU
cores (about 30 s); TensorBoard events and an orbax checkpoint in the
workdir. Smoke run (seconds): --config=configs/digits_float.py:smoke
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0)
  c = common.digits_config(a.seed)
  c.num_epochs = 30.0
  c.eval_every_steps = 110
  c.checkpoint_every_steps = 110
  if a.smoke:
    common.apply_smoke(c)
  return c
