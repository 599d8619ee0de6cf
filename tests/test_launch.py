"""launch.py end to end: flags, bad keys, SIGKILL + resume, two processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fracq.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _launch(args, devices=1, **kw):
  return subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'launch.py')] + args,
    cwd=ROOT,
    env=_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def _params(workdir):
  raw = ckpt_lib.restore_raw(str(workdir))
  return raw['trainable'], raw['state']


def test_unknown_config_key_names_the_key(tmp_path):
  p = _launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path}',
      '--config.lerning_rate=0.1',
    ]
  )
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0
  assert 'lerning_rate' in out
  p = _launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path}',
      '--config.quant.weigth_bits=3',
    ]
  )
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0 and 'weigth_bits' in out
  p = _launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path}',
      '--config.batch_size=abc',
    ]
  )
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0 and 'batch_size' in out
  p = _launch(
    ['--config=configs/digits_float.py:smok', f'--workdir={tmp_path}']
  )
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0 and "Unknown config arg 'smok'" in out


ARGS = [
  '--config=configs/digits_float.py:smoke',
  '--config.num_train_steps=40',
  '--config.checkpoint_every_steps=5',
  '--config.log_every_steps=5',
  '--config.eval_every_steps=40',
]


def test_sigkill_and_restart_resumes_exactly(tmp_path):
  ref = tmp_path / 'ref'
  p = _launch(ARGS + [f'--workdir={ref}'])
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  crash = tmp_path / 'crash'
  p = _launch(ARGS + [f'--workdir={crash}'], start_new_session=True)
  deadline = time.time() + 240
  ckpts = crash / 'checkpoints'
  while time.time() < deadline:
    if (ckpts / '15').is_dir():
      break
    time.sleep(0.05)
  else:
    p.kill()
    pytest.fail('no checkpoint appeared')
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  assert not (ckpts / '40').exists(), 'killed too late to test anything'
  p = _launch(ARGS + [f'--workdir={crash}'])
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  assert 'Resumed from step' in out
  a, sa = _params(ref)
  b, sb = _params(crash)
  for x, y in zip(
    jax.tree_util.tree_leaves((a, sa)), jax.tree_util.tree_leaves((b, sb))
  ):
    np.testing.assert_array_equal(x, y)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  args = [
    '--config=configs/digits_float.py:smoke',
    '--config.num_train_steps=4',
    '--config.checkpoint_every_steps=4',
    '--config.eval_every_steps=4',
  ]
  one = _launch(args + [f'--workdir={tmp_path / "one"}'], devices=2)
  out1, _ = one.communicate(timeout=300)
  assert one.returncode == 0, out1[-3000:]
  port = _free_port()
  procs = [
    _launch(
      args
      + [
        f'--workdir={tmp_path / "two"}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ]
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert 'JAX processes 2, devices 2' in outs[0]
  a, sa = _params(tmp_path / 'one')
  b, sb = _params(tmp_path / 'two')
  for x, y in zip(
    jax.tree_util.tree_leaves((a, sa)), jax.tree_util.tree_leaves((b, sb))
  ):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Both reached the same accuracy on the whole test set.
  final = lambda o: [
    line for line in o.splitlines() if line.startswith('final')
  ][-1]
  assert final(out1) == final(outs[0])


def test_fracbits_log_states_start_bits_and_bits_optimizer(tmp_path):
  p = _launch(
    [
      '--config=configs/digits_fracbits.py:smoke',
      f'--workdir={tmp_path}',
      '--config.num_train_steps=1',
      '--config.eval_every_steps=1',
      '--config.optimizer=adamw',
      '--config.learning_rate=0.001',
      '--config.bits_learning_rate=0.05',
      '--config.quant.fracbits.penalty_weight=2',
    ]
  )
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  # The smoke budget is a uniform 4-bit model: start at 4 + 0.5.
  assert (
    'uniform-equivalent 4.0000 bits; learned bits start at 4.5000' in out
  ), out[-3000:]
  assert (
    'Bit-widths (4 tensors): sgd, lr 0.05, momentum 0.9, no weight '
    'decay; other parameters: adamw, lr 0.001.' in out
  ), out[-3000:]


def _run_launch(args, timeout=120):
  p = _launch(args)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def test_unknown_key_short_message_with_suggestion(tmp_path):
  rc, out = _run_launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      '--config.lerning_rate=0.1',
    ]
  )
  assert rc == 2
  assert 'unknown config key lerning_rate; did you mean learning_rate' in out
  assert 'Traceback' not in out and len(out.splitlines()) <= 3, out
  rc, out = _run_launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      '--config.foo=1',
    ]
  )
  assert rc == 2 and 'unknown config key foo' in out and 'Traceback' not in out
  assert not os.path.exists(tmp_path / 'wd')


def test_old_flat_quant_keys_name_their_new_place(tmp_path):
  # On the command line...
  rc, out = _run_launch(
    [
      '--config=configs/digits_fracbits.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      '--config.quant.penalty_weight=2',
    ]
  )
  assert rc == 2 and 'Traceback' not in out, out
  assert (
    'config.quant.penalty_weight moved to config.quant.fracbits.penalty_weight'
    in out
  )
  rc, out = _run_launch(
    [
      '--config=configs/digits_pcqat.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      '--config.quant.preserve=prune',
    ]
  )
  assert rc == 2 and '--config.quant.preserve.mode=MODE' in out, out
  # ... and in a config file.
  path = tmp_path / 'old_layout.py'
  path.write_text(
    'from configs import digits_uniform\n\n\n'
    'def get_config():\n'
    "  c = digits_uniform.get_config('smoke')\n"
    '  c.quant.weight_bits = 3.0\n'
    '  return c\n'
  )
  rc, out = _run_launch([f'--config={path}', f'--workdir={tmp_path / "wd"}'])
  assert rc == 2 and 'Traceback' not in out, out
  assert (
    'config.quant.weight_bits moved to config.quant.uniform.weight_bits' in out
  )
  assert not os.path.exists(tmp_path / 'wd')


def test_missing_config_file_reported_first(tmp_path):
  rc, out = _run_launch(
    ['--config=configs/no_such_config.py', f'--workdir={tmp_path / "wd"}']
  )
  assert rc == 2
  assert "config file 'configs/no_such_config.py' does not exist" in out
  assert 'JAX processes' not in out and 'Traceback' not in out
  assert not os.path.exists(tmp_path / 'wd')


def test_coordinator_without_process_flags(tmp_path):
  rc, out = _run_launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      '--coordinator_address=127.0.0.1:1234',
    ]
  )
  assert rc == 2
  assert 'also needs --num_processes and --process_id' in out
  assert 'KeyError' not in out and 'Traceback' not in out


def test_missing_process_times_out_naming_it(tmp_path):
  port = _free_port()
  rc, out = _run_launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      '--process_id=0',
      '--distributed_timeout=3',
    ],
    timeout=200,
  )
  assert rc != 0
  assert 'process 0 of 2 could not join' in out
  assert 'process_id in [1]' in out


def test_error_is_the_last_thing_printed(tmp_path):
  rc, out = _run_launch(
    [
      '--config=configs/digits_float.py:smoke',
      f'--workdir={tmp_path / "wd"}',
      '--config.num_train_steps=8',
      '--config.debug_nan_at_step=3',
    ],
    timeout=300,
  )
  assert rc == 1
  assert 'sys.meta_path is None' not in out
  last = out.strip().splitlines()[-1]
  assert last.startswith('launch.py: error: Non-finite loss'), out[-2000:]
  assert 'resume_changes=learning_rate,grad_clip_norm' in last
