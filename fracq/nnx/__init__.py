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
models are those with a twin the linen QAT lowering supports, under
uniform QAT or hard-assigned FracBits: convolutional networks with
BatchNorm, ReLU / ReLU6, depthwise convolutions, residual adds,
concatenations and average / max pools, such as
:class:`fracq.nnx.models.DigitsCNN` and :class:`fracq.nnx.models.ResNet`
(their ``linen_module()`` names the twin). Transformers have twins but the
QAT lowering refuses attention: they export the packed artifact. HAWQ:
:func:`hawq` (the Hessian search on the float NNX model, then uniform QAT at
the chosen bits). F8Net: :func:`f8net` returns an :class:`F8NetModule`, an
NNX module whose state (weights, BatchNorm statistics, activation formats,
PACT clips) is NNX variables and whose computation is linen F8Net on the
model's twin (F8Net folds BatchNorm through whole-module hooks and probes
the linen structure for residual entries); ``nnx.grad`` and
``nnx.Optimizer`` train it, and ``to_linen(fmodel)`` gives the F8Net model
and variables its integer program and ONNX export take:

```python
fmodel = fracq.nnx.f8net(my_nnx_model, sample_batch)  # a copy, under F8Net
optimizer = nnx.Optimizer(fmodel, optax.sgd(0.05), wrt=nnx.Param)
...  # train as above (fmodel.train(); no penalty)
fmodel.eval()
f8model, variables = fracq.nnx.to_linen(fmodel)
program = export.lower(f8model, variables, sample_batch)
```

Data parallelism: quantize with ``axis_name='batch'`` (the mesh axis of the
batch) and train under ``nnx.shard_map``, averaging the gradients over that
axis (observers and LSQ gradient scales then see the global batch; give
BatchNorm the axis too, e.g. ``DigitsCNN(..., bn_axis_name='batch')``), or
under ``jax.jit`` with the state replicated and the batch sharded; both
compute what one device computes on the whole batch.

The training loop: ``launch.py --config=configs/digits_fracbits.py
--config.model_api=nnx`` trains :class:`fracq.nnx.models.DigitsCNN` with
the config's method, budget and hard assignment, and exports it
(:class:`fracq.nnx.training.NNXLoopModel`); the uniform and F8Net digits
configs take ``model_api=nnx`` too (F8Net:
:class:`fracq.nnx.training.NNXF8NetLoopModel`).
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
