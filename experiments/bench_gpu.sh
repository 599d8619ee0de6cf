#!/usr/bin/env bash
# GPU benchmarks: the training step of ResNet-50 at 224 px (batch 64) and of
# the byte-level LM (gpt_small, batch 32 windows of 128 bytes, as
# configs/lm_float.py trains it) under every variant of
# experiments/bench_train_step.py (float, fracq uniform QAT w8a8 / w4a4,
# FracBits weights / weights+activations, for ResNet-50 also uniform w8a8
# and FracBits weights+activations with the other ``recompute`` setting,
# qwix QAT w8a8 / w4a4), about 10 minutes on one H100-class GPU. Writes
# experiments/results/bench_resnet50_gpu.{json,md} and
# experiments/results/bench_lm_gpu.{json,md}; each records the commit, the
# command, the jax/jaxlib versions and the GPU.
#
# Installs fracq with the CUDA 12 build of the jax version requirements.txt
# pins (the command a CUDA user runs), into the active Python environment:
#
#   python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
#   bash experiments/bench_gpu.sh
#
# Environment:
#   FRACQ_SKIP_INSTALL=1  the environment is ready (no pip install)
#   FRACQ_JAX_EXTRA=cuda13  jax's CUDA 13 build instead of CUDA 12
#   FRACQ_WHEELS=DIR      install offline from the wheels in DIR
#                         (pip --no-index --find-links DIR)
#   FRACQ_GPU_OUT=DIR     write the result files there instead
#
#   bash experiments/bench_gpu.sh --dry-run
#
# checks the script on a CPU: no install, tiny models (resnet_tiny at 8 px,
# gpt_tiny on 8-byte windows), one round, results into a temporary folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"

DRY_RUN=0
case "${1:-}" in
  '') ;;
  --dry-run) DRY_RUN=1 ;;
  *)
    echo "usage: bash experiments/bench_gpu.sh [--dry-run]" >&2
    exit 2
    ;;
esac

# The jax version requirements.txt pins (its lower bound: jax[cpu]>=X,<Y).
JAX_VERSION="$(sed -n 's/^jax\[cpu\]>=\([0-9.]*\),.*/\1/p' requirements.txt)"
if [[ -z "$JAX_VERSION" ]]; then
  echo "requirements.txt has no 'jax[cpu]>=X,<Y' line to take the jax" \
    "version from; install jax[cuda12] by hand and set FRACQ_SKIP_INSTALL=1." >&2
  exit 1
fi

if [[ "$DRY_RUN" == 1 ]]; then
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
  RESNET=(--model resnet_tiny --batch 2 --size 8 --rounds 1 --reps 1)
  LM=(--model gpt_tiny --batch 2 --size 8 --rounds 1 --reps 1)
else
  OUT="${FRACQ_GPU_OUT:-experiments/results}"
  RESNET=(--model resnet50 --batch 64 --size 224 --rounds 5 --reps 10)
  LM=(--model gpt_small --batch 32 --size 128 --rounds 5 --reps 20)
  if [[ "${FRACQ_SKIP_INSTALL:-0}" != 1 ]]; then
    PIP=("$PYTHON" -m pip install)
    if [[ -n "${FRACQ_WHEELS:-}" ]]; then
      PIP+=(--no-index --find-links "$FRACQ_WHEELS")
    fi
    "${PIP[@]}" -r requirements.txt \
      "jax[${FRACQ_JAX_EXTRA:-cuda12}]==$JAX_VERSION"
    "${PIP[@]}" --no-deps -e .
  fi
  "$PYTHON" - <<EOF
import jax
if jax.default_backend() != 'gpu':
  raise SystemExit(
    f'JAX runs on {jax.default_backend()!r}, not a GPU: check the CUDA '
    'driver (nvidia-smi) and that jax[${FRACQ_JAX_EXTRA:-cuda12}]==$JAX_VERSION '
    'installed; '
    'bash experiments/bench_gpu.sh --dry-run checks the script on a CPU.'
  )
print('jax', jax.__version__, 'on', jax.devices())
EOF
fi

# The export is timed on CPU by bench_train_step.json; here only the step.
start=$SECONDS
"$PYTHON" experiments/bench_train_step.py "${RESNET[@]}" --skip_export \
  --json "$OUT/bench_resnet50_gpu.json"
echo "ResNet-50: $((SECONDS - start)) s"
start=$SECONDS
"$PYTHON" experiments/bench_train_step.py "${LM[@]}" --skip_export \
  --json "$OUT/bench_lm_gpu.json"
echo "LM: $((SECONDS - start)) s"
if [[ "$DRY_RUN" == 1 ]]; then
  for name in bench_resnet50_gpu bench_lm_gpu; do
    test -s "$OUT/$name.json" && test -s "$OUT/$name.md"
  done
  echo "dry run OK (jax pin $JAX_VERSION; results were written to a" \
    "temporary folder and removed)"
fi
