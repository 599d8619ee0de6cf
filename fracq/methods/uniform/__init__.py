"""Uniform QAT: fixed integer bits on a registered range estimator's grid.

``ranges`` holds the range estimators (``lsq``, ``lsq_plus``, ``pact``,
``dorefa``, ``minmax``, ``ema_minmax``, ``percentile``) and their registry;
``quantize`` / ``freeze`` run the one a spec's ``range_method`` names;
``spec`` holds :class:`TensorSpec`, the rule spec of fixed-bit tensors that
every method's spec extends, and :func:`fixed_bits`.
"""

from fracq.methods.uniform import ranges
from fracq.methods.uniform.quantizer import freeze
from fracq.methods.uniform.quantizer import quantize
from fracq.methods.uniform.ranges import QParams
from fracq.methods.uniform.ranges import RangeEstimator
from fracq.methods.uniform.spec import TensorSpec
from fracq.methods.uniform.spec import fixed_bits

__all__ = [
  'QParams',
  'RangeEstimator',
  'TensorSpec',
  'fixed_bits',
  'freeze',
  'quantize',
  'ranges',
]
