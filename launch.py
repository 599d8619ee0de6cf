"""Runs a fracq experiment.

  python launch.py --config=configs/NAME.py[:arg] --workdir=DIR \
      [--config.key=value ...]

Several hosts: pass --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on each (or set the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables). A process whose
peers have not all joined within --distributed_timeout seconds stops with a
message naming the processes it waited for.

Mistakes in the command line (a missing config file, an unknown
``--config.`` key, incomplete multi-host flags) and in the configuration
(see ``fracq.train.train.check_config``) are reported in one short message,
before JAX starts any work, and the exit status is non-zero (2 for command
line errors, 1 for errors found during the run).
"""

import difflib
import importlib.util
import logging as logging_lib
import os
import sys
import threading

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import ml_collections

from fracq.train import quant_config

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config file (configs/NAME.py[:arg]).',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where checkpoints, logs and reports go.'
)
_COORD = flags.DEFINE_string(
  'coordinator_address', None, 'Multi-host: address of process 0 (host:port).'
)
_NPROC = flags.DEFINE_integer('num_processes', None, 'Multi-host: count.')
_PID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')
_DIST_TIMEOUT = flags.DEFINE_integer(
  'distributed_timeout',
  300,
  'Multi-host: seconds to wait for every '
  'process to join the coordinator before giving up.',
  lower_bound=1,
)
flags.mark_flags_as_required(['config', 'workdir'])


class UsageError(Exception):
  """A command line mistake: reported in one line, exit status 2."""


def _fail(message: str, code: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  print(f'launch.py: error: {message}', file=sys.stderr, flush=True)
  # Skip interpreter teardown: background threads of half-started libraries
  # would otherwise print pages of shutdown noise after the message.
  os._exit(code)  # pylint: disable=protected-access


def _flag_value(argv, name):
  """The value of ``--name=V`` / ``--name V`` in ``argv`` (last wins)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config(spec: str):
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UsageError(
      f'config file {path!r} does not exist (from '
      f'--config={spec}); pass a file such as '
      'configs/digits_float.py.'
    )
  module_spec = importlib.util.spec_from_file_location(
    'fracq_user_config', path
  )
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # e.g. an unknown config arg
    raise UsageError(f'--config={spec}: {e}') from e


def _unknown_key(config, dotted: str) -> str | None:
  """A message if ``dotted`` (e.g. ``quant.fracbits.weight_bits``) is not a
  field: an old flat ``quant.*`` key names its new place, a block (a group
  of fields) lists its fields."""
  parts = dotted.split('.')
  if len(parts) == 2 and parts[0] == 'quant':
    moved = quant_config.moved_key(parts[1], config.quant.get('method'))
    if moved:
      return moved
  node, seen = config, []
  for part in parts:
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = '.'.join(seen)
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
      names = ' or '.join('.'.join(seen + [k]) for k in close)
      hint = (
        f'; did you mean {names}?'
        if close
        else f'; the fields{" of " + where if where else ""} are: '
        f'{", ".join(sorted(keys))}.'
      )
      return f'unknown config key {dotted}{hint}'
    node, seen = node[part], seen + [part]
  if parts[0] == 'quant' and isinstance(node, ml_collections.ConfigDict):
    hint = ''
    if dotted == 'quant.preserve':
      hint = ' (--config.quant.preserve=MODE is now --config.quant.preserve.mode=MODE)'
    return (
      f'config.{dotted} is a block of fields, not a value{hint}; set one '
      f'of its fields: {", ".join(sorted(node.keys()))}.'
    )
  return None


def check_command_line(argv) -> None:
  """Checks the config file and ``--config.*`` keys before flags parse."""
  spec = _flag_value(argv, 'config')
  if spec is None:
    return  # absl reports the missing required flag
  keys = []
  for arg in argv[1:]:
    if arg.startswith('--config.') or arg.startswith('--noconfig.'):
      name = arg.split('=', 1)[0].split('.', 1)[1]
      keys.append(name)
  config = _load_config(spec)
  if 'quant' in config:
    try:
      quant_config.check_layout(config.quant)
    except ValueError as e:
      raise UsageError(f'--config={spec}: {e}') from e
  for key in keys:
    message = _unknown_key(config, key)
    if message:
      raise UsageError(message)


def _parse_flags(argv):
  try:
    check_command_line(argv)
    return flags.FLAGS(argv)
  except UsageError as e:
    _fail(str(e), 2)
  except flags.Error as e:
    _fail(str(e), 2)
  except (AttributeError, KeyError, TypeError) as e:
    # A --config.* override that the pre-check could not see (e.g. from a
    # --flagfile) and ml_collections rejected.
    _fail(
      f'bad --config override ({type(e).__name__}: {e}); check the key '
      'names against the config file.',
      2,
    )


def distributed_args(coord, nproc, pid, env=None):
  """``(address, num_processes, process_id)`` or None for one process."""
  env = os.environ if env is None else env
  coord = coord or env.get('JAX_COORDINATOR_ADDRESS')
  nproc = nproc if nproc is not None else env.get('JAX_NUM_PROCESSES')
  pid = pid if pid is not None else env.get('JAX_PROCESS_ID')
  if not coord:
    if nproc is not None or pid is not None:
      raise UsageError(
        '--num_processes / --process_id need '
        '--coordinator_address=HOST:PORT (the address of '
        'process 0).'
      )
    return None
  missing = [
    name
    for name, v in (('--num_processes', nproc), ('--process_id', pid))
    if v is None
  ]
  if missing:
    raise UsageError(
      f'--coordinator_address={coord} also needs {" and ".join(missing)} '
      '(or the JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables): '
      'every process needs the total count and its own id 0..N-1.'
    )
  try:
    nproc, pid = int(nproc), int(pid)
  except ValueError as e:
    raise UsageError(f'num_processes / process_id must be integers ({e}).')
  if nproc < 1 or not 0 <= pid < nproc:
    raise UsageError(
      f'process_id={pid} must be in 0..{nproc - 1} (num_processes={nproc}).'
    )
  return coord, nproc, pid


class _QuietLibraries(logging_lib.Filter):
  """Keeps orbax's and TF's per-save INFO chatter out of the progress log."""

  def filter(self, record):
    noisy = ('/orbax/', '/tensorflow/', '/tensorstore/')
    return record.levelno >= logging_lib.WARNING or not any(
      n in record.pathname for n in noisy
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    dist = distributed_args(_COORD.value, _NPROC.value, _PID.value)
  except UsageError as e:
    _fail(str(e), 2)
  from fracq.train import train as train_lib

  try:
    train_lib.check_config(_CONFIG.value)
  except train_lib.USER_ERRORS as e:
    _fail(str(e), 2)
  import jax

  if dist:
    coord, nproc, pid = dist
    # CPU collectives across processes (only affects the CPU backend; must
    # be set before the backend starts).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    others = [i for i in range(nproc) if i != pid]
    message = (
      f'process {pid} of {nproc} could not join the others through '
      f'{coord} within --distributed_timeout={_DIST_TIMEOUT.value}s; '
      f'start the missing processes (process_id in {others}) with '
      f'the same --coordinator_address and --num_processes={nproc}.'
    )
    # XLA's own timeout aborts the interpreter with a C++ stack trace, so a
    # watchdog that fires first reports the missing processes instead.
    watchdog = threading.Timer(_DIST_TIMEOUT.value, _fail, (message, 1))
    watchdog.daemon = True
    watchdog.start()
    try:
      jax.distributed.initialize(
        coord,
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=_DIST_TIMEOUT.value + 60,
      )
    except Exception as e:  # pylint: disable=broad-except
      _fail(f'{message} ({type(e).__name__}: {e})', 1)
    finally:
      watchdog.cancel()
  logging.info(
    'JAX processes %d, devices %d (%s).',
    jax.process_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  try:
    metrics = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train_lib.USER_ERRORS as e:
    logging.error('%s: %s', type(e).__name__, e)
    logging.flush()
    _fail(str(e), 1)
  logging.info('Final metrics: %s', metrics)
  print(
    'final',
    ' '.join(
      f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}'
      for k, v in metrics.items()
    ),
    flush=True,
  )


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
