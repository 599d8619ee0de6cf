"""Model structure from eager probes: signs, data flow, Conv->BN pairs."""

from fracq.graph.signs import SignProbe
from fracq.graph.signs import probe_signs
from fracq.graph.structure import MAX_POOLS
from fracq.graph.structure import Structure
from fracq.graph.structure import clipping_ops
from fracq.graph.structure import conv_padding
from fracq.graph.structure import is_max_pool
from fracq.graph.structure import max_pool
from fracq.graph.structure import probe_structure

__all__ = [
  'MAX_POOLS',
  'SignProbe',
  'Structure',
  'clipping_ops',
  'conv_padding',
  'is_max_pool',
  'max_pool',
  'probe_signs',
  'probe_structure',
]
