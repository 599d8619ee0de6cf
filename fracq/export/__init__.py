"""Layer 4: freeze, bit-pack, measure the real size, run integer-only."""

from fracq.export.artifact import ArtifactError
from fracq.export.artifact import read_artifact
from fracq.export.artifact import write_artifact
from fracq.export.freeze import SizeReport
from fracq.export.freeze import dequantized_kernels
from fracq.export.freeze import export_model
from fracq.export.freeze import fake_quant_kernels
from fracq.export.freeze import freeze
from fracq.export.freeze import freeze_inputs
from fracq.export.integer_model import IntegerProgram
from fracq.export.integer_model import export_integer
from fracq.export.integer_model import load_program
from fracq.export.integer_model import lower
from fracq.export.integer_model import lower_f8net
from fracq.export.integer_model import lower_qat
from fracq.export.integer_model import save_program
from fracq.export.onnx_export import export_onnx
from fracq.export.onnx_export import program_to_onnx
from fracq.export.onnx_export import run_onnx

__all__ = [
  'ArtifactError',
  'IntegerProgram',
  'SizeReport',
  'dequantized_kernels',
  'export_integer',
  'export_model',
  'export_onnx',
  'fake_quant_kernels',
  'freeze',
  'freeze_inputs',
  'load_program',
  'lower',
  'lower_f8net',
  'lower_qat',
  'program_to_onnx',
  'read_artifact',
  'run_onnx',
  'save_program',
  'write_artifact',
]
