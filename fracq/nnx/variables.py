"""The NNX variable types of quantizer state.

Linen keeps a quantizer's variables in two collections; the NNX front end
keeps the same variables, under the same names, as two ``nnx.Variable``
types on the layer's wrapper:

* :class:`QuantParam` (linen ``quant``): trainable quantizer parameters,
  LSQ steps and offsets, PACT clips, FracBits ranges and learned bits. It
  is an ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
  trains it with the weights, as linen's training loop trains ``params``
  and ``quant`` together; filter it on its own with ``QuantParam`` or leave
  it out with ``nnx.All(nnx.Param, nnx.Not(QuantParam))``.
* :class:`QuantStat` (linen ``quant_stats``): statistics and frozen state,
  observer minima and maxima, the integer bits written by hard assignment,
  pruning masks. Not an ``nnx.Param``: optimizers leave it alone.
"""

from __future__ import annotations

from flax import nnx

from fracq.methods.common import STATE
from fracq.methods.common import TRAINABLE

__all__ = [
  'QuantParam',
  'QuantStat',
  'VARIABLE_TYPES',
  'variable_type',
]


class QuantParam(nnx.Param):
  """A trainable quantizer parameter (linen collection ``quant``)."""


class QuantStat(nnx.Variable):
  """A quantizer statistic or frozen state (linen collection
  ``quant_stats``)."""


# The NNX type of each linen collection a provider declares variables in.
VARIABLE_TYPES: dict[str, type[nnx.Variable]] = {
  TRAINABLE: QuantParam,
  STATE: QuantStat,
}


def variable_type(collection: str) -> type[nnx.Variable]:
  """The NNX variable type of a provider's ``collection``.

  Raises:
    ValueError: for a collection no NNX type stands for.
  """
  try:
    return VARIABLE_TYPES[collection]
  except KeyError:
    raise ValueError(
      f'A provider declared a variable in collection {collection!r}, which '
      f'the NNX front end has no variable type for (known: '
      f'{sorted(VARIABLE_TYPES)}); add it to fracq.nnx.VARIABLE_TYPES.'
    ) from None
