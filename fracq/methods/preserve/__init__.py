"""Sparsity- and cluster-preserving QAT (PQAT, CQAT, PCQAT) and pruning:
kernel transforms applied before the kernel quantizer."""

from fracq.methods.preserve.transforms import PreserveTransform
from fracq.methods.preserve.transforms import PruningTransform
from fracq.methods.preserve.transforms import cluster_params
from fracq.methods.preserve.transforms import kernel_summary
from fracq.methods.preserve.transforms import prune_params
from fracq.methods.preserve.transforms import strip

__all__ = [
  'PreserveTransform',
  'PruningTransform',
  'cluster_params',
  'kernel_summary',
  'prune_params',
  'strip',
]
