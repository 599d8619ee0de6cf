"""experiments/nnx_quickstart.py in its smoke mode: trains the NNX digits
CNN with FracBits through hard assignment and writes the packed artifact."""

import numpy as np

import nnx_quickstart
from fracq import export


def test_nnx_quickstart_smoke(tmp_path):
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
