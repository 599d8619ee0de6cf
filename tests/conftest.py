"""Suite-wide settings: several fake CPU devices and strict numerics.

The XLA flag must be set before JAX is imported anywhere, so it lives here at
the top of the root conftest.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
    _flags + ' --xla_force_host_platform_device_count=8'
  ).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One persistent XLA compilation cache for the whole run (the pytest-xdist
# workers and the processes tests start inherit it): many tests compile the
# same training and export computations. Removed when the run ends.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
    prefix='fracq-tests-xla-cache-'
  )
  atexit.register(
    shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True
  )
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
