"""HAWQ-style mixed precision on the byte-level LM: the baseline FracBits
is compared to.

From a trained float LM, per-layer Hessian traces (Hutchinson, next-byte
loss on training windows) and an ILP pick integer weight bits under the
same size budget as configs/lm_fracbits.py; the model is then fine-tuned
with uniform QAT at those bits with the schedule of configs/lm_uniform.py.

Run:
  python launch.py --config=configs/lm_float.py --workdir=/tmp/lm_float
  python launch.py --config=configs/lm_hawq.py:bits=3 \
      --workdir=/tmp/lm_hawq3 --config.init_from=/tmp/lm_float

Expected (experiments/results/lm_bits.md, 3 seeds): bits=4 2.46 bits per
byte (2.4599-2.4634), bits=3 2.47 (2.4685-2.4690), both below uniform QAT
by more than the seed range, with more bits in the first block (4-8) than
the last (2-4); bits=2 2.51 (every layer at 2 bits, the smallest
candidate); about 2 minutes a run on 2 idle CPU cores, search included. The bit allocation
table is in the log. Variants (arg): bits=K, seed=N,
steps=N, group=G, attn=B (attention matmuls at B bits, as in
configs/lm_uniform.py), smoke.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg, smoke=False, seed=0, bits=3.0, steps=150, group=0, attn=0
  )
  c = common.text_config(a.seed)
  common.text_quant(
    c,
    'hawq',
    steps=a.steps,
    group=a.group,
    attention=a.attn,
    budget=dict(uniform_bits=a.bits),
  )
  if a.smoke:
    common.apply_smoke(c, tiny_model='gpt_tiny')
    c.seq_len = 32
    c.eval_windows = 32
    c.quant.hawq.probes = 4
    c.quant.hawq.batches = 1
  return c
