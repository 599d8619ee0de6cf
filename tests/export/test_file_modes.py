"""Exported files get the ordinary umask mode, like any file the run writes."""

import os
import stat

import numpy as np
import pytest

from fracq import export
from fracq.export import artifact
from fracq.export import sizes


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield 0o640  # what open(path, 'w') creates under this umask
  os.umask(old)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_artifact_and_program_files_follow_the_umask(umask_027, tmp_path):
  reference = tmp_path / 'report.txt'
  with open(reference, 'w') as f:
    f.write('x')
  assert _mode(reference) == umask_027
  packed = {
    'l/kernel.packed': artifact.PackedTensor(
      codes=np.array([[1, -2], [3, 0]]), bits=3
    )
  }
  path = str(tmp_path / 'model.fracq.safetensors')
  artifact.write_artifact(path, packed, {'l/kernel.scale': np.ones(1)}, {})
  assert _mode(path) == umask_027
  prog = export.IntegerProgram(
    layers=[
      export.IntLayer(
        path='d',
        layer_type='Dense',
        kernel=np.array([[1, -1]], np.int8),
        bias=np.zeros(2, np.int32),
        out_scale=np.ones(2, np.float32),
      )
    ],
    input_scale=1.0,
    input_range=(-128, 127),
    kind='qat',
  )
  ipath = str(tmp_path / 'model.int.safetensors')
  export.save_program(prog, ipath)
  assert _mode(ipath) == umask_027
  fpath = str(tmp_path / 'float.safetensors')
  sizes.save_float_variables({'params': {'w': np.ones(3)}}, fpath)
  assert _mode(fpath) == umask_027
