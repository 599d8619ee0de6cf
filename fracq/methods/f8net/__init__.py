"""F8Net: fixed-point 8-bit-only quantization (Jin et al., ICLR 2022)."""

from fracq.methods.f8net.model import F8NetModel
from fracq.methods.f8net.model import build
from fracq.methods.f8net.options import F8NetOptions
from fracq.methods.f8net.provider import F8NetProvider
from fracq.methods.f8net.provider import LayerRecord

__all__ = [
  'F8NetModel',
  'F8NetOptions',
  'F8NetProvider',
  'LayerRecord',
  'build',
]
