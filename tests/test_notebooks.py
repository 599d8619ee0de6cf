"""Executes every experiments/*.ipynb end to end (nbclient), as a user would.

Each notebook runs in a fresh IPython kernel started from *this* Python
(``sys.executable``, through a kernelspec written to a temporary directory),
so the test does not depend on which kernelspecs the machine has installed.
The kernel's working directory is ``experiments/``, where a user opening the
notebook from the checkout would be; outside Colab the notebooks import fracq
from the checkout. Any cell error fails the test, naming the cell.
"""

import glob
import json
import os
import re
import sys
import time

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')
NOTEBOOKS = sorted(glob.glob(os.path.join(EXPERIMENTS, '*.ipynb')))
CELL_TIMEOUT_S = 600


def _kernel_manager(tmp_path):
  """A kernel manager whose 'python3' kernel is this interpreter."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  kdir = tmp_path / 'kernels' / 'python3'
  kdir.mkdir(parents=True)
  (kdir / 'kernel.json').write_text(
    json.dumps(
      {
        'argv': [
          sys.executable,
          '-m',
          'ipykernel_launcher',
          '-f',
          '{connection_file}',
        ],
        'display_name': 'Python 3 (fracq tests)',
        'language': 'python',
        # PYTHONPATH stands in for `pip install -e .` when the checkout
        # under test is not the installed one (the first cell would install
        # it otherwise).
        'env': {
          'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
          'PYTHONPATH': os.pathsep.join(
            filter(None, [ROOT, os.environ.get('PYTHONPATH')])
          ),
        },
      }
    )
  )
  ksm = KernelSpecManager(
    kernel_dirs=[str(tmp_path / 'kernels')], ensure_native_kernel=False
  )
  return KernelManager(kernel_name='python3', kernel_spec_manager=ksm)


def _execute(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    km=_kernel_manager(tmp_path),
    timeout=CELL_TIMEOUT_S,
    kernel_name='python3',
    allow_errors=False,
    resources={'metadata': {'path': EXPERIMENTS}},
  )
  t = time.time()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{os.path.basename(path)}: a cell raised:\n{e}')
  return nb, time.time() - t


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    if cell.cell_type != 'code':
      continue
    for o in cell.get('outputs', []):
      if o.get('output_type') == 'stream':
        out.append(o.get('text', ''))
      elif 'data' in o:
        out.append(o['data'].get('text/markdown', ''))
        out.append(o['data'].get('text/plain', ''))
  return '\n'.join(out)


def _images(nb) -> int:
  return sum(
    'image/png' in o.get('data', {})
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.get('outputs', [])
  )


def test_notebooks_are_found_and_stored_without_outputs():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {'quickstart.ipynb', 'results_walkthrough.ipynb'} <= names
  for p in NOTEBOOKS:
    nb = nbformat.read(p, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, (
          f'{os.path.basename(p)} is stored with outputs; clear them.'
        )
    # The first code cell installs the checkout the notebook sits in
    # (editable, with its requirements) only when fracq cannot be imported,
    # and never edits sys.path.
    first = next(c for c in nb.cells if c.cell_type == 'code').source
    assert 'sys.path' not in first, first
    assert 'requirements.txt' in first and '-e {root}' in first, first
    assert 'except ImportError' in first and 'site.addsitedir' in first, first
    assert '<owner>' not in first and 'git+' not in first, first


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_install_cell_needs_no_network_when_fracq_imports(path, monkeypatch):
  """With fracq importable (as here), the install cell never reaches pip:
  ``get_ipython`` (the only way the cell can run pip) must not be called."""
  nb = nbformat.read(path, as_version=4)
  first = next(c for c in nb.cells if c.cell_type == 'code').source

  def no_ipython():
    raise AssertionError('the install cell ran pip although fracq imports')

  monkeypatch.chdir(EXPERIMENTS)
  env = {'get_ipython': no_ipython}
  exec(compile(first, os.path.basename(path), 'exec'), env)  # pylint: disable=exec-used
  assert os.path.samefile(
    os.path.dirname(env['fracq'].__file__), os.path.join(ROOT, 'fracq')
  )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path):
  nb, seconds = _execute(path, tmp_path)
  text = _text(nb)
  name = os.path.basename(path)
  print(f'{name}: executed in {seconds:.1f} s')
  if name == 'quickstart.ipynb':
    m = re.search(r'^QUICKSTART_SUMMARY (\{.*\})$', text, re.M)
    assert m, 'the quickstart did not print its summary'
    s = json.loads(m.group(1))
    # It really trained: the digits are easy, but not for a random model.
    assert s['float_acc'] > 0.9 and s['fracbits_acc'] > 0.9, s
    # The packed artifact exists, is near its theoretical size and is well
    # below INT8 (3-bit budget, first/last layer at 8 bits).
    assert 0 < s['artifact_bytes'] <= 1.1 * s['theoretical_bytes'], s
    assert s['artifact_bytes'] < 0.6 * s['int8_artifact_bytes'], s
    assert 2.5 < s['mean_kernel_bits'] < 4.0, s
    assert 'packed artifact (on disk)' in text
    # The integer-only program was written and agrees with the fake-quant
    # model on the whole test set.
    assert s['program_bytes'] > 0
    assert s['integer_prediction_match'] >= 0.99, s
    assert s['integer_max_logit_diff_rel'] < 1e-2, s
    assert 'int32' in text and 'same class' in text
  elif name == 'nnx_quickstart.ipynb':
    m = re.search(r'^NNX_QUICKSTART_SUMMARY (\{.*\})$', text, re.M)
    assert m, 'the NNX quickstart did not print its summary'
    s = json.loads(m.group(1))
    # Tiny options (seconds): it ran through hard assignment, not to
    # accuracy; 10 classes, so chance is 0.1.
    assert s['hard'] and 0.0 <= s['accuracy'] <= 1.0, s
    assert set(s['hard_bits']) == {'conv1', 'conv2', 'conv3', 'conv4'}, s
    assert all(2 <= b <= 8 for b in s['hard_bits'].values()), s
    # The artifact stores each kernel at its frozen bits, below INT8.
    assert s['artifact_bits'] == s['hard_bits'], s
    assert s['artifact_bytes'] < s['int8_artifact_bytes'], s
    # The integer program and ONNX predict what the NNX model predicts.
    assert s['integer_prediction_match'] >= 0.99, s
    assert s['onnx_prediction_match'] == 1.0, s
  elif name == 'results_walkthrough.ipynb':
    assert 'WALKTHROUGH_DONE' in text
    # Tables from the checked-in results, and the plots.
    assert 'FracBits' in text and 'HAWQ + QAT' in text
    assert 'vs float' in text
    assert _images(nb) >= 3, _images(nb)
