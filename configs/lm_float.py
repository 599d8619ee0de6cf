"""Float byte-level language model on the standard-library corpus.

The corpus is the running Python's top-level standard-library ``.py``
files (no download; see fracq.data.text), every 10th file held out for
validation; every run logs and returns its size and SHA-256. Model: the
gpt_small decoder (4 pre-LN blocks, d_model 128, tied byte embeddings,
0.86M parameters), windows of 128 bytes, batch 32, AdamW.

Run:
  python launch.py --config=configs/lm_float.py --workdir=/tmp/lm_float

Expected (measured, seed 0, 600 steps, Python 3.11.7 stdlib: 4,698,388
bytes, SHA-256 926a59d9...6fac68): validation 2.50 bits per byte (loss
1.732 nats, next-byte accuracy 54.9%; on 512 evenly spaced windows, 65,491
predicted bytes; --config.eval_windows=0 evaluates the whole split), against 4.53 bits per byte for the
unigram baseline (the train split's byte frequencies, add-one smoothed;
``fracq.data.text.unigram_bits_per_byte``); 3.14 after 200 steps, 2.65
after 400. Time: 3 min 59 s wall on 2 idle CPU cores (peak memory 1.6
GB; the run is deterministic: the same figures on a busy machine took
17 min 39 s). Variants: seed=N; steps=N; smoke (a tiny
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
