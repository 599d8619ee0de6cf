"""Flax NNX front end: quantize ``nnx.Module`` models with fracq's rules.

The same rules, methods (uniform QAT with every range method, FracBits with
budgets, penalty and hard assignment) and core math as the linen front end,
driven through the same providers (see :mod:`fracq.nnx.qat`).
``fracq.quantize`` hands an ``nnx.Module`` to :func:`quantize`, which
returns a :class:`QATModule` holding a quantized copy of the model (the
model passed in is left intact):

```python
import fracq
import fracq.nnx
import optax
from flax import nnx
from fracq import Budget, FracBitsSpec, Rule, TensorSpec, export

rules = [
  fracq.fixed_bits(r'^conv_init$|^head$', bits=8),  # first/last at 8 bits
  Rule(
    module_path='.*',  # the rest: FracBits
    weight=FracBitsSpec(bits=3.5, granularity='channel'),
    act=TensorSpec(bits=8),
  ),
]
my_nnx_model.eval()  # quantization runs the model once, like linen's init
qmodel = fracq.quantize(  # a quantized copy; my_nnx_model is left intact
  my_nnx_model,
  rules,
  sample_batch,
  budget=Budget(kind='size', uniform_bits=3),
  hard_assign_step=8000,
)
qmodel.calibrate(sample_batch)  # ranges from real data/weights
qmodel.train()  # BatchNorm and quantizer statistics update
# QuantParam (steps, ranges, bits) is an nnx.Param: trained with the weights.
optimizer = nnx.Optimizer(qmodel, optax.sgd(0.05), wrt=nnx.Param)


@nnx.jit
def train_step(qmodel, optimizer, x, y, step):
  def loss_fn(qmodel):
    logits = qmodel(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    penalty, _ = qmodel.penalty(step)  # the budget penalty
    return ce + penalty

  loss, grads = nnx.value_and_grad(loss_fn)(qmodel)
  optimizer.update(qmodel, grads)
  return loss


loss = train_step(qmodel, optimizer, sample_batch, labels, 0)
print(qmodel.layer_table())  # what was quantized, MACs, rules
qmodel.for_step(8000)  # after the search: integer bits, frozen in QuantStat
print(qmodel.report())  # per-layer bit table
stats = nnx.state(qmodel, fracq.nnx.QuantStat)  # observers, frozen bits
size = export.export_model(  # the packed artifact
  qmodel, qmodel.linen_variables(), artifact_path
)
```

Beyond the packed artifact, the integer-only program and ONNX go through
the model's *linen twin* (:func:`to_linen`): the linen module computing the
same function with the same layer names, quantized by the same rules and
checked against the NNX model (layers, variables, outputs). Lowerable NNX
models are those with a twin the linen QAT lowering supports: chains of
``nnx.Conv`` / ``nnx.Linear`` layers with BatchNorm, ReLU and a final
global average pool, under uniform QAT or hard-assigned FracBits, such as
:class:`fracq.nnx.models.DigitsCNN` (its ``linen_module()`` names its
twin). Residual networks (:class:`fracq.nnx.models.ResNet`) and
transformers have twins but the QAT lowering refuses them (residual
programs are F8Net's, linen-only): they export the packed artifact. HAWQ:
:func:`hawq` (the Hessian search on the float NNX model, then uniform QAT at
the chosen bits). F8Net runs on linen models only: it folds BatchNorm into
the layers through the linen interceptor's whole-module hooks and probes
the linen structure for residual entries, neither of which an NNX model
offers; ``F8NetModel`` refuses NNX models, naming the linen twin.

Data parallelism: quantize with ``axis_name='batch'`` (the mesh axis of the
batch) and train under ``nnx.shard_map``, averaging the gradients over that
axis (observers and LSQ gradient scales then see the global batch; give
BatchNorm the axis too, e.g. ``DigitsCNN(..., bn_axis_name='batch')``), or
under ``jax.jit`` with the state replicated and the batch sharded; both
compute what one device computes on the whole batch.

The training loop: ``launch.py --config=configs/digits_fracbits.py
--config.model_api=nnx`` trains :class:`fracq.nnx.models.DigitsCNN` with
the config's method, budget and hard assignment, and exports it
(:class:`fracq.nnx.training.NNXLoopModel`).
"""

from fracq.nnx.bit_search import hawq
from fracq.nnx.f8net import F8NetModule
from fracq.nnx.f8net import f8net
from fracq.nnx.layers import SUPPORTED_LAYERS
from fracq.nnx.layers import QuantizedLayer
from fracq.nnx.layers import layer_type_of
from fracq.nnx.linen_twin import to_linen
from fracq.nnx.qat import QATModule
from fracq.nnx.qat import quantize
from fracq.nnx.variables import VARIABLE_TYPES
from fracq.nnx.variables import QuantParam
from fracq.nnx.variables import QuantStat

__all__ = [
  'SUPPORTED_LAYERS',
  'VARIABLE_TYPES',
  'F8NetModule',
  'QATModule',
  'QuantParam',
  'QuantStat',
  'QuantizedLayer',
  'f8net',
  'hawq',
  'layer_type_of',
  'quantize',
  'to_linen',
]
