"""Uniform QAT of the byte-level LM: every Dense kernel at K bits.

Fine-tunes a trained float LM (configs/lm_float.py) for 150 steps (AdamW
5e-4, cosine): every attention and MLP kernel at K-bit weights (LSQ, one
step per output channel), 8-bit LSQ inputs; the byte embedding, which is
also the tied output head, stays at 8 bits per row (weight-only). The same
ranges, fixed layers and schedule as configs/lm_fracbits.py and
configs/lm_hawq.py, so the three compare at equal integer size.

Run:
  python launch.py --config=configs/lm_float.py --workdir=/tmp/lm_float
  python launch.py --config=configs/lm_uniform.py:bits=3 \
      --workdir=/tmp/lm_u3 --config.init_from=/tmp/lm_float

Expected (experiments/results/lm_bits.md, 3 seeds from the float start at
2.4994 validation bits per byte): bits=8 2.46 bits per byte (2.4560-2.4605),
bits=4 2.47 (2.4644-2.4653), bits=3 2.47 (2.4709-2.4743), bits=2 2.51
(2.5083-2.5202); about 70 s a run on 2 idle CPU cores. Variants (arg):
bits=K (2..8), seed=N, steps=N, group=G (group-wise kernel scales, G input
features per scale), attn=B (the attention matmuls q.k and probs.v at B
bits, running min/max ranges; 0: float; measured at seed 0, bits=3:
attn=8 2.4730 bits per byte, attn=4 2.5721), smoke (a tiny model,
seconds).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg, smoke=False, seed=0, bits=4, steps=150, group=0, attn=0
  )
  c = common.text_config(a.seed)
  common.text_quant(
    c,
    'uniform',
    steps=a.steps,
    group=a.group,
    attention=a.attn,
    weight_bits=float(a.bits),
  )
  if a.smoke:
    common.apply_smoke(c, tiny_model='gpt_tiny')
    c.seq_len = 32
    c.eval_windows = 32
  return c
