"""The lowering registry: lower() dispatches on the wrapper's class."""

import subprocess
import sys

import pytest

from fracq import export
from fracq.export import IntegerProgram
from fracq.export.lowering import registry
from fracq.methods.f8net import F8NetModel
from fracq.methods.qat import QATModel


@pytest.fixture
def scratch_registry(monkeypatch):
  """Registrations made in a test are dropped after it."""
  monkeypatch.setattr(registry, '_BY_METHOD', dict(registry._BY_METHOD))


def test_methods_register_their_lowerings():
  found = export.lowering.registered_lowerings()
  assert found['qat'].wrapper_type is QATModel
  assert found['qat'].lower is export.lower_qat
  assert found['f8net'].wrapper_type is F8NetModel
  assert found['f8net'].lower is export.lower_f8net


def test_dispatch_by_class_and_subclass():
  class Tuned(QATModel):
    pass

  # The wrappers are never built: dispatch looks at the class only.
  assert export.lowering_for(object.__new__(F8NetModel)).method == 'f8net'
  assert export.lowering_for(object.__new__(Tuned)).method == 'qat'


def test_a_new_method_lowers_without_editing_the_dispatch(scratch_registry):
  class Wrapper:
    pass

  @export.register_lowering('toy', Wrapper)
  def lower_toy(wrapper, variables, sample_x, *, scale=1.0):
    del wrapper, variables, sample_x
    return IntegerProgram([], scale, (0, 255), 'toy')

  assert export.lower(Wrapper(), {}, None).kind == 'toy'
  assert export.lower(Wrapper(), {}, None, scale=0.5).input_scale == 0.5
  with pytest.raises(ValueError, match="'toy' is already registered"):
    export.register_lowering('toy', int)(lower_toy)
  with pytest.raises(ValueError, match="already lowered by method 'toy'"):
    export.register_lowering('toy2', Wrapper)(lower_toy)


def test_unknown_wrappers_are_refused_clearly():
  with pytest.raises(ValueError, match='no integer lowering.*f8net'):
    export.lower(object(), {}, None)


def test_registration_does_not_depend_on_import_order():
  """Importing a method's lowering first (it imports fracq.export, which
  imports it back) still registers both lowerings."""
  code = (
    'import fracq.methods.uniform.lowering\n'
    'from fracq import export\n'
    'from fracq.export import lower_qat\n'
    "assert sorted(export.lowering.registered_lowerings()) == ['f8net', 'qat']\n"
    'assert lower_qat is fracq.methods.uniform.lowering.lower_qat\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
