"""Float byte-level language model on the standard-library corpus.

The corpus is the running Python's top-level standard-library ``.py``
files (no download; see fracq.data.text), every 10th file held out for
validation; every run logs and returns its size and SHA-256. Model: the
gpt_small decoder (4 pre-LN blocks, d_model 128, tied byte embeddings,
0.86M parameters), windows of 128 bytes, batch 32, AdamW.

Run:
  python launch.py --config=configs/lm_float.py --workdir=/tmp/lm_float

Expected: MEASURED_RESULT
Unigram baseline (the train split's byte frequencies, add-one smoothed):
UNIGRAM validation bits per byte. Variants: seed=N; steps=N; smoke (a tiny
model for a few steps, seconds).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, seed=0, steps=600)
  c = common.text_config(a.seed)
  c.num_train_steps = a.steps
  if a.smoke:
    common.apply_smoke(c, tiny_model='gpt_tiny')
    c.seq_len = 32
    c.eval_windows = 32
  return c
