"""HAWQ-style mixed precision on digits: the baseline FracBits is compared to.

From a trained float model, per-layer Hessian traces (Hutchinson) and an ILP
pick integer weight bits under the same size budget as
configs/digits_fracbits.py (uniform K-bit equivalent, first conv and
classifier at 8 bits); the model is then fine-tuned with uniform QAT at
those bits, with the same schedule.

Run:
  python launch.py --config=configs/digits_float.py --workdir=/tmp/df
  python launch.py --config=configs/digits_hawq.py --workdir=/tmp/dh \
      --config.init_from=/tmp/df

Expected: ~99-100% test accuracy at the 3-bit budget; the bit allocation
table is in the log. Variants: bits=K, seed=N, smoke.
"""

from configs import common
from fracq.models import default_fixed_layers


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=3.0)
  c = common.base_config()
  c.seed = a.seed
  c.dataset = 'digits'
  c.num_classes = 10
  c.model = 'digits_cnn'
  c.batch_size = 128
  c.num_epochs = 40.0
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.log_every_steps = 55
  c.eval_every_steps = 220
  c.checkpoint_every_steps = 220
  q = c.quant
  q.method = 'hawq'
  q.fixed_layers = default_fixed_layers('digits_cnn')
  q.weight_range = 'lsq'
  q.act_range = 'lsq'
  q.weight_bits = a.bits + 0.5
  q.budget_uniform_bits = a.bits
  if a.smoke:
    common.apply_smoke(c)
    q.hawq_probes = 4
    q.hawq_batches = 1
  return c
