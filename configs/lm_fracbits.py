"""FracBits mixed precision on the byte-level LM, under a size budget.

Fine-tunes a trained float LM (configs/lm_float.py) with the schedule of
configs/lm_uniform.py (150 steps, AdamW 5e-4 for the weights): every
attention and MLP kernel learns a fractional bit-width under the size of a
uniform K-bit model (byte embedding / tied head at 8 bits per row, 8-bit
LSQ inputs); the bits start at the budget + 0.5 and are trained by SGD
(lr 0.05, nesterov 0.9, the weights' cosine schedule); penalty
``|cost - target| / target``; hard assignment at 80% of the steps, then
integer fine-tuning.

Run:
  python launch.py --config=configs/lm_float.py --workdir=/tmp/lm_float
  python launch.py --config=configs/lm_fracbits.py:bits=3 \
      --workdir=/tmp/lm_fb3 --config.init_from=/tmp/lm_float

Expected (experiments/results/lm_bits.md, 3 seeds): bits=4 2.46 bits per
byte (2.4620-2.4629), every layer rounded to 4 bits; bits=3 2.47 bits per
byte (2.4713-2.4748), every layer rounded to 3 bits (learned: about 3.4 for
attention, 3.0 for MLP kernels before hard assignment, a spread under the
one bit that a non-uniform rounding needs at this budget); bits=3,bitlr=0.5
2.48 (2.4756-2.4796), again 3 bits everywhere; bits=2 2.52
(2.5230-2.5262); about 80 s a run on 2 idle CPU cores. Per-layer bit
tables (fractional at the hard assignment, integer at the end) in the log
and bits_step*.{txt,json,png} in the workdir.
Variants (arg): bits=K, seed=N, steps=N, group=G, init=D (bits start at
the budget + D; the authors' D is 0.5), bitlr=L (the bits' SGD learning
rate, 0.05 by default), bitops (a BitOPs budget, input bits
learned too), attn=B (attention matmuls at B fixed bits, not counted in
the budget; as in configs/lm_uniform.py), smoke.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    smoke=False,
    seed=0,
    bits=3.0,
    steps=150,
    group=0,
    init=0.5,
    bitlr=0.05,
    bitops=False,
    attn=0,
  )
  c = common.text_config(a.seed)
  common.text_quant(
    c,
    'fracbits',
    steps=a.steps,
    group=a.group,
    attention=a.attn,
    budget=dict(uniform_bits=a.bits),
    init_bits=f'budget+{a.init}',
    weight_bit_bounds=(2.0, 8.0),
    learn_weight_bits=True,
    hard_assign_fraction=0.8,
  )
  c.bits_optimizer = 'sgd'
  c.bits_learning_rate = float(a.bitlr)
  if a.bitops:
    c.quant.budget.kind = 'bitops'
    c.quant.fracbits.learn_act_bits = True
  if a.smoke:
    common.apply_smoke(c, tiny_model='gpt_tiny')
    c.seq_len = 32
    c.eval_windows = 32
  return c
