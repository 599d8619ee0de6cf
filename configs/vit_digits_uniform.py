"""Uniform QAT of the digits ViT: every transformer kernel at K bits.

Fine-tunes a trained float ViT (configs/vit_digits_float.py) for 20 epochs
(220 steps of 128, AdamW 5e-4, cosine, no warmup; the float recipe's
dropout, label smoothing and weight decay): the attention and MLP kernels
at K-bit weights (LSQ, one step per output channel), 8-bit LSQ inputs of
every layer; the patch embedding and the classifier stay at 8 bits.

Run:
  python launch.py --config=configs/vit_digits_float.py --workdir=/tmp/vit_digits
  python launch.py --config=configs/vit_digits_uniform.py:bits=4 \
      --workdir=/tmp/vit_u4 --config.init_from=/tmp/vit_digits

Expected (measured, seed 0, from the float ViT at 96.1% that
configs/vit_digits_float.py trained in 51 s): bits=4 97.2% test accuracy,
integer weights 1.99x smaller than INT8, 40 s wall on 2 idle CPU cores.
Variants (arg): bits=K, seed=N, group=G (group-wise kernel
scales), smoke (a tiny ViT, seconds).
"""

from configs import common
from configs import vit_digits_float


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, bits=4, group=0)
  c = vit_digits_float.get_config(f'seed={a.seed}')
  common.vit_digits_finetune(c)
  common.digits_quant(c, 'uniform', weight_bits=float(a.bits))
  if a.group:
    c.quant.uniform.weight_granularity = 'group'
    c.quant.uniform.weight_group_size = a.group
  if a.smoke:
    common.apply_smoke(c, tiny_model='vit_tiny')
  return c
