"""experiments/nnx_quickstart.py in its smoke mode: trains the NNX digits
CNN with FracBits through hard assignment and writes the packed artifact,
the integer program and the ONNX model."""

import numpy as np
import pytest

import nnx_quickstart
from fracq import export
from fracq.export import onnx_export


def test_nnx_quickstart_smoke(tmp_path):
  pytest.importorskip('onnxruntime')
  result = nnx_quickstart.main(['--smoke', '--out', str(tmp_path)])
  qmodel = result['qmodel']
  assert qmodel.hard
  assert 0.0 <= result['accuracy'] <= 1.0
  assert (tmp_path / 'bits_step4.png').exists()
  # The artifact stores every kernel at the bits the model runs with.
  _, _, manifest = export.read_artifact(result['artifact'])
  frozen = qmodel.variables('quant_stats')
  tensors = manifest['tensors']
  for layer in ('conv1', 'conv2', 'conv3', 'conv4'):
    np.testing.assert_array_equal(
      tensors[f'{layer}/kernel.packed']['bits'],
      frozen[layer]['kernel_hard_bits'],
    )
  for layer in ('conv_init', 'head'):
    assert tensors[f'{layer}/kernel.packed']['bits'] == 8
  assert result['size'].artifact_bytes < result['size'].int8_artifact_bytes
  # The integer program (read back from disk) and onnxruntime against the
  # NNX model's own fake quantization on the 360 test images.
  images = result['images']
  qmodel.eval()
  sim = np.asarray(qmodel(images))
  got = np.asarray(export.load_program(result['program']).logits(images))
  np.testing.assert_array_equal(got.argmax(1), sim.argmax(1))
  rel = np.abs(got - sim).max(axis=1) / np.ptp(sim)
  assert np.mean(rel < 1e-5) >= 0.8 and rel.max() < 3e-3, np.sort(rel)[-10:]
  assert result['integer']['integer_prediction_match'] == 1.0
  assert result['onnx']['onnx_prediction_match'] == 1.0
  assert result['onnx']['onnx_max_logit_diff_rel'] < 1e-3
  onnx_logits = onnx_export.run_onnx(result['onnx_path'], images)
  np.testing.assert_array_equal(onnx_logits.argmax(1), sim.argmax(1))
  # Kernel codes of the program are stored at the hard-assigned bits.
  program = export.load_program(result['program'])
  stored = {layer.path: layer.kernel_bits for layer in program.layers}
  for layer in ('conv1', 'conv2', 'conv3', 'conv4'):
    np.testing.assert_array_equal(
      np.ravel(stored[layer]), np.ravel(frozen[layer]['kernel_hard_bits'])
    )
