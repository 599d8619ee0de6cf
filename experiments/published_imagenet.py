"""Published ImageNet numbers beside the fracq configs that would reproduce them.

The numbers are the ones collected in the project's algorithm notes (taken
from each paper, or NNCF's README for its FracBits port); nothing here is
reproduced on this machine (ImageNet training needs GPUs/TPUs for days).
Each row names its source and the fracq config + command that targets the
same model, budget and recipe, or says that no config reproduces it and what
is missing. Every config argument and ``--config.*`` override named here is
checked to build (``get_config`` plus the override keys exist), so a renamed
config or field fails this script instead of going stale.

Writes experiments/results/published_imagenet.{md,json}.

  python experiments/published_imagenet.py [--out experiments/results]
"""

import argparse
import os
import re
import sys

import _runner

ROOT = _runner.ROOT
OUT = os.path.join(ROOT, 'experiments', 'results')

SOURCES = {
  'FracBits': 'Yang & Jin, "FracBits: Mixed Precision Quantization via '
  'Fractional Bit-Widths", AAAI 2021, arXiv 2007.02017',
  'NNCF': 'OpenVINO NNCF README, FracBits port (PR #1286, not merged): '
  'compression = INT8 size / mixed size (theoretical, not packed), '
  '8x V100, mean of 5 runs',
  'HAWQ-V3': 'Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", '
  'ICML 2021, arXiv 2011.10680',
  'HAQ': 'Wang et al., "HAQ: Hardware-Aware Automated Quantization with '
  'Mixed Precision", CVPR 2019, arXiv 1811.08886',
  'LSQ': 'Esser et al., "Learned Step Size Quantization", ICLR 2020, '
  'arXiv 1902.08153',
  'F8Net': 'Jin et al., "F8Net: Fixed-Point 8-bit Only Multiplication for '
  'Network Quantization", ICLR 2022, arXiv 2202.05239',
}

DATA = '--config.data_dir=DATA_DIR'


def _float_start(model):
  """The command that trains the float model a fine-tuning run starts from."""
  extra = '' if model == 'resnet50' else f' --config.model={model}'
  if model == 'inception_v3':
    extra += ' --config.image_size=299'
  return (
    f'python launch.py --config=configs/imagenet_resnet50.py '
    f'--workdir=/tmp/{model} {DATA}{extra}'
  )


# Each row: source, model, dataset, setting, published top-1 (float), and
# config (None when no config reproduces it), arg, extra overrides, status.
ROWS = [
  # FracBits paper: BitOPs budgets of uniform k-bit ResNet-18.
  dict(
    source='FracBits',
    model='resnet18',
    dataset='ImageNet',
    setting='BitOPs budget = uniform 4-bit (34.70 G), weights + acts',
    top1=70.6,
    float_top1=None,
    config='resnet18_fracbits',
    arg='bits=4',
    overrides=[],
    init='resnet18',
    status='targets this row (budget checked in the tests: 34.70 G)',
  ),
  dict(
    source='FracBits',
    model='resnet18',
    dataset='ImageNet',
    setting='BitOPs budget = uniform 3-bit (22.83 G), weights + acts',
    top1=69.6,
    float_top1=None,
    config='resnet18_fracbits',
    arg='bits=3',
    overrides=[],
    init='resnet18',
    status='targets this row',
  ),
  # NNCF's FracBits port: model-size compression over INT8.
  dict(
    source='NNCF',
    model='resnet50',
    dataset='ImageNet',
    setting='size, 1.54x over INT8 (target 1.5x), weights searched, acts 8-bit',
    top1=76.12,
    float_top1=76.16,
    config='resnet50_fracbits',
    arg='',
    overrides=[],
    init='resnet50',
    status="targets this row (authors' recipe, not NNCF's 1-5 epoch fine-tune)",
  ),
  dict(
    source='NNCF',
    model='mobilenet_v2',
    dataset='ImageNet',
    setting='size, 1.53x over INT8',
    top1=71.19,
    float_top1=71.87,
    config='mobilenet_v2_fracbits',
    arg='',
    overrides=[],
    init='mobilenet_v2',
    status='targets this row',
  ),
  dict(
    source='NNCF',
    model='inception_v3',
    dataset='ImageNet',
    setting='size, 1.51x over INT8',
    top1=78.16,
    float_top1=77.34,
    config='inception_v3_fracbits',
    arg='',
    overrides=[],
    init='inception_v3',
    status='targets this row',
  ),
  dict(
    source='NNCF',
    model='mobilenet_v2',
    dataset='CIFAR-100',
    setting='size, 1.5x over INT8',
    top1=67.26,
    float_top1=67.71,
    config='mobilenet_v2_fracbits',
    arg='dataset=cifar100',
    overrides=[],
    init=None,
    status="targets this row (CIFAR-100, listed with NNCF's table)",
  ),
  # HAWQ-V3: Hessian-aware mixed precision, integer-only.
  dict(
    source='HAWQ-V3',
    model='resnet18',
    dataset='ImageNet',
    setting='mixed precision, 7.3 MB',
    top1=70.01,
    float_top1=71.47,
    config=None,
    status="no config: fracq's HAWQ-style baseline "
    '(quant.method=hawq) has only a digits config (configs/'
    'digits_hawq.py); an ImageNet HAWQ config and the size budget in MB '
    'are missing',
  ),
  dict(
    source='HAWQ-V3',
    model='resnet18',
    dataset='ImageNet',
    setting='uniform W4A4, 5.8 MB',
    top1=68.45,
    float_top1=71.47,
    config=None,
    status='no config (uniform W4A4 ImageNet QAT is not '
    'configured; see the LSQ rows)',
  ),
  dict(
    source='HAWQ-V3',
    model='resnet50',
    dataset='ImageNet',
    setting='mixed precision, 16.0 MB',
    top1=74.89,
    float_top1=77.72,
    config=None,
    status='no config (as for ResNet-18)',
  ),
  dict(
    source='HAWQ-V3',
    model='resnet50',
    dataset='ImageNet',
    setting='uniform W4A4, 13.1 MB',
    top1=74.24,
    float_top1=77.72,
    config=None,
    status='no config',
  ),
  # HAQ: reinforcement-learning search.
  dict(
    source='HAQ',
    model='mobilenet_v2',
    dataset='ImageNet',
    setting='mixed precision (RL search), 1.79 MB',
    top1=71.47,
    float_top1=None,
    config=None,
    status='no config: fracq has no RL search; the FracBits counterpart '
    'at the same size is mobilenet_v2_fracbits.py with an absolute '
    'size budget (--config.quant.budget.absolute in bits), not set up',
  ),
  dict(
    source='HAQ',
    model='resnet50',
    dataset='ImageNet',
    setting='mixed precision (RL search), 12.14 MB',
    top1=76.14,
    float_top1=None,
    config=None,
    status='no config (as above, '
    'resnet50_fracbits.py with an absolute size budget)',
  ),
  # LSQ: uniform learned-step QAT, ResNet-18 (FP 70.5).
  *[
    dict(
      source='LSQ',
      model='resnet18',
      dataset='ImageNet',
      setting=f'uniform W{b}A{b}, learned step size',
      top1=t,
      float_top1=70.5,
      config='resnet18_fracbits',
      arg=f'bits={b}',
      overrides=[
        '--config.quant.method=uniform',
        f'--config.quant.uniform.weight_bits={b}',
        f'--config.quant.uniform.act_bits={b}',
        '--config.quant.uniform.act_range=lsq',
      ],
      init='resnet18',
      status='no dedicated config: an override of the FracBits '
      'ResNet-18 config to uniform LSQ (keys checked, run not tested; '
      'the LSQ paper trains 90 epochs, this schedule is 30)',
    )
    for b, t in ((2, 67.6), (3, 70.2), (4, 71.1))
  ],
  # F8Net: 8-bit fixed point, paper recipe trains from scratch.
  dict(
    source='F8Net',
    model='resnet18',
    dataset='ImageNet',
    setting='8-bit fixed point (float 70.3)',
    top1=71.0,
    float_top1=70.3,
    config='f8net_imagenet',
    arg='model=resnet18,recipe=train',
    overrides=[],
    init=None,
    status='targets this row (paper recipe: from scratch)',
  ),
  dict(
    source='F8Net',
    model='resnet50',
    dataset='ImageNet',
    setting='8-bit fixed point, ResNet-50b',
    top1=77.6,
    float_top1=77.6,
    config='f8net_imagenet',
    arg='model=resnet50,recipe=train',
    overrides=[],
    init=None,
    status="approximate: the paper's ResNet-50b variant; fracq's "
    'resnet50 is v1.5 (torchvision layout)',
  ),
  dict(
    source='F8Net',
    model='mobilenet_v2',
    dataset='ImageNet',
    setting='8-bit fixed point, MobileNet-V2b',
    top1=72.6,
    float_top1=72.7,
    config='f8net_imagenet',
    arg='model=mobilenet_v2,recipe=train',
    overrides=[],
    init=None,
    status="approximate: the paper's MobileNet-V2b variant; fracq's "
    'mobilenet_v2 is the standard one',
  ),
  dict(
    source='F8Net',
    model='mobilenet_v1',
    dataset='ImageNet',
    setting='8-bit fixed point',
    top1=72.8,
    float_top1=72.4,
    config=None,
    status='no config: f8net_imagenet.py offers resnet18, '
    'resnet50, mobilenet_v2; fracq has a mobilenet_v1 model, so '
    '--config.model=mobilenet_v1 may work but is not set up or tested',
  ),
]


def _apply_override(c, flag):
  """Checks that ``--config.a.b=v`` names an existing field of ``c``."""
  m = re.fullmatch(r'--config\.([\w.]+)=(.*)', flag)
  if not m:
    raise ValueError(f'not a config override: {flag}')
  node, *path = c, *m.group(1).split('.')
  for key in path[:-1]:
    node = node[key]
  if path[-1] not in node:
    raise KeyError(f'{flag}: the config has no field {m.group(1)!r}')


def command(row):
  if row.get('config') is None:
    return ''
  cfg = f'configs/{row["config"]}.py' + (f':{row["arg"]}' if row['arg'] else '')
  name = f'{row["config"]}_{row["arg"] or "default"}'
  name = name.replace('=', '').replace(',', '_')
  parts = [f'python launch.py --config={cfg}', f'--workdir=/tmp/{name}', DATA]
  if row.get('init'):
    parts.append(f'--config.init_from=/tmp/{row["init"]}')
  parts += row.get('overrides', [])
  return ' '.join(parts)


def check(row):
  """Builds the config (and checks override keys); returns '' or the error."""
  if row.get('config') is None:
    return ''
  try:
    mod = _runner.config_module(row['config'])
    c = mod.get_config(row['arg'] or None)
    for flag in row.get('overrides', []):
      _apply_override(c, flag)
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return ''


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=OUT, help='output directory')
  a = p.parse_args()
  records, errors = [], []
  for row in ROWS:
    err = check(row)
    if err:
      errors.append(f'{row["source"]} {row["model"]}: {err}')
    cmd = command(row)
    records.append(
      {
        'source': row['source'],
        'citation': SOURCES[row['source']],
        'model': row['model'],
        'dataset': row['dataset'],
        'setting': row['setting'],
        'published_top1': row['top1'],
        'published_float_top1': row.get('float_top1'),
        'config': (
          f'configs/{row["config"]}.py' if row.get('config') else None
        ),
        'config_arg': row.get('arg') or None,
        'command': cmd or None,
        'float_start_command': (
          _float_start(row['init']) if row.get('init') else None
        ),
        'status': row['status'],
        'config_builds': (not err) if cmd else None,
        'reproduced_here': False,
      }
    )
  lines = [
    'Published top-1 accuracies (not reproduced on this machine: ImageNet needs '
    'GPUs/TPUs for days), each beside the fracq config that targets the '
    'same model, budget and recipe. Runs that fine-tune start from a float '
    'model (`--config.init_from`), trained with `configs/imagenet_resnet50.py '
    '--config.model=MODEL` or imported from torchvision weights. Every '
    'config and override named here is checked to build when this file is '
    'generated. Float top-1 in brackets: as published, or for NNCF '
    'the top-1 plus its reported drop.',
    '',
    '| method (source) | model | data | setting | published top-1 '
    '(float) | fracq config | status |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in records:
    fl = (
      f' ({r["published_float_top1"]:.2f})'
      if r['published_float_top1'] is not None
      else ''
    )
    cfg = (
      (
        f'`{r["config"]}'
        + (f':{r["config_arg"]}' if r['config_arg'] else '')
        + '`'
      )
      if r['config']
      else '-'
    )
    lines.append(
      f'| {r["source"]} [{list(SOURCES).index(r["source"]) + 1}] '
      f'| {r["model"]} | {r["dataset"]} | {r["setting"]} | '
      f'{r["published_top1"]:.2f}{fl} | {cfg} | {r["status"]} |'
    )
  lines += [
    '',
    'Commands (DATA_DIR: the TFDS data directory; see the README '
    'section "Real datasets"):',
    '',
  ]
  for r in records:
    if r['command']:
      lines.append(f'* {r["source"]} {r["model"]} {r["setting"]}:')
      if r['float_start_command']:
        lines.append(f'  `{r["float_start_command"]}` then')
      lines.append(f'  `{r["command"]}`')
  lines += ['', 'Sources:', '']
  lines += [f'{i}. {k}: {v}' for i, (k, v) in enumerate(SOURCES.items(), 1)]
  if errors:
    lines += ['', 'Configs that did not build:', '']
    lines += [f'* {e}' for e in errors]
  text = '\n'.join(lines) + '\n'
  os.makedirs(a.out, exist_ok=True)
  _runner.write_md(os.path.join(a.out, 'published_imagenet.md'), text)
  _runner.write_json(
    os.path.join(a.out, 'published_imagenet.json'),
    {'sources': SOURCES, 'rows': records},
  )
  print(text)
  if errors:
    print('\n'.join(errors), file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
