"""Runs a fracq experiment.

  python launch.py --config=configs/NAME.py[:arg] --workdir=DIR \
      [--config.key=value ...]

Several hosts: pass --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on each (or set the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
"""

import logging as logging_lib
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/NAME.py[:arg]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and '
                               'reports go.')
_COORD = flags.DEFINE_string('coordinator_address', None,
                             'Multi-host: address of process 0 (host:port).')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Multi-host: count.')
_PID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_lib.Filter):
  """Keeps orbax's and TF's per-save INFO chatter out of the progress log."""

  def filter(self, record):
    noisy = ('/orbax/', '/tensorflow/', '/tensorstore/')
    return record.levelno >= logging_lib.WARNING or not any(
        n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  coord = _COORD.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if coord:
    # CPU collectives across processes (only affects the CPU backend; must
    # be set before the backend starts).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    nproc = _NPROC.value or int(os.environ['JAX_NUM_PROCESSES'])
    pid = _PID.value if _PID.value is not None else int(
        os.environ['JAX_PROCESS_ID'])
    jax.distributed.initialize(coord, num_processes=nproc, process_id=pid)
  logging.info('JAX processes %d, devices %d (%s).', jax.process_count(),
               jax.device_count(), jax.default_backend())
  from fracq.train import train_and_evaluate
  metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('Final metrics: %s', metrics)
  print('final', ' '.join(f'{k}={v:.6g}' if isinstance(v, float) else
                          f'{k}={v}' for k, v in metrics.items()))


if __name__ == '__main__':
  app.run(main)
