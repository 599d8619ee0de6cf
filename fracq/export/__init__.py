"""Layer 4: freeze, bit-pack, measure the real size, run integer-only.

* :mod:`.freeze`: each method's export contract (codes, scales, bits) and
  the packed-weights artifact (:func:`export_model`).
* :mod:`.program`: the integer program format and its integer-only runtime.
* :mod:`.lowering`: the registry through which :func:`lower` dispatches to
  each method's lowering (in the method's package, e.g.
  :mod:`fracq.methods.uniform.lowering`), and the helpers they share.
* :mod:`.serialization`: programs on disk (:func:`save_program`,
  :func:`load_program`).
* :mod:`.onnx_export`: programs as ONNX QDQ graphs.
"""

from fracq.export.artifact import ArtifactError
from fracq.export.artifact import read_artifact
from fracq.export.artifact import write_artifact
from fracq.export.freeze import SizeReport
from fracq.export.freeze import dequantized_kernels
from fracq.export.freeze import export_model
from fracq.export.freeze import fake_quant_kernels
from fracq.export.freeze import freeze
from fracq.export.freeze import freeze_attention
from fracq.export.freeze import freeze_inputs
from fracq.export.integer_export import export_integer
from fracq.export import lowering
from fracq.export.lowering import lower
from fracq.export.lowering import lowering_for
from fracq.export.lowering import register_lowering
from fracq.export.onnx_export import export_onnx
from fracq.export.onnx_export import program_to_onnx
from fracq.export.onnx_export import run_onnx
from fracq.export.program import IntAdd
from fracq.export.program import IntConcat
from fracq.export.program import IntegerProgram
from fracq.export.program import IntLayer
from fracq.export.program import IntRequant
from fracq.export.program import integer_forward
from fracq.export.program import is_graph
from fracq.export.serialization import load_program
from fracq.export.serialization import save_program

__all__ = [
  'ArtifactError',
  'IntAdd',
  'IntConcat',
  'IntLayer',
  'IntRequant',
  'IntegerProgram',
  'SizeReport',
  'dequantized_kernels',
  'export_integer',
  'export_model',
  'export_onnx',
  'fake_quant_kernels',
  'freeze',
  'freeze_attention',
  'freeze_inputs',
  'integer_forward',
  'is_graph',
  'load_program',
  'lower',
  'lower_f8net',
  'lower_qat',
  'lowering_for',
  'program_to_onnx',
  'read_artifact',
  'register_lowering',
  'run_onnx',
  'save_program',
  'write_artifact',
]


def __getattr__(name: str):
  # lower_qat / lower_f8net: the registered lowerings, looked up on use (see
  # fracq.export.lowering).
  if name in lowering.BUILTIN_LOWERINGS:
    return getattr(lowering, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
