"""The factory of F8Net (``config.quant.method='f8net'``).

Its keyword arguments after ``context`` are the fields of
``config.quant.f8net``; the training layer's adapter
(:mod:`fracq.train.quant_config`) passes the block in.
"""

from __future__ import annotations

from fracq.methods.context import Context
from fracq.methods.f8net.model import F8NetModel
from fracq.methods.f8net.options import F8NetOptions

__all__ = ['f8net']


def f8net(
  module,
  sample_x,
  *,
  context: Context,
  weight_format: str = 'std',
  act_format: str = 'std',
  weight_granularity: str = 'layer',
  momentum: float = 0.1,
  weight_fl_range: tuple[int, int] = (0, 15),
  fold_bn: bool = True,
  pact: bool = False,
  pact_init: float = 4.0,
) -> F8NetModel:
  """F8Net: 8-bit fixed point with power-of-two scales.

  Args:
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    context: the layers kept float.
    weight_format: 'std' (FL = floor(log2(C/std))) or 'grid' (RMS search).
    act_format: the same for activations.
    weight_granularity: one weight FL per 'layer' or per 'channel'.
    momentum: EMA momentum of the activation FL.
    weight_fl_range: allowed weight FLs.
    fold_bn: fold Conv/Dense -> BatchNorm pairs.
    pact: fixed-point PACT (learned clips folded into the producing layer).
    pact_init: initial clip.
  """
  options = F8NetOptions(
    weight_format=weight_format,
    act_format=act_format,
    weight_granularity=weight_granularity,
    momentum=momentum,
    weight_fl_range=tuple(int(v) for v in weight_fl_range),
    keep_float=context.keep_float,
    fold_bn=fold_bn,
    pact=bool(pact),
    pact_init=float(pact_init),
    axis_name=getattr(module, 'bn_axis_name', None),
  )
  return F8NetModel(
    module, sample_x, options=options, call_kwargs={'train': False}
  )
