"""Sparsity- and cluster-preserving QAT (PQAT, CQAT, PCQAT) and pruning:
kernel transforms applied before the kernel quantizer."""

from fracq.methods.preserve.transforms import PRESERVE_MODES
from fracq.methods.preserve.transforms import PRUNE_SCHEDULES
from fracq.methods.preserve.transforms import PreserveTransform
from fracq.methods.preserve.transforms import PruningTransform
from fracq.methods.preserve.transforms import check_config
from fracq.methods.preserve.transforms import cluster_params
from fracq.methods.preserve.transforms import kernel_summary
from fracq.methods.preserve.transforms import min_bits_for
from fracq.methods.preserve.transforms import prune_params
from fracq.methods.preserve.transforms import strip
from fracq.methods.preserve.transforms import transform_from_config

__all__ = [
  'PRESERVE_MODES',
  'PRUNE_SCHEDULES',
  'PreserveTransform',
  'PruningTransform',
  'check_config',
  'cluster_params',
  'kernel_summary',
  'min_bits_for',
  'prune_params',
  'strip',
  'transform_from_config',
]
