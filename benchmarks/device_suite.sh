#!/usr/bin/env bash
# The accelerator measurements of issue 18 in one run: under 8 minutes on one H100.
#
#   bash benchmarks/device_suite.sh            # from the repository root
#
# Writes every table (stdout logs and JSON) to $OUT, or to ./runs/device when OUT is unset.
#
# Assumes installed (nothing is fetched): Python 3.10+ with jax and a CUDA jaxlib (jax[cuda12]
# or jax[cuda13], jax >= 0.7), optax >= 0.2.8 (optax.contrib.muon with
# muon_weight_dimension_numbers), flax (nnx), absl-py and numpy; soap_optax is imported from
# this checkout (PYTHONPATH is set to the repository root), not from an installed copy. The
# interpreter is $PYTHON, default python3. GNU coreutils' `timeout`.
#
# Steps, each under its own `timeout` so that a slow one cannot eat the others' time:
#   1. environment: versions, the device, nvidia-smi (20 s);
#   2. bench_train_step.py --preset gpt2_small (d_model 768, 12 layers, 12 heads, sequence 1024,
#      batch 8 = 8,192 tokens per step, 124M parameters) for adamw, muon and soap at
#      precondition_frequency 10, 3 timed refresh windows: SOAP's whole-step ratio to AdamW (the
#      issue's target is <= 1.25x on the mean) and Muon's in the same run (230 s; compiling each
#      soap_optax configuration takes a minute or more);
#   3. bench_qr_batching.py: batched against looped QR of (12, n, n) stacks, n = 128 ... 1536
#      (80 s);
#   4. bench_train_step.py --preset gpt2_small for adamw and soap with stagger_refresh=True, in a
#      run of their own so that a slow compile in 2 cannot lose it (120 s);
#   5. bench_orthonormalize.py: Householder QR against Cholesky-QR2 and shifted Cholesky-QR3 for
#      the refresh's power step, (12, n, n) stacks, n = 256 ... 1536, well-conditioned inputs
#      only, and the fallback's placements on 12 x 384^2 (25 s; rows print as they finish).
# The timeouts add up to 475 s.
# A step that times out leaves what it printed in its log; the summary at the end lists each
# step's exit status (124 = timed out).
#
# A dry run on a CPU (minutes, a tiny model):
#   PRESET=cpu QR_SIZES="32 64" ORTHO_SIZES="32 64" ORTHO_STRATEGIES=32 \
#     TRAIN_STEP_EXTRA="--d_model 32 --num_layers 1 --num_heads 2 --seq_len 16" \
#     bash benchmarks/device_suite.sh

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device}"
PYTHON="${PYTHON:-python3}"
PRESET="${PRESET:-gpt2_small}"
QR_SIZES="${QR_SIZES:-128 256 512 1024 1536}"
ORTHO_SIZES="${ORTHO_SIZES:-256 512 1024 1536}"
ORTHO_STRATEGIES="${ORTHO_STRATEGIES:-384}"
TRAIN_STEP_EXTRA="${TRAIN_STEP_EXTRA:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The CPU-side QR/eigh of jax go through OpenBLAS; one thread each avoids oversubscription
# (the GPU runs do not use it, but a CPU fallback would).
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

declare -a SUMMARY=()
START=$(date +%s)

step() {
  # step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, its output to $OUT/NAME.log.
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== [$name] (timeout ${limit}s, $(($(date +%s) - START))s into the suite): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== [$name] exit status $rc"
  SUMMARY+=("$name: exit $rc")
}

ENV_REPORT='
import os, platform
import flax, jax, jaxlib, numpy, optax
import soap_optax
versions = dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                optax=optax.__version__, flax=flax.__version__, numpy=numpy.__version__)
print(" ".join(f"{k} {v}" for k, v in versions.items()))
print("devices", jax.devices(), "kind", jax.devices()[0].device_kind, "cpus", os.cpu_count())
print("soap_optax from", soap_optax.__file__)
'
step env 20 bash -c "$PYTHON -c '$ENV_REPORT'; git rev-parse --short=12 HEAD 2>/dev/null;
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true"

# shellcheck disable=SC2086  # TRAIN_STEP_EXTRA and QR_SIZES are word lists.
step train_step_gpt2 230 "$PYTHON" benchmarks/bench_train_step.py \
  --preset "$PRESET" $TRAIN_STEP_EXTRA \
  --optimizers adamw muon soap --precondition_frequency 10 --windows 3 \
  --json "$OUT/train_step_gpt2.json"

# shellcheck disable=SC2086
step qr_batching 80 "$PYTHON" benchmarks/bench_qr_batching.py \
  --sizes $QR_SIZES --count 12 --repeats 5 --json "$OUT/qr_batching.json"

# shellcheck disable=SC2086
step train_step_gpt2_stagger 120 "$PYTHON" benchmarks/bench_train_step.py \
  --preset "$PRESET" $TRAIN_STEP_EXTRA \
  --optimizers adamw "soap:stagger_refresh=True" --precondition_frequency 10 --windows 3 \
  --json "$OUT/train_step_gpt2_stagger.json"

# shellcheck disable=SC2086
step orthonormalize 25 "$PYTHON" benchmarks/bench_orthonormalize.py \
  --sizes $ORTHO_SIZES --count 12 --repeats 5 --inputs fresh \
  --strategies "$ORTHO_STRATEGIES" --strategy_count 12 --json "$OUT/orthonormalize.json"

echo
echo "=== suite done in $(($(date +%s) - START))s; logs and JSON in $OUT"
printf '  %s\n' "${SUMMARY[@]}"
