"""Uniform QAT: fixed integer bits on a registered range estimator's grid.

``ranges`` holds the range estimators (``lsq``, ``lsq_plus``, ``pact``,
``dorefa``, ``minmax``, ``ema_minmax``, ``percentile``) and their registry;
``quantize`` / ``freeze`` run the one a spec's ``range_method`` names.
"""

from fracq.methods.uniform import ranges
from fracq.methods.uniform.quantizer import freeze
from fracq.methods.uniform.quantizer import quantize
from fracq.methods.uniform.ranges import QParams
from fracq.methods.uniform.ranges import RangeEstimator

__all__ = [
  'QParams',
  'RangeEstimator',
  'freeze',
  'quantize',
  'ranges',
]
