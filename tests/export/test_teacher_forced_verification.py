"""Teacher-forced verification of integer programs.

``IntegerProgram.replay`` runs a program with every layer reading given
input codes (the fake-quantized model's own), so each layer is checked on
its own: a lowering that models every operation reproduces the next
layers' codes up to float32 rounding ties, however deep the model, and one
that mis-models an operation fails in the layer that reads it (checked on
a ResNet in test_qat_graph_lowering.py).
"""

import warnings

import numpy as np
import pytest

from fracq import export
from fracq.export.lowering.common import verify_program


def _chain():
  """Two Dense layers by hand: ``a`` (identity kernel, codes halved by a
  rounding right shift) feeds ``b`` (sums its two inputs)."""
  return export.IntegerProgram(
    layers=[
      export.IntLayer(
        path='a',
        layer_type='Dense',
        kernel=np.eye(2, dtype=np.int8),
        bias=None,
        requant=('shift', np.array([1, 1], np.int32)),
        out_range=(0, 255),
      ),
      export.IntLayer(
        path='b',
        layer_type='Dense',
        kernel=np.array([[1], [1]], np.int8),
        bias=None,
        out_scale=np.array([0.5], np.float32),
      ),
    ],
    input_scale=1.0,
    input_range=(0, 255),
    kind='qat',
  )


def test_replay_reads_the_teachers_codes_and_counts_the_differences():
  prog = _chain()
  x = np.array([[4.0, 6.0], [10.0, 2.0]], np.float32)
  # Free running: a -> [2, 3] and [5, 1]; b -> 5 and 6 -> logits 2.5, 3.
  np.testing.assert_array_equal(np.asarray(prog.logits(x)), [[2.5], [3.0]])
  # b reads [2, 4] and [5, 1]: one of its four codes differs, by one.
  teacher = {'b': np.array([[2, 4], [5, 1]])}
  logits, report = prog.replay(x, teacher)
  np.testing.assert_array_equal(np.asarray(logits), [[3.0], [3.0]])
  assert report == {'b': {'max_diff': 1, 'differing': 1, 'codes': 4}}
  # The input layer is taught too: a reads [4, 7] (its program input codes
  # are [4, 6]) -> [2, 4] (7 / 2 = 3.5 rounds up) -> 6.
  logits, report = prog.replay(x, {'a': np.array([[4, 7], [10, 2]])})
  np.testing.assert_array_equal(np.asarray(logits), [[3.0], [3.0]])
  assert report['a'] == {'max_diff': 1, 'differing': 1, 'codes': 4}
  with pytest.raises(ValueError, match='teacher gives'):
    prog.replay(x, {'b': np.zeros((3, 2))})


def test_verify_program_judges_by_the_teacher_forced_run():
  prog = _chain()
  x = np.array([[4.0, 6.0], [10.0, 2.0]], np.float32)
  exact = {'b': np.array([[2, 3], [5, 1]])}
  ref = np.array([[2.5], [3.0]])
  # The model's b read one code more than the program computes (a tie):
  # free-running logits off by 0.5 (beyond atol), teacher-forced exact. The
  # program is right; the difference is a warning, not an error.
  off_by_one = {'b': np.array([[2, 4], [5, 1]])}
  with pytest.warns(UserWarning, match='growing through the depth'):
    result = verify_program(
      prog, [[3.0], [3.0]], x, exact=False, atol=0.05, teacher=off_by_one
    )
  assert result.max_diff_rel == 0.5 and result.agreement == 1.0
  assert result.flipped_codes == 1 and result.replay_max_diff_rel == 0.0
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    result = verify_program(prog, ref, x, exact=False, atol=0.0, teacher=exact)
  assert result.flipped_codes == 0 and result.replay_max_diff_rel == 0.0
  # One differing code is allowed at any flip_rate, two of four are not
  # at 1e-3 ...
  two_off = {'b': np.array([[2, 4], [4, 1]])}
  with pytest.raises(ValueError, match='b: .* 2 of this layer'):
    verify_program(
      prog, [[3.0], [2.5]], x, exact=False, atol=0.0, teacher=two_off
    )
  # ... and never a code off by two.
  with pytest.raises(ValueError, match='by up to 2'):
    verify_program(
      prog,
      [[3.5], [3.0]],
      x,
      exact=False,
      atol=0.0,
      teacher={'b': np.array([[2, 5], [5, 1]])},
      flip_rate=0.5,
    )
  # Forced logits that miss the model's: the last layer is wrong.
  with pytest.raises(ValueError, match='last layer'):
    verify_program(prog, [[2.5], [3.5]], x, exact=False, atol=1.0, teacher={})
