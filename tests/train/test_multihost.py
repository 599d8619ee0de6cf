"""Two CPU processes (jax.distributed on 127.0.0.1) train the model one does.

Quantized training used to end with a different model on each host: each
process calibrated its quantizers on its own half of the first batch (conv1
input_step 0.0445039 vs 0.0443602 on digits_uniform), and the loop now checks
at startup and at every checkpoint that the replicated state is identical on
every host.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from fracq.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _python(code, args, devices=1):
  return subprocess.Popen(
    [sys.executable, '-c', code] + args,
    cwd=ROOT,
    env=_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _two(code, extra=()):
  port = _free_port()
  procs = [
    _python(code, [f'127.0.0.1:{port}', str(i), *extra]) for i in range(2)
  ]
  return procs, [p.communicate(timeout=240)[0] for p in procs]


TRAIN = textwrap.dedent("""
    import sys
    import jax
    if len(sys.argv) > 2:
      jax.distributed.initialize(sys.argv[1], num_processes=2,
                                 process_id=int(sys.argv[2]))
    from configs import digits_uniform
    from fracq.train import train
    c = digits_uniform.get_config('smoke')
    c.num_train_steps = 3
    c.checkpoint_every_steps = 3
    c.eval_every_steps = 3
    train.train_and_evaluate(c, sys.argv[-1])
    print('done')
""")


def test_two_processes_quantized_state_equals_one(tmp_path):
  one = _python(TRAIN, [str(tmp_path / 'one')], devices=2)
  out1 = one.communicate(timeout=240)[0]
  assert one.returncode == 0, out1[-3000:]
  procs, outs = _two(TRAIN, [str(tmp_path / 'two')])
  for p, o in zip(procs, outs):
    # Every process passed the startup and checkpoint equality checks.
    assert p.returncode == 0 and 'done' in o, o[-3000:]
  a = ckpt_lib.restore_raw(str(tmp_path / 'one'))
  b = ckpt_lib.restore_raw(str(tmp_path / 'two'))
  # Calibrated on the global batch: conv1's input step is the one-process
  # value (it differed by 3e-3 relative when each host used its half).
  np.testing.assert_allclose(
    b['trainable']['quant']['conv1']['input_step'],
    a['trainable']['quant']['conv1']['input_step'],
    rtol=1e-5,
  )
  for x, y in zip(
    jax.tree_util.tree_leaves((a['trainable'], a['state'])),
    jax.tree_util.tree_leaves((b['trainable'], b['state'])),
  ):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


CHECK = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.distributed.initialize(sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from fracq.train import distributed
    pid = jax.process_index()
    same = {'a': np.arange(3.0), 'b': {'step': np.float32(0.5)}}
    distributed.assert_equal_across_hosts(same, 'the state at step 0')
    differ = {'a': np.arange(3.0), 'b': {'step': np.float32(0.5 + pid)}}
    try:
      distributed.assert_equal_across_hosts(differ, 'the state at step 7')
    except ValueError as e:
      print('ERROR', e)
    # HAWQ: each process traced its half of the batches.
    from fracq.methods import hawq
    mine = {'conv2': {'trace': 3.0 * (1 + pid), 'avg_trace': 1.0 + pid,
                      'stderr': 0.1, 'n': 3}}
    print('TRACE', hawq.mean_over_processes(mine, ['conv2'])['conv2'])
""")


def test_cross_host_check_names_the_differing_leaf():
  procs, outs = _two(CHECK)
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
    line = [text for text in o.splitlines() if text.startswith('ERROR')]
    assert line, o[-3000:]
    assert 'the state at step 7 differs across the 2 processes' in line[0]
    assert "first ['b']['step']" in line[0]
    assert 'max |difference| from process 0: 1' in line[0]
    # Both processes allocate bits from the same (global) trace.
    assert "TRACE {'trace': 4.5, 'avg_trace': 1.5, 'stderr': 0.1, 'n': 3}" in o
