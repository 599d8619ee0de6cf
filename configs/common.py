"""Shared config pieces: the base schema and ``arg`` parsing.

Every config is ``get_config(arg=None)``; ``arg`` is a comma-separated list
of ``key`` or ``key=value`` items (``'smoke,seed=3'``) parsed with typed
defaults, big_vision style. ``smoke`` shrinks any config to a seconds-long
run (few steps, small batches, tiny model where one exists).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from fracq.models import default_fixed_layers
from fracq.train.quant_config import default_quant_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'smoke,seed=3'`` -> ConfigDict(smoke=True, seed=3) over defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(
        f'Unknown config arg {key!r}; valid args: {sorted(defaults)}.'
      )
    kind = type(defaults[key])
    if not value:
      if kind is not bool:
        raise ValueError(f'Config arg {key!r} needs a value ({key}=...).')
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data: 'digits' (embedded), 'cifar10', 'cifar100', 'imagenet2012'.
  c.dataset = 'digits'
  c.data_dir = config_dict.placeholder(str)
  c.image_size = 224
  c.num_classes = 10
  # Model: a name from fracq.models.list_models() and its own kwargs.
  c.model = 'digits_cnn'
  c.model_kwargs = ml_collections.ConfigDict()
  # 'linen', or 'nnx': the model's NNX version (fracq.nnx.models.MODELS),
  # quantized by fracq.nnx with the same method and budget.
  c.model_api = 'linen'
  c.half_precision = False
  # Schedule: global batch sizes; epochs, or steps when > 0.
  c.batch_size = 128
  c.eval_batch_size = 512
  c.num_epochs = 30.0
  c.num_train_steps = -1
  # Optimizer: 'sgd' (momentum/nesterov) or 'adamw'.
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 0.0
  c.momentum = 0.9
  c.nesterov = True
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 5e-4
  # Weight decay applies to paths matching this (kernels only by default:
  # not BatchNorm, not biases, not quantizer parameters).
  c.decay_pattern = r'^params/.*kernel$'
  # [(regex, lr multiplier)], first match wins; e.g. (('^quant/', 1.0),).
  c.lr_multipliers = ()
  # Learned bit-widths (quant/**/*_bits) have their own optimizer, never
  # weight-decayed: 'sgd' (as the FracBits authors; nesterov as above) or
  # 'adamw' (b1/b2 as above). Adam-like optimizers move every bit-width at
  # the same speed whatever its layer's cost, losing the size penalty's
  # per-layer weighting. Unset learning rate / momentum: the weights'
  # (learning_rate on the same schedule, momentum); set bits_learning_rate
  # when the weights use a small AdamW learning rate.
  c.bits_optimizer = 'sgd'
  c.bits_learning_rate = config_dict.placeholder(float)
  c.bits_momentum = config_dict.placeholder(float)
  c.grad_clip_norm = 0.0
  c.label_smoothing = 0.0
  # Weight of an auxiliary classifier's loss (Inception-V3), when present.
  c.aux_loss_weight = 0.4
  # Logging, evaluation, checkpoints.
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  # Start from another run's variables (e.g. a float model for FracBits).
  c.init_from = ''
  c.init_collections = 'params,batch_stats'
  c.overwrite = False
  c.export = False
  # Fault injection for tests: the loss of this step becomes NaN (-1: off).
  c.debug_nan_at_step = -1
  # Comma-separated optimisation/schedule keys allowed to differ from the
  # saved configuration when a run resumes (e.g. 'learning_rate').
  c.resume_changes = ''
  c.quant = default_quant_config('none')
  return c


def digits_config(seed: int = 0) -> ml_collections.ConfigDict:
  """The embedded-digits recipe every digits config starts from: the digits
  CNN, batch 128, SGD 0.1 nesterov + cosine, wd 5e-4, 40 epochs (440
  steps), evaluation and checkpoints every 220 steps."""
  c = base_config()
  c.seed = seed
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
  return c


def digits_quant(
  c, method: str, *, budget: dict | None = None, **fields
) -> ml_collections.ConfigDict:
  """Quantization on top of :func:`digits_config`: LSQ ranges for weights and
  activations, the first layer and classifier of ``c.model`` fixed at 8
  bits, ``fields`` in the
  method's block (``config.quant.<method>``) and ``budget`` in
  ``config.quant.budget``."""
  q = c.quant
  q.method = method
  q.layers.fixed = default_fixed_layers(c.model)
  block = q[method]
  block.weight_range = 'lsq'
  block.act_range = 'lsq'
  for k, v in fields.items():
    block[k] = v
  for k, v in (budget or {}).items():
    q.budget[k] = v
  return c


def text_quant(
  c,
  method: str,
  *,
  steps: int = 150,
  group: int = 0,
  attention: int = 0,
  budget: dict | None = None,
  **fields,
) -> ml_collections.ConfigDict:
  """Quantization-aware fine-tuning on top of :func:`text_config`, from a
  trained float LM (``--config.init_from``): ``steps`` steps of AdamW 5e-4
  (cosine, no warmup); LSQ ranges, 8-bit activations (every Dense input),
  the byte embedding (also the tied output head) weight-only at 8 bits per
  row and an untied ``head`` at 8 bits; ``group`` > 0: group-wise kernel
  scales (``group`` input features per scale) instead of per channel;
  ``attention`` > 0: the attention matmuls ``q . k^T`` and ``probs . v``
  quantized at ``attention`` bits (running min/max ranges, per tensor; 0:
  float).
  ``fields`` go to the method's block (``config.quant.<method>``),
  ``budget`` to ``config.quant.budget``."""
  c.num_train_steps = steps
  c.learning_rate = 5e-4
  c.warmup_epochs = 0.0
  c.eval_every_steps = steps
  c.checkpoint_every_steps = steps
  q = c.quant
  q.method = method
  q.layers.embed = r'^embed$'
  if not c.model_kwargs.get('tie_embeddings', True):
    q.layers.fixed = r'^head$'
  if attention:
    q.layers.attention = r'attn$'
    q.layers.attention_bits = attention
    # Observed ranges: on the w3a8 LM (seed 0, 150 steps) they beat LSQ's
    # learned steps, whose starting value clips the probabilities (8 bits:
    # 2.4730 against 2.4847 bits/byte; 4 bits: 2.5721 against 2.5915).
    q.layers.attention_range = 'minmax'
  block = q[method]
  block.weight_range = 'lsq'
  block.act_range = 'lsq'
  if group:
    block.weight_granularity = 'group'
    block.weight_group_size = group
  for k, v in fields.items():
    block[k] = v
  for k, v in (budget or {}).items():
    q.budget[k] = v
  return c


def vit_digits_finetune(c) -> ml_collections.ConfigDict:
  """The quantization-aware fine-tuning schedule of the digits ViT, from a
  trained float ViT (``--config.init_from``): 20 epochs (220 steps) of
  AdamW 5e-4, cosine, no warmup."""
  c.num_epochs = 20.0
  c.init_collections = 'params'  # no BatchNorm
  c.learning_rate = 5e-4
  c.warmup_epochs = 0.0
  c.eval_every_steps = 220
  c.checkpoint_every_steps = 220
  return c


# The units of the FracBits paper's kappa: its penalty reads the model size
# in MB (bits / 8e6) and the BitOPs in GBitOPs (1e9).
PAPER_PENALTY_UNITS = {'size': 8e6, 'bitops': 1e9}


def fracbits_imagenet(
  c,
  *,
  model: str,
  budget_kind: str = 'size',
  uniform_bits: float | None = None,
  compression: float | None = None,
  learn_acts: bool = False,
  epochs: float = 30.0,
  batch_size: int = 256,
):
  """The authors' ImageNet FracBits recipe on top of ``c``.

  From a pretrained float model (``config.init_from``), SGD Nesterov 0.9,
  cosine per step, lr 0.1 x batch/256 with weight decay 4e-5 on conv/dense
  kernels only (not bits, ranges or BN); bits trained by SGD with the
  weights' schedule (``bits_optimizer='sgd'``); first conv and classifier at
  8 bits; initial bits = the budget's uniform-equivalent bits + 0.5
  (``quant.fracbits.init_bits='budget+0.5'``, resolved from the cost model
  when the model is wrapped: about 5.6 for ResNet-50 at 1.5x over INT8);
  penalty ``kappa * |cost - target|`` with the paper's kappa = 1 per MB of
  weights (size) or per GBitOPs (BitOPs), i.e. ``quant.fracbits.penalty_unit``
  8e6 or 1e9; hard assignment after 80% of the epochs, then integer
  fine-tuning.
  """
  c.dataset = 'imagenet2012'
  c.num_classes = 1000
  c.model = model
  c.batch_size = batch_size
  c.eval_batch_size = batch_size
  c.num_epochs = epochs
  c.learning_rate = 0.1 * batch_size / 256
  c.weight_decay = 4e-5
  c.decay_pattern = r'^params/.*kernel$'
  c.label_smoothing = 0.0
  c.half_precision = True
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2500
  c.bits_optimizer = 'sgd'
  q = c.quant
  q.method = 'fracbits'
  q.layers.fixed = default_fixed_layers(model)
  q.budget.kind = budget_kind
  if uniform_bits is not None:
    q.budget.uniform_bits = uniform_bits
  else:
    q.budget.compression = compression
  fb = q.fracbits
  fb.weight_range = 'lsq'
  fb.act_range = 'pact'
  fb.init_bits = 'budget+0.5'
  fb.learn_act_bits = learn_acts
  fb.act_bits = 8.0
  fb.penalty = 'abs'
  fb.penalty_weight = 1.0
  fb.penalty_unit = PAPER_PENALTY_UNITS[budget_kind]
  fb.hard_assign_fraction = 0.8
  return c


def apply_smoke(
  c: ml_collections.ConfigDict,
  *,
  tiny_model: str | None = None,
  image_size: int | None = None,
) -> ml_collections.ConfigDict:
  """Shrinks ``c`` to a seconds-long run."""
  c.num_train_steps = 6
  c.batch_size = 16
  c.eval_batch_size = 16
  c.log_every_steps = 2
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 3
  c.warmup_epochs = 0.0
  if tiny_model:
    c.model = tiny_model
  if image_size:
    c.image_size = image_size
  if c.quant.method == 'fracbits':
    c.quant.fracbits.hard_assign_step = 4
    # Tiny stand-in models are dominated by their 8-bit classifier, where a
    # compression budget sized for the full model would be unreachable.
    c.quant.budget.compression = None
    c.quant.budget.absolute = None
    c.quant.budget.uniform_bits = 4.0
  return c


def text_config(seed: int = 0) -> ml_collections.ConfigDict:
  """The byte-level language-modelling recipe every text config starts
  from: the standard-library corpus (``fracq.data.text``), windows of 128
  bytes, the gpt_small decoder (0.86M parameters), AdamW 2e-3 with a short
  warmup and cosine decay, weight decay 0.1 on kernels, gradient clipping 1.0;
  evaluation on 512 fixed validation windows (65,536 predicted bytes)."""
  c = base_config()
  c.seed = seed
  c.dataset = 'stdlib_text'
  c.num_classes = 256
  # Bytes per window (the model's max_len must be at least this).
  c.seq_len = 128
  # Evaluation windows, evenly spaced over the validation split; 0: all.
  c.eval_windows = 512
  # TFDS text only: keep the first N bytes of each split (0: all).
  c.text_max_bytes = 0
  c.model = 'gpt_small'
  # No BatchNorm: a fine-tuning run starts from the float run's params.
  c.init_collections = 'params'
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_train_steps = 600
  c.optimizer = 'adamw'
  c.learning_rate = 2e-3
  c.warmup_epochs = 0.05
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c
