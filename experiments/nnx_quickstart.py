"""FracBits on an NNX model: the digits quickstart written with flax.nnx.

Builds the digits CNN in NNX (``fracq.nnx.models.DigitsCNN``), quantizes it
with the README's rules (first conv and classifier at 8 bits, every other
conv learning a fractional weight bit-width under the size budget of a
uniform 3-bit model, 8-bit activations), trains it with ``nnx.Optimizer``
and ``nnx.jit`` (task loss + the budget penalty), hard-assigns integer bits
at 80% of training, fine-tunes, then writes the packed artifact with
``fracq.export.export_model`` and, through the model's checked linen twin
(``fracq.nnx.to_linen``), the integer-only program and the ONNX QDQ model,
each compared with the NNX model on the test images. About a minute on 2
CPU cores; ``--smoke`` runs a few steps.

  python experiments/nnx_quickstart.py --out /tmp/nnx_fb [--steps 440]
"""

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fracq
import fracq.nnx as fnnx
from fracq import export
from fracq.data import digits
from fracq.export import onnx_export
from fracq.nnx.models import DigitsCNN

BATCH = 128


def rules():
  return [
    fracq.fixed_bits(r'^conv_init$|^head$', bits=8),  # first/last at 8 bits
    fracq.Rule(
      module_path='.*',  # the rest: FracBits
      weight=fracq.FracBitsSpec(bits=3.5, granularity='channel'),
      act=fracq.TensorSpec(bits=8),
    ),
  ]


def accuracy(qmodel, batch_size=BATCH) -> float:
  qmodel.eval()
  predict = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))
  correct = total = 0
  for batch in digits.eval_batches(batch_size):
    pred = np.asarray(predict(qmodel, jnp.asarray(batch['image'])))
    correct += int(np.sum((pred == batch['label']) & batch['mask']))
    total += int(np.sum(batch['mask']))
  qmodel.train()
  return correct / total


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='/tmp/nnx_quickstart')
  parser.add_argument('--steps', type=int, default=440)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--smoke', action='store_true', help='a few steps')
  args = parser.parse_args(argv)
  steps = 4 if args.smoke else args.steps
  hard_step = int(0.8 * steps)
  start = time.time()

  widths = (8, 8, 8, 8, 8) if args.smoke else (32, 64, 64, 128, 128)
  model = DigitsCNN(widths=widths, rngs=nnx.Rngs(args.seed))
  model.eval()  # the quantization passes, as linen's init(train=False)
  sample = jnp.asarray(digits.load_digits_split()[0][:BATCH])
  qmodel = fnnx.quantize(
    model,
    rules(),
    sample,
    budget=fracq.Budget(kind='size', uniform_bits=3),
    hard_assign_step=hard_step,
  )
  print(qmodel.layer_table())
  qmodel.train()
  schedule = optax.cosine_decay_schedule(0.1, steps)
  optimizer = nnx.Optimizer(
    qmodel, optax.sgd(schedule, momentum=0.9, nesterov=True), wrt=nnx.Param
  )

  @nnx.jit
  def train_step(qmodel, optimizer, images, labels, step):
    def loss_fn(qmodel):
      logits = qmodel(images)
      task = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
      ).mean()
      penalty, _ = qmodel.penalty(step)
      return task + penalty, task

    (_, task), grads = nnx.value_and_grad(loss_fn, has_aux=True)(qmodel)
    optimizer.update(qmodel, grads)
    return task

  for step in range(steps):
    qmodel.for_step(step)  # hard assignment at hard_step
    batch = digits.train_batch(step, BATCH, args.seed)
    task = train_step(
      qmodel,
      optimizer,
      jnp.asarray(batch['image']),
      jnp.asarray(batch['label']),
      jnp.asarray(step, jnp.float32),
    )
    if step % 55 == 0 or step == steps - 1:
      print(f'step {step:4d}  loss {float(task):.4f}  hard {qmodel.hard}')
  qmodel.for_step(steps)
  print(qmodel.report(args.out, steps))
  acc = accuracy(qmodel)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'model.fracq.safetensors')
  size = export.export_model(
    qmodel, qmodel.linen_variables(), path, overwrite=True
  )
  print(size.format())
  # The integer program and ONNX, through the linen twin (checked to
  # compute what the NNX model computes on these images).
  images = jnp.asarray(digits.load_digits_split()[2])
  wrapper, variables = fnnx.to_linen(qmodel, images)
  program_path = os.path.join(args.out, 'model.int.safetensors')
  integer = export.export_integer(
    wrapper, variables, images, program_path, overwrite=True
  )
  onnx_path = os.path.join(args.out, 'model.onnx')
  onnx = onnx_export.export_onnx(
    wrapper, variables, images, onnx_path, overwrite=True
  )
  print(
    f'integer program: {integer["program_bytes"]:,} bytes, predictions '
    f'{integer["integer_prediction_match"]:.2%} equal to the model; ONNX: '
    f'{onnx["onnx_bytes"]:,} bytes, predictions '
    f'{onnx["onnx_prediction_match"]:.2%} equal to the program'
  )
  print(f'test accuracy {acc:.4f}; {time.time() - start:.0f} s')
  return {
    'accuracy': acc,
    'size': size,
    'qmodel': qmodel,
    'artifact': path,
    'images': images,
    'integer': integer,
    'program': program_path,
    'onnx': onnx,
    'onnx_path': onnx_path,
  }


if __name__ == '__main__':
  main()
