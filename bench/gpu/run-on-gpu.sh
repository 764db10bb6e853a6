#!/usr/bin/env bash
# The GPU checks of issue 25 in one bounded call (about 8 minutes), on a GPU machine with PyTorch
# and no Rust and no network, from the binaries of `cargo xtask build-cuda`:
#
#   bash bench/gpu/run-on-gpu.sh --dry-run   # check every input, print each stage's command and
#                                            # time budget, run nothing (exit 0: all present)
#   bash bench/gpu/run-on-gpu.sh             # run the stages below, everything under $OUT
#   bash bench/gpu/run-on-gpu.sh matrix      # (a second call, optional) the GPU test matrix
#
# Stages of the main call, each under `timeout` with its budget:
#   gpu              nvidia-smi's name, driver and memory, and the libraries the binaries load;
#   kernel-tests     our CUDA kernels against the CPU (ddpm-kernels' tests, `unet-tests cuda::`);
#                    on a failure the later stages run with DDPM_CUDA_KERNELS=off (candle's ops);
#   profile          where the GPU time of a cifar10 bf16 training step at batch 128 goes (nsys,
#                    3 steps; skipped without nsys; PROFILE=1 adds ncu and PyTorch's profiler);
#   bench-cifar10    `xtask bench --device cuda --precision bf16`: cifar10, training at batch
#                    128, sampling steps and a DDIM-50 sample at batch 256; ours, PyTorch eager
#                    and PyTorch's best mode (torch.compile max-autotune, channels_last, fused
#                    AdamW, cudnn.benchmark, TF32), fractions of the bf16 peak, one round;
#   bench-256        the same for the 256x256 `celebahq-256` preset (batch 16).
# A compiled PyTorch process that outlives --worker-timeout becomes a "failed: timed out" cell
# of the report; the stage still writes its report.
#
# Needs, from the repository root: $BIN/{xtask,unet-tests,env.sh} (BIN=dist/cuda by default; the
# .xz files of `cargo xtask build-cuda --xz` are unpacked here), bench/pytorch/*.py, and a
# $PYTHON (default python3) that imports torch, safetensors and numpy. `--dry-run` checks each.
# Environment: OUT (results; default target/gpu-out), BIN, PYTHON, COMPILE_MODE (torch.compile's
# mode for the best column; default max-autotune), PROFILE (set: ncu too, bench/gpu/profile.sh).
set -uo pipefail
BIN=${BIN:-dist/cuda}
OUT=${OUT:-target/gpu-out}
PYTHON=${PYTHON:-python3}
COMPILE_MODE=${COMPILE_MODE:-max-autotune}
DRY_RUN=
MODE=main
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    matrix) MODE=matrix ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run-on-gpu.sh: unknown argument '$arg' (use --dry-run, matrix or nothing)" >&2; exit 2 ;;
  esac
done

# The stages: name, budget in seconds, command (run by bash from the repository root).
STAGES=()
add_stage() { STAGES+=("$1"$'\t'"$2"$'\t'"$3"); }
bench_cmd() { # $1: stage tag, $2: presets, $3: per-process timeout
  echo "\"$BIN/xtask\" bench --device cuda --precision bf16 --presets $2 --torch-mode all \
--compile-mode $COMPILE_MODE --rounds 1 --worker-timeout $3 --python \"$PYTHON\" \
--out \"$OUT/bench-$1.md\""
}
if [ "$MODE" = matrix ]; then
  add_stage test-matrix 300 "\"$BIN/xtask\" test-matrix --gpu --ddpm \"\$PWD/$BIN/ddpm\" --data-dir data"
else
  add_stage gpu 10 "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; ldd \"$BIN/xtask\" | grep -E 'cudnn|nccl|cublas|not found'"
  add_stage kernel-tests 75 "\"$BIN/unet-tests\" cuda:: --test-threads 1"
  add_stage profile 45 "bash bench/gpu/nsys-step.sh"
  add_stage bench-cifar10 220 "$(bench_cmd cifar10 cifar10 90)"
  add_stage bench-256 150 "$(bench_cmd 256 celebahq-256 60)"
fi

# The inputs: files that must exist (an .xz of a binary stands for it), and the Python.
NEEDED=("$BIN/xtask" "$BIN/env.sh" bench/pytorch/bench.py bench/pytorch/models.py \
  bench/pytorch/parity.py bench/gpu/setup.sh bench/gpu/nsys-step.sh)
[ "$MODE" = main ] && NEEDED+=("$BIN/unet-tests")
[ "$MODE" = matrix ] && NEEDED+=("$BIN/ddpm" data/mnist)

if [ -n "$DRY_RUN" ]; then
  total=0
  echo "run-on-gpu.sh --dry-run ($MODE): BIN=$BIN OUT=$OUT PYTHON=$PYTHON COMPILE_MODE=$COMPILE_MODE"
  for s in "${STAGES[@]}"; do
    IFS=$'\t' read -r name budget cmd <<< "$s"
    total=$((total + budget))
    printf 'stage %-14s budget %4d s: %s\n' "$name" "$budget" "$cmd"
  done
  echo "total budget: $total s"
  missing=()
  for f in "${NEEDED[@]}"; do
    if [ -e "$f" ] || [ -e "$f.xz" ]; then echo "input ok: $f"; else missing+=("$f"); fi
  done
  if ! "$PYTHON" -c 'import torch, safetensors, numpy' >/dev/null 2>&1; then
    missing+=("$PYTHON with torch, safetensors and numpy")
  fi
  for tool in nvidia-smi nsys; do
    command -v "$tool" >/dev/null 2>&1 || echo "note: no $tool here (its output is skipped on the GPU machine too if missing there)"
  done
  if [ ${#missing[@]} -gt 0 ]; then
    (IFS=','; echo "run-on-gpu.sh --dry-run: missing inputs: ${missing[*]} (build the binaries with \`cargo xtask build-cuda --xz\`, see docs/gpu.md)" >&2)
    exit 1
  fi
  echo "dry run ok: every input present"
  exit 0
fi

# shellcheck source=bench/gpu/setup.sh
. bench/gpu/setup.sh
for s in "${STAGES[@]}"; do
  IFS=$'\t' read -r name budget cmd <<< "$s"
  stage "$name (budget ${budget}s)"
  timeout "$budget" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -25 "$OUT/$name.log"
  echo "stage $name: exit $rc"
  if [ "$name" = kernel-tests ] && [ $rc -ne 0 ]; then
    echo "kernel tests FAILED: the later stages run with DDPM_CUDA_KERNELS=off (candle's ops)"
    export DDPM_CUDA_KERNELS=off
  fi
done
if [ -n "${PROFILE:-}" ] && [ "$MODE" = main ]; then
  stage "ncu kernel times of one step and PyTorch's profiler (PROFILE=1)"
  OUT="$OUT" BIN="$BIN" bash bench/gpu/profile.sh 2>&1 | tail -40
fi
stage done
