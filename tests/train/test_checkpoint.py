"""Checkpoints that recover: fallback past corrupt ones, checksums, explicit
resume changes, frozen bits on resume, overwrite moving outputs aside."""

import glob
import importlib
import json
import logging
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fracq.train import checkpoint as ckpt_lib
from fracq.train import train as tr


def get_config(name, arg='smoke'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def _data_files(workdir, step):
  """The array data files of the checkpoint at ``step`` (largest first)."""
  root = os.path.join(workdir, 'checkpoints', str(step))
  files = [
    p
    for p in glob.glob(os.path.join(root, '**', '*'), recursive=True)
    if os.path.isfile(p) and '/d/' in p
  ]
  assert files, os.listdir(root)
  return sorted(files, key=os.path.getsize, reverse=True)


def test_truncated_newest_checkpoint_falls_back_to_older(tmp_path, caplog):
  c = get_config('digits_float')
  m1 = tr.train_and_evaluate(c, str(tmp_path))
  for path in _data_files(str(tmp_path), 6):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.INFO):
    m2 = tr.train_and_evaluate(get_config('digits_float'), str(tmp_path))
  text = caplog.text
  assert 'step 6' in text and 'Resumed from step 3' in text
  assert 'skipped the newer unusable checkpoint(s) [6]' in text
  # Steps 4..6 were redone exactly; the bad checkpoint was kept aside.
  assert m2['eval_loss'] == m1['eval_loss']
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  assert [
    d.split('-')[0] for d in os.listdir(tmp_path / 'checkpoints-corrupt')
  ] == ['6']


def test_every_checkpoint_corrupt_advice_works(tmp_path):
  c = get_config('digits_float')
  c.num_train_steps = 3
  tr.train_and_evaluate(c, str(tmp_path))
  for path in _data_files(str(tmp_path), 3):
    with open(path, 'r+b') as f:
      f.truncate(0)
  with pytest.raises(
    ckpt_lib.CheckpointError, match='step 3: .*overwrite=True'
  ) as err:
    tr.train_and_evaluate(c, str(tmp_path))
  assert 'previous-' in str(err.value)
  # Nothing was moved by the failed attempt; the advice then works.
  assert os.listdir(tmp_path / 'checkpoints') == ['3']
  c.overwrite = True
  m = tr.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(m['eval_loss'])
  prev = glob.glob(str(tmp_path / 'previous-*'))
  assert len(prev) == 1 and os.listdir(os.path.join(prev[0], 'checkpoints'))


def test_flipped_byte_fails_the_checksum(tmp_path):
  # A value changed inside a well-formed checkpoint is caught by the
  # recorded digests, not by the storage format.
  mngr = ocp.CheckpointManager(str(tmp_path / 'ck'))
  tree = {'w': np.arange(8, dtype=np.float32), 'b': np.ones(3, np.int32)}
  ckpt_lib.save(mngr, 1, tree)
  mngr.wait_until_finished()
  restored = mngr.restore(1, args=ocp.args.StandardRestore(tree))
  ckpt_lib._verify(mngr, 1, restored)  # pylint: disable=protected-access
  flipped = dict(restored)
  raw = np.array(flipped['w'])
  raw.view(np.uint8)[5] ^= 1
  flipped['w'] = raw
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checksum mismatch.*'w'"):
    ckpt_lib._verify(mngr, 1, flipped)  # pylint: disable=protected-access
  mngr.close()


def test_flipped_data_byte_is_not_silently_accepted(tmp_path, caplog):
  c = get_config('digits_float')
  m1 = tr.train_and_evaluate(c, str(tmp_path))
  path = _data_files(str(tmp_path), 6)[0]
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    f.seek(0)
    f.write(data)
  with caplog.at_level(logging.INFO):
    m2 = tr.train_and_evaluate(get_config('digits_float'), str(tmp_path))
  assert 'Resumed from step 3' in caplog.text
  assert m2['eval_loss'] == m1['eval_loss']


def test_resume_changes_continue_after_nan(tmp_path, caplog):
  c = get_config('digits_float')
  c.num_train_steps = 12
  c.checkpoint_every_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 12
  c.debug_nan_at_step = 5
  with pytest.raises(tr.NonFiniteError) as err:
    tr.train_and_evaluate(c, str(tmp_path))
  assert '--config.resume_changes=learning_rate,grad_clip_norm' in str(
    err.value
  )
  c.debug_nan_at_step = -1
  c.learning_rate = 0.05
  c.grad_clip_norm = 1.0
  # Without the explicit list the changed settings are refused...
  with pytest.raises(
    ckpt_lib.CheckpointError,
    match='resume_changes=grad_clip_norm,learning_rate',
  ):
    tr.train_and_evaluate(c, str(tmp_path))
  # ... with it the run continues from the kept checkpoint.
  c.resume_changes = 'learning_rate,grad_clip_norm'
  with caplog.at_level(logging.INFO):
    m = tr.train_and_evaluate(c, str(tmp_path))
  assert 'Resumed from step 4' in caplog.text
  assert np.isfinite(m['eval_loss'])
  assert '12' in os.listdir(tmp_path / 'checkpoints')


def test_resume_changes_refuses_model_keys(tmp_path):
  c = get_config('digits_float')
  c.resume_changes = 'learning_rate,model'
  with pytest.raises(
    ckpt_lib.CheckpointError, match=r"\['model'\], which cannot change"
  ):
    tr.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd')


def test_extended_fracbits_run_keeps_frozen_bits(tmp_path, caplog, monkeypatch):
  c = get_config('digits_fracbits')
  c.quant.fracbits.hard_assign_step = -1
  c.quant.fracbits.hard_assign_fraction = 0.5  # assignment at step 3 of 6
  tr.train_and_evaluate(c, str(tmp_path))
  before = ckpt_lib.restore_raw(str(tmp_path))['state']['quant_stats']
  c.num_train_steps = 16  # would move the assignment to step 8
  with pytest.raises(
    ckpt_lib.CheckpointError, match='resume_changes=num_train_steps'
  ):
    tr.train_and_evaluate(c, str(tmp_path))
  c.resume_changes = 'num_train_steps'
  modes = []
  real = tr.make_train_step

  def spy(config, wrapper, tx, mesh):
    modes.append(wrapper.hard)
    return real(config, wrapper, tx, mesh)

  monkeypatch.setattr(tr, 'make_train_step', spy)
  with caplog.at_level(logging.INFO):
    tr.train_and_evaluate(c, str(tmp_path))
  assert modes and all(modes), modes  # never back to fractional bits
  after = ckpt_lib.restore_raw(str(tmp_path))['state']['quant_stats']
  hard = lambda t: {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_leaves_with_path(t)
    if 'hard_bits' in jax.tree_util.keystr(p)
  }
  assert hard(before) and hard(before).keys() == hard(after).keys()
  for k, v in hard(before).items():
    np.testing.assert_array_equal(v, hard(after)[k])
  # The log says what the new schedule does at the resumed step
  # (cosine from 0.1 over 16 steps, at step 6).
  lr = 0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 16))
  assert f'learning rate {lr:.4g} at the resumed step 6' in caplog.text


def test_overwrite_moves_previous_outputs_aside(tmp_path):
  c = get_config('digits_float')
  tr.train_and_evaluate(c, str(tmp_path))
  # Outputs an exporting run leaves, and a file the run did not write.
  for name in ('model.onnx', 'size_report.txt', 'bits_step6.png'):
    (tmp_path / name).write_text('old run')
  (tmp_path / 'notes.txt').write_text('mine')
  c2 = get_config('digits_float')
  c2.learning_rate = 0.05
  c2.overwrite = True
  tr.train_and_evaluate(c2, str(tmp_path))
  prev = glob.glob(str(tmp_path / 'previous-*'))
  assert len(prev) == 1
  moved = sorted(os.listdir(prev[0]))
  assert {
    'model.onnx',
    'size_report.txt',
    'bits_step6.png',
    'config.json',
    'checkpoints',
  } <= set(moved)
  assert any(n.startswith('events.out.tfevents') for n in moved)
  assert (tmp_path / 'notes.txt').read_text() == 'mine'
  now = os.listdir(tmp_path)
  assert 'model.onnx' not in now and 'size_report.txt' not in now
  assert len([n for n in now if n.startswith('events.out')]) == 1


def test_restore_into_optimizer_with_a_stateless_link_added(tmp_path):
  # Switching grad_clip_norm on adds a stateless link to the optax chain;
  # the saved state must still land in the right slots (not by position).
  import optax

  params = {'w': np.arange(3.0, dtype=np.float32), 'a': np.zeros(2, np.float32)}
  old = optax.chain(optax.trace(0.9), optax.scale_by_adam()).init(params)
  old = (
    old[0]._replace(
      trace={'w': np.float32([5, 6, 7]), 'a': np.float32([1, 1])}
    ),
    old[1]._replace(count=np.int32(4)),
  )
  new = optax.chain(
    optax.clip_by_global_norm(1.0), optax.trace(0.9), optax.scale_by_adam()
  ).init(params)
  mngr = ocp.CheckpointManager(str(tmp_path / 'ck'))
  ckpt_lib.save(mngr, 2, {'opt': old, 'params': params})
  mngr.wait_until_finished()
  got = ckpt_lib.restore_latest(mngr, {'opt': new, 'params': params})
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
    {'opt': new, 'params': params}
  )
  np.testing.assert_array_equal(got['opt'][1].trace['w'], [5, 6, 7])
  np.testing.assert_array_equal(got['opt'][1].trace['a'], [1, 1])
  assert int(got['opt'][2].count) == 4
  mngr.close()


def test_a_run_saved_before_a_config_field_existed_still_resumes(tmp_path):
  c = get_config('digits_float')
  saved = json.loads(c.to_json_best_effort())
  del saved['model_api']  # written before config.model_api existed
  os.makedirs(tmp_path / 'checkpoints' / '6')
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  assert ckpt_lib.check_workdir(c, str(tmp_path)) == []
  # The field's default is what the old run had; another value is refused.
  c.model_api = 'nnx'
  with pytest.raises(ckpt_lib.CheckpointError, match='model_api'):
    ckpt_lib.check_workdir(c, str(tmp_path))
