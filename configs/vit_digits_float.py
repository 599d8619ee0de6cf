"""Float Vision Transformer on the embedded digits.

The vit_digits model: 2x2 patches of the 8x8 images (16 tokens + a class
token), 4 pre-LN blocks of width 64, 0.14M parameters; 60 epochs (660
steps of 128) of AdamW 2e-3 with warmup and cosine decay, weight decay 0.1,
dropout 0.1, label smoothing 0.1; the digits data and split of
configs/digits_float.py.

Run:
  python launch.py --config=configs/vit_digits_float.py --workdir=/tmp/vit_digits

Expected: test accuracy about 96% (measured 96.1%, seed 0; the digits CNN
of configs/digits_float.py reaches ~99% on these 1,437 images, where a ViT
lacks the convolution's locality prior). Time: 5 min 47 s wall measured on
2 CPU cores shared with other jobs (load average ~12), for 1 min 27 s of CPU
time (user + sys), so about 1-2 minutes on 2 idle cores. Variants: seed=N; dropout=P; pool=mean; smoke (a tiny
ViT for a few steps, seconds).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, dropout=0.1, pool='cls')
  c = common.digits_config(a.seed)
  c.model = 'vit_digits'
  # 1,437 training images and no augmentation: a ViT overfits without
  # dropout and label smoothing.
  c.model_kwargs.dropout_rate = a.dropout
  c.model_kwargs.pool = a.pool
  c.label_smoothing = 0.1
  c.num_epochs = 60.0
  c.optimizer = 'adamw'
  c.learning_rate = 2e-3
  c.warmup_epochs = 3.0
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.log_every_steps = 55
  c.eval_every_steps = 220
  c.checkpoint_every_steps = 220
  if a.smoke:
    common.apply_smoke(c, tiny_model='vit_tiny')
  return c
