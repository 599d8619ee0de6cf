"""``python -m fracq.tools.import_weights``: torchvision weights in, a
checkpoint ``init_from`` reads out, checked against PyTorch's logits."""

import functools
import glob
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import models
from fracq.tools import import_weights as tool
from fracq.train import checkpoint as ckpt_lib

tref = pytest.importorskip('tests.torch_reference')
torch = tref.torch

NUM_CLASSES = 10


@pytest.fixture(scope='module')
def resnet18(tmp_path_factory):
  """A torchvision-layout ResNet-18 (10 classes, random BatchNorm), its
  weights as .pth and .npz, a batch and PyTorch's logits on it."""
  root = tmp_path_factory.mktemp('weights')
  torch.manual_seed(0)
  net = tref.TorchResNet18(num_classes=NUM_CLASSES).eval()
  with torch.no_grad():
    tref.randomise_bn(net, 1)
  images = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    logits = net(torch.tensor(images)).numpy()
  state = {k: t.numpy() for k, t in net.state_dict().items()}
  pth, npz = str(root / 'r18.pth'), str(root / 'r18.npz')
  torch.save(net.state_dict(), pth)
  np.savez(npz, **state)
  return {
    'pth': pth,
    'npz': npz,
    'state': state,
    'images': jnp.asarray(images.transpose(0, 2, 3, 1)),
    'logits': logits,
  }


def _run(capsys, *args):
  status = tool.main(list(args))
  out = capsys.readouterr()
  return status, out.out + out.err


def _snapshot(workdir):
  """Every file under ``workdir`` with its bytes."""
  files = {}
  for path in glob.glob(os.path.join(workdir, '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope='module')
def imported(resnet18, tmp_path_factory):
  """A workdir that the command filled from the .pth."""
  workdir = str(tmp_path_factory.mktemp('runs') / 'r18')
  status = tool.main(
    ['--model=resnet18', f'--weights={resnet18["pth"]}', f'--workdir={workdir}']
  )
  assert status == 0
  return workdir


def _logits(variables, images):
  net = models.get_model('resnet18', num_classes=NUM_CLASSES)
  return np.asarray(net.apply(variables, images, train=False))


def test_pth_import_gives_pytorch_logits_through_init_from(resnet18, imported):
  variables = ckpt_lib.load_variables(imported, 'params,batch_stats')
  np.testing.assert_allclose(
    _logits(variables, resnet18['images']),
    resnet18['logits'],
    atol=1e-4,
    rtol=1e-4,
  )
  # What a run with --config.init_from does next: merge into the model's
  # own variables (same tree, same shapes).
  net = models.get_model('resnet18', num_classes=NUM_CLASSES)
  shapes = jax.eval_shape(
    lambda: net.init(jax.random.key(0), resnet18['images'], train=False)
  )
  merged = ckpt_lib.merge_variables(dict(shapes), variables)
  np.testing.assert_array_equal(
    merged['params']['fc']['kernel'], resnet18['state']['fc.weight'].T
  )
  np.testing.assert_array_equal(
    merged['batch_stats']['stage2_block0']['downsample_bn']['var'],
    resnet18['state']['layer2.0.downsample.1.running_var'],
  )
  with open(os.path.join(imported, tool.METADATA_FILE)) as f:
    meta = json.load(f)
  with open(resnet18['pth'], 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert meta['model'] == 'resnet18'
  assert meta['model_kwargs'] == {'num_classes': NUM_CLASSES}
  assert meta['weights_sha256'] == digest
  assert meta['parameters'] == sum(
    value.size
    for key, value in resnet18['state'].items()
    if key.rsplit('.', 1)[1] in ('weight', 'bias')
  )


def test_npz_import_equals_pth_import(resnet18, imported, tmp_path, capsys):
  workdir = str(tmp_path / 'from_npz')
  status, text = _run(
    capsys,
    '--model',
    'resnet18',
    '--weights',
    resnet18['npz'],
    '--workdir',
    workdir,
  )
  assert status == 0, text
  assert f'--config.init_from={workdir}' in text
  from_npz = ckpt_lib.load_variables(workdir, 'params,batch_stats')
  from_pth = ckpt_lib.load_variables(imported, 'params,batch_stats')
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_npz, from_pth)
  np.testing.assert_allclose(
    _logits(from_npz, resnet18['images']),
    resnet18['logits'],
    atol=1e-4,
    rtol=1e-4,
  )


def _refused(capsys, workdir, *args):
  """Runs the command expecting a refusal; ``workdir`` must not change and
  no temporary directory may stay beside it."""
  before = _snapshot(workdir)
  siblings = sorted(os.listdir(os.path.dirname(workdir)))
  status, text = _run(capsys, *args, f'--workdir={workdir}')
  assert status == 1
  assert _snapshot(workdir) == before
  assert sorted(os.listdir(os.path.dirname(workdir))) == siblings
  return text


def test_unknown_model_lists_the_importable_ones(resnet18, imported, capsys):
  text = _refused(
    capsys,
    imported,
    '--model=resnet19',
    f'--weights={resnet18["pth"]}',
    '--overwrite',
  )
  assert (
    "model 'resnet19'; importable: inception_v3, mobilenet_v2, resnet18, "
    'resnet34, resnet50 (' in text
  )
  text = _refused(
    capsys,
    imported,
    '--model=resnet18',
    f'--weights={resnet18["pth"]}',
    '--overwrite',
    '--transform_input',
  )
  assert '--transform_input applies to inception_v3 only' in text


def test_mismatched_weights_name_keys_and_shapes(
  resnet18, imported, tmp_path, capsys
):
  state = dict(resnet18['state'])
  del state['layer2.0.conv1.weight']
  state['layer9.extra'] = np.zeros(3, np.float32)
  state['layer1.0.bn1.weight'] = np.ones(32, np.float32)
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, **state)
  text = _refused(
    capsys, imported, '--model=resnet18', f'--weights={bad}', '--overwrite'
  )
  assert "does not fit model 'resnet18'" in text
  assert "missing ['layer2.0.conv1.weight']" in text
  assert "unexpected ['layer9.extra']" in text
  assert 'layer1.0.bn1.weight: checkpoint (32,) vs model (64,)' in text


def test_corrupt_weights_files_are_refused(
  resnet18, imported, tmp_path, capsys
):
  truncated = str(tmp_path / 'truncated.pth')
  with open(resnet18['pth'], 'rb') as f:
    data = f.read()
  with open(truncated, 'wb') as f:
    f.write(data[: len(data) // 2])
  text = _refused(
    capsys,
    imported,
    '--model=resnet18',
    f'--weights={truncated}',
    '--overwrite',
  )
  assert f'Cannot read --weights {truncated} as a state dict' in text
  state = dict(resnet18['state'])
  state['fc.bias'] = np.full(NUM_CLASSES, np.nan, np.float32)
  nan = str(tmp_path / 'nan.npz')
  np.savez(nan, **state)
  text = _refused(
    capsys, imported, '--model=resnet18', f'--weights={nan}', '--overwrite'
  )
  assert "non-finite values (NaN or inf) in ['fc.bias']" in text
  text = _refused(
    capsys,
    imported,
    '--model=resnet18',
    f'--weights={tmp_path / "absent.pth"}',
    '--overwrite',
  )
  assert 'no such file' in text


def test_existing_workdir_needs_overwrite(resnet18, imported, capsys):
  text = _refused(
    capsys, imported, '--model=resnet18', f'--weights={resnet18["npz"]}'
  )
  assert f'--workdir {imported} is not empty' in text
  assert '--overwrite' in text


def test_overwrite_moves_the_previous_import_aside(resnet18, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  args = ['--model=resnet18', f'--workdir={workdir}']
  assert _run(capsys, *args, f'--weights={resnet18["pth"]}')[0] == 0
  first = _snapshot(workdir)
  status, text = _run(
    capsys, *args, f'--weights={resnet18["npz"]}', '--overwrite'
  )
  assert status == 0, text
  (previous,) = glob.glob(os.path.join(workdir, 'previous-*'))
  assert _snapshot(previous) == first
  with open(os.path.join(workdir, tool.METADATA_FILE)) as f:
    assert json.load(f)['weights_file'] == 'r18.npz'
  assert sorted(os.listdir(tmp_path)) == ['run']


@pytest.mark.parametrize(
  'name,reference,side',
  [
    ('resnet50', tref.TorchResNet50, 32),
    # The smallest input torchvision's Inception-V3 takes; its ImageNet
    # weights come with transform_input=True, which the import folds in.
    (
      'inception_v3',
      functools.partial(tref.TorchInceptionV3, transform_input=True),
      75,
    ),
  ],
  ids=['resnet50', 'inception_v3'],
)
def test_bottleneck_and_inception_import_gives_pytorch_logits(
  name, reference, side, tmp_path, capsys
):
  torch.manual_seed(0)
  net = reference(num_classes=NUM_CLASSES).eval()
  with torch.no_grad():
    tref.randomise_bn(net, 1)
  images = np.random.RandomState(0).randn(2, 3, side, side).astype(np.float32)
  with torch.no_grad():
    logits = net(torch.tensor(images)).numpy()
  weights = str(tmp_path / f'{name}.npz')
  np.savez(weights, **{k: t.numpy() for k, t in net.state_dict().items()})
  workdir = str(tmp_path / name)
  status, text = _run(
    capsys, f'--model={name}', f'--weights={weights}', f'--workdir={workdir}'
  )
  assert status == 0, text
  variables = ckpt_lib.load_variables(workdir, 'params,batch_stats')
  net = models.get_model(name, num_classes=NUM_CLASSES)
  # Compiled: op-by-op dispatch of these deep models is slower on CPU.
  out = jax.jit(lambda v, x: net.apply(v, x, train=False))(
    variables, jnp.asarray(images.transpose(0, 2, 3, 1))
  )
  np.testing.assert_allclose(out, logits, atol=1e-4, rtol=1e-4)


def test_folded_transform_input_equals_torchvision_transform():
  # The Inception stem (unpadded, bias-free conv, BatchNorm eps 0.001) on a
  # small image: torchvision's transform_input then the original weights
  # equal the folded weights on the untransformed input.
  torch.manual_seed(0)
  stem = tref.TorchInceptionV3(num_classes=NUM_CLASSES).Conv2d_1a_3x3.eval()
  with torch.no_grad():
    tref.randomise_bn(stem, 2)
  state = {
    f'Conv2d_1a_3x3.{k}': t.numpy().copy() for k, t in stem.state_dict().items()
  }
  folded = tool.fold_transform_input(state)
  x = torch.randn(2, 3, 9, 9)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  with torch.no_grad():
    want = stem(x * (std / 0.5) + (mean - 0.5) / 0.5).numpy()
    stem.load_state_dict(
      {
        k.split('.', 1)[1]: torch.tensor(v) for k, v in folded.items() if v.ndim
      },
      strict=False,
    )
    got = stem(x).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert not np.allclose(
    folded['Conv2d_1a_3x3.conv.weight'], state['Conv2d_1a_3x3.conv.weight']
  )
