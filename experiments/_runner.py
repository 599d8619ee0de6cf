"""What every experiment script shares: runs, their cache, and provenance.

* :func:`run` trains one config in-process and returns its final metrics.
  Runs are cached by what determines them (config, arg, overrides, the float
  run they start from and the code's commit), so two scripts asking for the
  same setting report the identical run, and a second script reuses it
  instead of training again. Training is deterministic on a given machine
  and commit (same seed: bit-identical metrics), which is what makes reuse
  sound.
* :func:`float_start` is the one trained float model per seed that every
  quantized comparison row fine-tunes from (``init_from``).
* :func:`provenance` / :func:`write_json` / :func:`write_md`: every result
  file records the commit, the command line, library versions and the
  machine, through this one helper.
"""

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results')
# Runs are cached outside the repository by default (checkpoints are large);
# FRACQ_RUN_CACHE moves the cache, e.g. onto a bigger disk.
DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'fracq', 'runs')
# Result files are outputs, not code: writing one must not mark the tree as
# modified for the scripts that run after it (run_all.py runs several).
# What a result depends on: the library, the configs, the experiment scripts,
# the launcher and the pinned requirements (not the README, the tests or the
# result files themselves).
_CODE = (
  'fracq',
  'configs',
  'experiments/*.py',
  'launch.py',
  'requirements.txt',
)
PROVENANCE_FIELDS = ('commit', 'command', 'versions', 'machine')
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'onnxruntime', 'torch')


def _git(*args) -> str:
  out = subprocess.run(
    ['git', *args], cwd=ROOT, capture_output=True, text=True, check=True
  )
  return out.stdout


@functools.cache
def commit() -> str:
  """``git rev-parse HEAD``, plus ``-dirty`` when the code a result depends
  on (``_CODE``) differs from it; read once, when the process starts (see
  the call at the end of this module), so a result names the code its
  process ran even if commits land while it runs."""
  try:
    head = _git('rev-parse', 'HEAD').strip()
    dirty = _git('status', '--porcelain', '--', *_CODE).strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('-dirty' if dirty else '')


@functools.cache
def _code_state() -> str:
  """A digest of the code a result depends on, as it is on disk (committed
  or not): the run cache key changes whenever that code does, and only
  then, so editing the README or the tests between experiments keeps the
  cache. Read once per process: the code a process runs is the code it
  imported at its start."""
  try:
    files = sorted(
      set(
        _git(
          'ls-files', '--cached', '--others', '--exclude-standard', '--', *_CODE
        ).split()
      )
    )
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  h = hashlib.sha256()
  for path in files:
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):  # deleted but not yet committed
      continue
    h.update(path.encode() + b'\0')
    with open(full, 'rb') as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:32]


def _portable(arg: str) -> str:
  """``arg`` without machine paths: an absolute path (or ``--flag=/path``)
  inside the repository becomes relative to its root, one outside it keeps
  only its last component."""
  flag, eq, value = (
    arg.rpartition('=') if arg.startswith('-') else ('', '', arg)
  )
  if not os.path.isabs(value):
    return arg
  rel = os.path.relpath(value, ROOT)
  value = (
    rel
    if not rel.startswith('..')
    else '<outside the repository>/' + os.path.basename(value)
  )
  return flag + eq + value


def _command(argv) -> str:
  """The command line as typed from the repository root, with no machine
  paths (see :func:`_portable`)."""
  argv = list(sys.argv if argv is None else argv)
  return ' '.join(['python'] + [_portable(a) for a in argv])


def _versions() -> dict:
  import importlib.metadata as md

  out = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _machine() -> dict:
  import jax

  return {
    'cpu': _cpu_model(),
    'cpu_cores': os.cpu_count(),
    'os': platform.system(),
    'jax_backend': jax.default_backend(),
    'jax_devices': [f'{d.platform}:{d.device_kind}' for d in jax.devices()],
  }


def provenance(argv=None) -> dict:
  """Commit, command line (``argv``, default ``sys.argv``), versions and
  machine of the process writing a result."""
  return {
    'commit': commit(),
    'command': _command(argv),
    'versions': _versions(),
    'machine': _machine(),
    'written_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }


def write_json(path: str, payload, argv=None) -> None:
  """Writes a result JSON with its provenance: a list of rows is stored as
  ``{"provenance": ..., "rows": [...]}``, a dict gains a ``provenance``
  key."""
  if isinstance(payload, list):
    payload = {'provenance': provenance(argv), 'rows': payload}
  elif isinstance(payload, dict):
    payload = {**payload, 'provenance': provenance(argv)}
  else:
    raise TypeError(
      f'a result is a list of rows or a dict, got {type(payload).__name__}'
    )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f, indent=1)


def load_rows(path: str) -> list:
  """The rows of a result JSON, whether written by :func:`write_json` or
  (older files) a bare list."""
  with open(path) as f:
    data = json.load(f)
  return data['rows'] if isinstance(data, dict) else data


def md_header(argv=None) -> str:
  """One markdown line with a result table's provenance."""
  p = provenance(argv)
  v = ', '.join(f'{k} {x}' for k, x in p['versions'].items() if x)
  m = p['machine']
  return (
    f'Generated by `{p["command"]}` at commit `{p["commit"]}` '
    f'({p["written_utc"]}); {v}; {m["cpu"]}, {m["cpu_cores"]} cores, '
    f'JAX backend {m["jax_backend"]} '
    f'({", ".join(sorted(set(m["jax_devices"])))}).'
  )


def write_md(path: str, text: str, argv=None) -> None:
  """Writes a markdown result: the provenance line, then ``text``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(md_header(argv) + '\n\n' + text.rstrip('\n') + '\n')


def cache_dir() -> str:
  return os.environ.get('FRACQ_RUN_CACHE', DEFAULT_CACHE)


def config_module(name: str):
  """The module ``configs/<name>.py`` of this checkout.

  The experiments run as ``python experiments/X.py``: Python puts
  ``experiments/`` on the path, not the checkout, and the installed package
  is ``fracq`` alone, so the checkout's ``configs`` package is registered
  from its location (once) before its configs are imported.
  """
  if 'configs' not in sys.modules:
    folder = os.path.join(ROOT, 'configs')
    spec = importlib.util.spec_from_file_location(
      'configs',
      os.path.join(folder, '__init__.py'),
      submodule_search_locations=[folder],
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules['configs'] = package
    spec.loader.exec_module(package)
  return importlib.import_module(f'configs.{name}')


def _train(config_name, arg, workdir, overrides) -> dict:
  c = config_module(config_name).get_config(arg)
  for k, v in overrides.items():
    c[k] = v
  from fracq.train import train_and_evaluate

  t = time.time()
  m = {
    # Numbers as floats; text runs also report their corpus (name, SHA-256).
    k: v if isinstance(v, str) else float(v)
    for k, v in train_and_evaluate(c, workdir).items()
  }
  m['wall_s'] = time.time() - t
  tables = sorted(
    (
      f
      for f in os.listdir(workdir)
      if f.startswith('bits_step') and f.endswith('.json')
    ),
    key=lambda f: int(f[len('bits_step') : -len('.json')]),
  )
  bits = {}
  for name in tables:
    with open(os.path.join(workdir, name)) as f:
      bits[name[len('bits_step') : -len('.json')]] = {
        r['layer']: r['w_bits'] for r in json.load(f)['rows']
      }
  if tables:
    m['bits'] = bits[tables[-1][len('bits_step') : -len('.json')]]
    # Every table by step: FracBits writes its learned fractional bits at
    # the hard-assignment step, then the integer bits at the end.
    m['bits_by_step'] = bits
  return m


def run_key(
  config_name: str, arg: str = '', init_from: dict | None = None, **overrides
) -> str:
  """The cache key of a run: what determines its result."""
  if init_from is not None and 'run_key' not in init_from:
    raise ValueError(
      'init_from must be the metrics returned by run() (or '
      'float_start()), which carry the run_key of the start '
      'model; pass that dict, not a path.'
    )
  spec = {
    'config': config_name,
    'arg': arg,
    'overrides': {k: repr(v) for k, v in sorted(overrides.items())},
    'init_from': None if init_from is None else init_from['run_key'],
    'code': _code_state(),
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[
    :20
  ]


def run(
  config_name: str,
  arg: str = '',
  *,
  init_from: dict | None = None,
  keep_workdir: bool = False,
  cache: bool = True,
  **overrides,
) -> dict:
  """Trains ``configs/<config_name>.py:<arg>`` with ``overrides`` (config
  fields), or returns the cached result of the identical run.

  Args:
    config_name: a module under ``configs/``.
    arg: the config's arg string (e.g. ``'bits=3,seed=1'``).
    init_from: the dict another ``run`` returned with ``keep_workdir=True``
      (the float start); its workdir becomes ``config.init_from``.
    keep_workdir: keep the run's workdir (checkpoints, exports) in the cache;
      its path is returned as ``workdir``.
    cache: False trains even when a cached result exists (and refreshes it).
    **overrides: config fields set after ``get_config``.

  Returns:
    The final metrics (floats), ``wall_s`` (of the run that trained),
    ``bits`` (per-layer weight bits, when the run wrote a bit table) and
    ``bits_by_step`` (every bit table it wrote, by step),
    ``run_key``, ``cached`` and, with ``keep_workdir``, ``workdir``.
  """
  key = run_key(config_name, arg, init_from, **overrides)
  entry = os.path.join(cache_dir(), key)
  metrics_path = os.path.join(entry, 'metrics.json')
  workdir = os.path.join(entry, 'workdir')
  if (
    cache
    and os.path.exists(metrics_path)
    and (not keep_workdir or os.path.isdir(workdir))
  ):
    with open(metrics_path) as f:
      m = json.load(f)
    m['cached'] = True
    if keep_workdir:
      m['workdir'] = workdir
    return m
  shutil.rmtree(entry, ignore_errors=True)
  os.makedirs(entry)
  if init_from is not None:
    overrides = {**overrides, 'init_from': init_from['workdir']}
  m = _train(config_name, arg, workdir, overrides)
  m['run_key'] = key
  if not keep_workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  # Written last and atomically: an interrupted run leaves no metrics.
  with open(metrics_path + '.tmp', 'w') as f:
    json.dump(m, f, indent=1)
  os.replace(metrics_path + '.tmp', metrics_path)
  m['cached'] = False
  if keep_workdir:
    m['workdir'] = workdir
  return m


def float_start(seed: int, **overrides) -> dict:
  """The trained float digits model of ``seed`` (``configs/digits_float.py``),
  trained once and cached with its checkpoint: the start of every quantized
  row of every comparison table."""
  return run('digits_float', f'seed={seed}', keep_workdir=True, **overrides)


def public(m: dict) -> dict:
  """Metrics as stored in a result file (no cache-local fields)."""
  return {k: v for k, v in m.items() if k not in ('workdir', 'cached')}


def from_float(config_name: str, arg: str, seed: int, **overrides) -> dict:
  """A quantized digits run fine-tuned from :func:`float_start` of ``seed``
  and exported: the one run every comparison table reports for this
  (config, arg, seed, overrides)."""
  arg = ','.join(a for a in (arg, f'seed={seed}') if a)
  return run(
    config_name,
    arg,
    init_from=float_start(seed, **overrides),
    export=True,
    **overrides,
  )


def add_flags(parser) -> None:
  """The flags every experiment script shares."""
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='config override applied to every run of the script, e.g. '
    '--set num_train_steps=20 for a quick check (value parsed as JSON, '
    'else kept as a string)',
  )
  parser.add_argument(
    '--out',
    default=RESULTS,
    help='directory the result files are written to (default '
    'experiments/results)',
  )


def parse_overrides(items) -> dict:
  """``['num_train_steps=20', ...]`` -> ``{'num_train_steps': 20, ...}``."""
  out = {}
  for item in items:
    field, sep, value = item.partition('=')
    if not sep or not field:
      raise ValueError(f'--set expects FIELD=VALUE, got {item!r}')
    try:
      out[field] = json.loads(value)
    except json.JSONDecodeError:
      out[field] = value
  return out


def separation_note(setting: str, accuracies: dict) -> str:
  """Whether methods at one setting are separable by their seeds.

  Args:
    setting: what the methods share (e.g. ``'uniform 3-bit size'``).
    accuracies: method -> per-seed test accuracies (%).

  Returns:
    A sentence: methods whose mean accuracies differ by less than the widest
    seed range (max - min) among them are "not separable", and are not
    ranked.
  """

  means = {m: float(np.mean(a)) for m, a in accuracies.items()}
  spread = max(means.values()) - min(means.values())
  seed_range = max(float(np.ptp(a)) for a in accuracies.values())
  names = ', '.join(accuracies)
  if spread < seed_range or len(next(iter(accuracies.values()))) < 2:
    return (
      f'{setting}: {names} not separable (means within '
      f'{spread:.2f} points, less than the widest seed range '
      f'{seed_range:.2f}).'
    )
  order = sorted(means, key=means.get, reverse=True)
  return (
    f'{setting}: {" > ".join(order)} (means {spread:.2f} points apart, '
    f'more than the widest seed range {seed_range:.2f}).'
  )


def schedule_text(overrides: dict) -> str:
  """The shared digits schedule, as a table header states it."""
  text = 'the digits schedule (440 steps, SGD 0.1 cosine)'
  if overrides:
    text += ' with ' + ', '.join(
      f'{k}={v}' for k, v in sorted(overrides.items())
    )
  return text


# The code this process runs is the code at its start.
commit()


def spread(values) -> dict:
  """Median, min and max of ``values`` (e.g. per-round step times)."""
  values = np.asarray(values, np.float64)
  return {
    'median': float(np.median(values)),
    'min': float(values.min()),
    'max': float(values.max()),
  }


def ratio(times: dict, name: str, base: str) -> dict:
  """The per-round ratios ``times[name] / times[base]`` (variants timed
  side by side in each round) summarised by :func:`spread`."""
  return spread(np.asarray(times[name]) / np.asarray(times[base]))
