"""Prune -> cluster -> QAT on the embedded digits (PQAT / CQAT / PCQAT).

Fine-tunes a trained float digits model (``--config.init_from``). At
calibration the kernels of every conv and the classifier are pruned
one-shot by magnitude to ``sparsity`` and/or clustered by k-means to
``clusters`` values (the exact zero is one of them for PCQAT); training then
keeps both exactly while the model is quantized. ``quant=uniform`` (default:
8-bit LSQ weights, per tensor, so a layer's quantized kernel takes at most
``clusters`` values), ``quant=fracbits`` (learned bits under a size budget of
``bits``, never below log2(clusters)) or ``quant=none`` (float pruning /
clustering only, the "pruned" and "clustered" baselines).

Run:
  python launch.py --config=configs/digits_float.py --workdir=/tmp/dfl
  python launch.py --config=configs/digits_pcqat.py --config.init_from=/tmp/dfl \\
      --workdir=/tmp/dpc --config.export=True

Args: ``mode=pcqat|pqat|cqat|qat``, ``quant=uniform|fracbits|none``,
``bits=K`` (uniform weight bits / FracBits budget), ``sparsity=S``,
``clusters=K``, ``grad=sum|mean``, ``epochs=N``, ``seed=N``, ``smoke``.
"""

from configs import common

MODES = {
  'qat': '',
  'pqat': 'prune',
  'cqat': 'cluster',
  'pcqat': 'prune_cluster',
}


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    smoke=False,
    seed=0,
    mode='pcqat',
    quant='uniform',
    bits=8,
    act_bits=8,
    sparsity=0.5,
    clusters=16,
    grad='sum',
    epochs=10,
  )
  if a.mode not in MODES:
    raise ValueError(f'mode={a.mode!r}: choose one of {tuple(MODES)}.')
  if a.quant not in ('uniform', 'fracbits', 'none'):
    raise ValueError(
      f"quant={a.quant!r}: choose 'uniform', 'fracbits' or 'none'."
    )
  if a.quant == 'none' and a.mode == 'qat':
    raise ValueError(
      'mode=qat with quant=none is the float model; use '
      'configs/digits_float.py.'
    )
  c = common.digits_config(a.seed)
  if a.quant == 'none':
    c.quant.method = 'none'
  elif a.quant == 'fracbits':
    common.digits_quant(
      c,
      'fracbits',
      budget=dict(uniform_bits=float(a.bits)),
      init_bits='budget+0.5',
      act_bits=float(a.act_bits),
    )
  else:
    common.digits_quant(
      c, 'uniform', weight_bits=float(a.bits), act_bits=float(a.act_bits)
    )
  if a.quant != 'none':
    c.quant[a.quant].weight_granularity = 'tensor'
  p = c.quant.preserve
  p.mode = MODES[a.mode]
  p.sparsity = float(a.sparsity) if 'prune' in p.mode else -1.0
  p.clusters = int(a.clusters)
  p.cluster_grad = a.grad
  # Fine-tuning from a trained float model: a smaller learning rate.
  c.learning_rate = 0.02
  c.num_epochs = float(a.epochs)
  if a.smoke:
    common.apply_smoke(c)
  return c
