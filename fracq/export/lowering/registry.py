"""The lowering registry: which function lowers which method's models.

Each method registers its lowering once, under the method's name (the
``kind`` of the programs it produces) and the model-wrapper class it lowers;
:func:`lower` finds the lowering from the wrapper's class (its closest
registered base class), so adding a method never edits the dispatch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fracq.export.program import IntegerProgram


@dataclasses.dataclass(frozen=True)
class Lowering:
  """A registered lowering.

  Attributes:
    method: the method's name; the ``kind`` of the programs it produces.
    wrapper_type: the model-wrapper class it lowers (and its subclasses).
    lower: ``lower(wrapper, variables, sample_x, **options) ->
      IntegerProgram``.
  """

  method: str
  wrapper_type: type
  lower: Callable[..., IntegerProgram]


_BY_METHOD: dict[str, Lowering] = {}


def register_lowering(method: str, wrapper_type: type):
  """Registers the decorated function as the lowering of ``method``.

  Raises:
    ValueError: ``method`` or ``wrapper_type`` already has a lowering.
  """

  def register(fn: Callable[..., IntegerProgram]):
    if method in _BY_METHOD:
      raise ValueError(
        f'A lowering for method {method!r} is already registered '
        f'({_BY_METHOD[method].lower.__module__}); each method has one.'
      )
    for entry in _BY_METHOD.values():
      if entry.wrapper_type is wrapper_type:
        raise ValueError(
          f'{wrapper_type.__name__} is already lowered by method '
          f'{entry.method!r}.'
        )
    _BY_METHOD[method] = Lowering(method, wrapper_type, fn)
    return fn

  return register


def registered_lowerings() -> dict[str, Lowering]:
  """Method name -> :class:`Lowering`, in registration order."""
  return dict(_BY_METHOD)


def lowering_for(wrapper) -> Lowering:
  """The lowering of ``wrapper``'s class (the closest registered base).

  Raises:
    ValueError: no method lowers this kind of model.
  """
  by_type = {entry.wrapper_type: entry for entry in _BY_METHOD.values()}
  for cls in type(wrapper).__mro__:
    if cls in by_type:
      return by_type[cls]
  known = ', '.join(
    f'{entry.method} ({entry.wrapper_type.__name__})'
    for entry in _BY_METHOD.values()
  )
  raise ValueError(
    f'{type(wrapper).__name__} has no integer lowering; use a quantized '
    f'model (uniform QAT, FracBits or F8Net). Lowerings: {known}.'
  )


def lower(wrapper, variables, sample_x, **options) -> IntegerProgram:
  """The integer program of a trained quantized model, by its method.

  Args:
    wrapper: the model wrapper (a ``QATModel`` for uniform QAT / FracBits,
      an ``F8NetModel``, ...).
    variables: its variables.
    sample_x: a batch; the lowering verifies the program on it.
    **options: the method's lowering options (e.g. ``verify``,
      ``tolerance``).
  """
  return lowering_for(wrapper).lower(wrapper, variables, sample_x, **options)
