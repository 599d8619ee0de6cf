"""Runs one config in-process and collects its final metrics (experiments)."""

import importlib
import json
import os
import time

from fracq.train import train_and_evaluate


def run(config_name: str, arg: str, workdir: str, **overrides) -> dict:
  """Trains ``configs/<config_name>.py:<arg>`` in ``workdir``; returns the
  final metrics (floats), the wall time and, when the run wrote a bit table,
  the per-layer weight bits."""
  c = importlib.import_module(f'configs.{config_name}').get_config(arg)
  for k, v in overrides.items():
    c[k] = v
  t = time.time()
  m = {k: float(v) for k, v in train_and_evaluate(c, workdir).items()}
  m['wall_s'] = time.time() - t
  tables = sorted((f for f in os.listdir(workdir)
                   if f.startswith('bits_step') and f.endswith('.json')),
                  key=lambda f: int(f[len('bits_step'):-len('.json')]))
  if tables:
    with open(os.path.join(workdir, tables[-1])) as f:
      m['bits'] = {r['layer']: r['w_bits'] for r in json.load(f)['rows']}
  return m
