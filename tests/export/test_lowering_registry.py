"""The lowering registry: lower() dispatches on the wrapper's class."""

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
