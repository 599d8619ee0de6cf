"""CIFAR-10 ResNet-20: prune -> cluster -> PCQAT -> export, one stage a run.

Each stage fine-tunes the previous stage's workdir (``--config.init_from``);
the pruned / clustered kernels are handed on as that run computed them
(exact zeros, centroid values), and the next stage keeps them exactly.

  stage=prune    float, gradual magnitude pruning (polynomial decay) from
                 the float model to ``sparsity`` over the first 2/3 of
                 30 epochs (SGD nesterov 0.01, cosine, wd 1e-4).
  stage=cluster  float, sparsity-preserving k-means clustering to
                 ``clusters`` values (the zero is one of them), 10 epochs at
                 0.005, the centroids trained.
  stage=pcqat    PCQAT: ``quant=uniform`` (w``bits`` a8, per-tensor LSQ) or
                 ``quant=fracbits`` (learned bits under a ``bits``-bit size
                 budget, never below log2(clusters)), 20 epochs at 0.005;
                 writes the packed artifact (sparse + codebook encodings),
                 the integer-only program and the ONNX export.

Run (CIFAR-10 prepared in TFDS format under DATA_DIR):
  python launch.py --config=configs/cifar10_resnet20.py --workdir=/tmp/r20 \\
      --config.data_dir=DATA_DIR
  python launch.py --config=configs/cifar10_resnet20_pcqat.py:stage=prune \\
      --workdir=/tmp/r20p --config.init_from=/tmp/r20 --config.data_dir=DATA_DIR
  python launch.py --config=configs/cifar10_resnet20_pcqat.py:stage=cluster \\
      --workdir=/tmp/r20c --config.init_from=/tmp/r20p --config.data_dir=DATA_DIR
  python launch.py --config=configs/cifar10_resnet20_pcqat.py:stage=pcqat \\
      --workdir=/tmp/r20pc --config.init_from=/tmp/r20c \\
      --config.data_dir=DATA_DIR

Expected: TFMOT reports (ALGORITHMS.md section 3) that PCQAT keeps accuracy
within about a point of QAT at 50% sparsity and 16 clusters on image
classifiers; not measured here (no CIFAR-10 download on this machine).
Args: ``stage``, ``quant=uniform|fracbits``, ``bits``, ``sparsity``,
``clusters``, ``structure=unstructured|n:m|channel``, ``dataset=cifar100``,
``seed``, ``smoke`` (tiny ResNet, a few steps; works on
tfds.testing.mock_data).
"""

from configs import cifar10_resnet20
from configs import common
from fracq.models import default_fixed_layers

STAGES = ('prune', 'cluster', 'pcqat')


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    smoke=False,
    seed=0,
    stage='prune',
    quant='uniform',
    bits=8,
    sparsity=0.5,
    clusters=16,
    structure='unstructured',
    dataset='cifar10',
  )
  if a.stage not in STAGES:
    raise ValueError(
      f'stage={a.stage!r}: choose one of {STAGES} (run them '
      'in that order, each with --config.init_from=<the '
      'previous workdir>).'
    )
  if a.quant not in ('uniform', 'fracbits'):
    raise ValueError(f"quant={a.quant!r}: choose 'uniform' or 'fracbits'.")
  c = cifar10_resnet20.get_config(
    f'seed={a.seed},dataset={a.dataset}' + (',smoke=True' if a.smoke else '')
  )
  q = c.quant
  p = q.preserve
  p.prune_structure = a.structure
  p.clusters = int(a.clusters)
  if a.stage == 'prune':
    q.method = 'none'
    p.mode = 'prune'
    p.sparsity = float(a.sparsity)
    p.prune_schedule = 'polynomial'
    p.prune_frequency = 100
    epochs, lr = 30.0, 0.01
  elif a.stage == 'cluster':
    q.method = 'none'
    p.mode = 'prune_cluster'
    p.sparsity = -1.0  # keep the pruned model's zeros
    epochs, lr = 10.0, 0.005
  else:
    q.method = a.quant
    q.layers.fixed = default_fixed_layers(c.model)  # first conv, classifier
    p.mode = 'prune_cluster'
    p.sparsity = -1.0
    block = q[a.quant]
    block.weight_granularity = 'tensor'
    block.act_bits = 8.0
    if a.quant == 'fracbits':
      block.init_bits = 'budget+0.5'
      q.budget.kind = 'size'
      q.budget.uniform_bits = float(a.bits)
    else:
      block.weight_bits = float(a.bits)
    c.export = True
    epochs, lr = 20.0, 0.005
  if not a.smoke:
    c.num_epochs = epochs
    c.learning_rate = lr
  else:
    p.prune_frequency = 1
  return c
