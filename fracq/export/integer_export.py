"""Lower a trained model, write its integer program and measure it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fracq.export.lowering import lower
from fracq.export.serialization import save_program
from fracq.export.serialization import theoretical_bytes


def export_integer(
  wrapper,
  variables,
  sample_x,
  path: str,
  *,
  overwrite: bool = False,
  metadata: dict | None = None,
) -> dict:
  """Lowers, writes the integer program to ``path`` and measures it.

  Returns the program's bytes on disk, the theoretical size (kernel codes
  at their bits + int32 biases and requantization parameters) and the
  agreement with the fake-quantized model on ``sample_x`` (prediction
  match rate and max logit difference relative to the logit range) and,
  where the lowering checked it teacher-forced, how many layer input codes
  it found off by one at rounding ties (``integer_tied_codes`` of
  ``integer_checked_codes``).
  """
  batch = jnp.asarray(sample_x)
  program = lower(wrapper, variables, batch)
  size = save_program(program, path, overwrite=overwrite, metadata=metadata)
  ref = np.asarray(wrapper.apply(variables, batch, train=False))
  got = np.asarray(program.logits(batch))
  check = program.verification
  replay = {}
  if check is not None and check.layers:
    replay = {
      'integer_tied_codes': check.flipped_codes,
      'integer_checked_codes': check.checked_codes,
    }
  return {
    **replay,
    'program_bytes': size,
    'program_theoretical_bytes': theoretical_bytes(program),
    'integer_prediction_match': float(
      np.mean(got.argmax(-1) == ref.argmax(-1))
    ),
    'integer_max_logit_diff_rel': float(
      np.max(np.abs(got - ref)) / (np.ptp(ref) or 1.0)
    ),
    'summary': program.summary(),
  }
