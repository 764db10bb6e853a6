#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in one bounded run, on a GPU machine with PyTorch and no Rust:
# the test matrix, the cifar10 training-step benchmark against PyTorch eager, and a short
# cifar-small training run on Flowers at 32x32 in bf16 whose EMA samples are written as a grid.
#
# Needs, from the repository root: dist/cuda/{ddpm,xtask,env.sh} from `cargo xtask build-cuda`
# (or ddpm.xz/xtask.xz, unpacked here), and data/mnist + data/flowers (`cargo xtask fetch-data`).
# Usage: OUT=out-dir FLOWERS_SECONDS=240 bash bench/gpu/run-on-gpu.sh [smoke]
set -uo pipefail
OUT=${OUT:-target/gpu-out}
BIN=${BIN:-dist/cuda}
FLOWERS_SECONDS=${FLOWERS_SECONDS:-240}
mkdir -p "$OUT"
for b in ddpm xtask; do
  if [ -f "$BIN/$b.xz" ] && [ ! -x "$BIN/$b" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$BIN/$b.xz" "$BIN/$b" && chmod +x "$BIN/$b"
  fi
done
# shellcheck source=/dev/null
. "$BIN/env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
stage() { echo "== $1 (t+$(( $(date +%s) - start ))s)"; }

if [ "${1:-}" = smoke ]; then
  stage "smoke: test matrix, f32 only"
  timeout 120 "$BIN/xtask" test-matrix --gpu --precisions f32 --ddpm "$PWD/$BIN/ddpm" --data-dir data 2>&1 | tee -a "$OUT/gpu.txt"
  exit
fi

stage "test matrix (GPU column)"
timeout 200 "$BIN/xtask" test-matrix --gpu --ddpm "$PWD/$BIN/ddpm" --data-dir data 2>&1 | tee "$OUT/test-matrix.txt"

stage "hot ops at the cifar10 model's top level (batch 128, 128 channels, 32x32)"
for p in bf16 f32; do
  timeout 60 "$BIN/xtask" bench-worker ops --device cuda --precision $p --batch 128 --channels 128 --size 32 --iters 5 2>&1 | tee -a "$OUT/bench.log"
done

stage "where a cifar10 training step goes, and which of our settings is fastest"
best=""; best_ms=1e12
for variant in "" "DDPM_CUDA_POOL=release" "DDPM_KERNELS=candle"; do
  line=$(env $variant DDPM_BENCH_PHASES=1 timeout 90 "$BIN/xtask" bench-worker time --preset cifar10 \
    --task train --batch 128 --warmup 2 --iters 3 --device cuda --precision bf16 2>>"$OUT/bench.log")
  ms=$(python3 -c 'import json,sys,statistics; print(1e3*statistics.median(json.loads(sys.argv[1])["times_s"]))' "$line" 2>/dev/null || echo 1e12)
  echo "variant [${variant:-default}]: $ms ms/step" | tee -a "$OUT/bench.log"
  if python3 -c "import sys; sys.exit(0 if float('$ms') < float('$best_ms') else 1)"; then best=$variant; best_ms=$ms; fi
done
echo "fastest: [${best:-default}] $best_ms ms/step" | tee -a "$OUT/bench.log"
[ -n "$best" ] && export "$best"

stage "benchmark: cifar10 training and sampling steps, batch 128, bf16, ours vs PyTorch"
timeout 200 "$BIN/xtask" bench-gpu --python python3 --out "$OUT/gpu-bench.md" 2>&1 | tee -a "$OUT/bench.log"

stage "Flowers 32x32, cifar-small, bf16, ${FLOWERS_SECONDS}s"
run=/tmp/flowers-run
rm -rf "$run"
# timeout sends SIGTERM: the run finishes its step and writes a checkpoint.
timeout -s TERM "$FLOWERS_SECONDS" "$BIN/ddpm" train --dataset flowers --model cifar-small \
  --image-size 32 --device cuda --precision bf16 --batch-size 128 --lr 2e-4 --steps 1000000 \
  --data-dir data --no-fetch --sample-every 0 --checkpoint-every 1000 --log-every 50 --quiet \
  --out "$run" 2>&1 | tail -20 | tee "$OUT/flowers.log"
tail -3 "$run/metrics.jsonl" | tee -a "$OUT/flowers.log"
timeout 120 "$BIN/ddpm" sample --checkpoint "$run" --num 64 --steps 100 --seed 0 --device cuda \
  --precision bf16 --quiet --out "$OUT/flowers-samples.png" 2>&1 | tee -a "$OUT/flowers.log"
cp "$run/loss.png" "$OUT/flowers-loss.png" 2>/dev/null
stage done
