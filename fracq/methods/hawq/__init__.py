"""HAWQ-style baseline: Hessian-trace sensitivities and an ILP bit
allocation under the shared cost model (:mod:`fracq.methods.cost`)."""

from fracq.methods.hawq.bit_allocation import LayerChoice
from fracq.methods.hawq.bit_allocation import allocate_bits_ilp
from fracq.methods.hawq.bit_allocation import format_bit_table
from fracq.methods.hawq.bit_allocation import manual_bit_map
from fracq.methods.hawq.search import mean_over_processes
from fracq.methods.hawq.search import rules_for_bits
from fracq.methods.hawq.search import search

__all__ = [
  'LayerChoice',
  'allocate_bits_ilp',
  'format_bit_table',
  'manual_bit_map',
  'mean_over_processes',
  'rules_for_bits',
  'search',
]
