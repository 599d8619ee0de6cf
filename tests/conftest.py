"""Suite-wide settings: several fake CPU devices and strict numerics.

The XLA flag must be set before JAX is imported anywhere, so it lives here at
the top of the root conftest.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
    _flags + ' --xla_force_host_platform_device_count=8'
  ).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
