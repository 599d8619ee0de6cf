"""Layer 4: freeze, bit-pack, measure the real size (integer runtime: to come)."""

from fracq.export.artifact import ArtifactError
from fracq.export.artifact import read_artifact
from fracq.export.artifact import write_artifact
from fracq.export.freeze import SizeReport
from fracq.export.freeze import dequantized_kernels
from fracq.export.freeze import export_model
from fracq.export.freeze import fake_quant_kernels
from fracq.export.freeze import freeze
