#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in two bounded calls, on a GPU machine with PyTorch and no Rust:
#
#   bash bench/gpu/run-on-gpu.sh          # checks, convolution variants, the cifar10 benchmark
#                                         # against PyTorch eager, then starts the Flowers run
#                                         # (detached) and runs the test matrix beside it
#   bash bench/gpu/run-on-gpu.sh finish   # waits for the Flowers run, samples its EMA weights
#
# The Flowers run (cifar-small on the real Flowers data at 32x32, bf16) is started in its own
# process session so that it outlives the first call; the second call must follow while the
# machine is still held. A grid from the run's newest checkpoint is also written at the end of
# the first call, so a lost second call loses only the longer run.
#
# Needs, from the repository root: dist/cuda/{ddpm,xtask,env.sh} from `cargo xtask build-cuda`
# (or ddpm.xz/xtask.xz, unpacked here), and data/mnist + data/flowers (`cargo xtask fetch-data`).
# Environment: OUT (where results go), FLOWERS_SECONDS (length of the Flowers run, default 420).
set -uo pipefail
OUT=${OUT:-target/gpu-out}
BIN=${BIN:-dist/cuda}
FLOWERS_SECONDS=${FLOWERS_SECONDS:-420}
RUN=/tmp/flowers-run
mkdir -p "$OUT"
for b in ddpm xtask; do
  if [ -f "$BIN/$b.xz" ] && [ ! -x "$BIN/$b" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$BIN/$b.xz" "$BIN/$b" && chmod +x "$BIN/$b"
  fi
done
# shellcheck source=/dev/null
. "$BIN/env.sh"
start=$(date +%s)
stage() { echo "== $1 (t+$(( $(date +%s) - start ))s)"; }

flowers_grid() { # $1: output PNG
  timeout 90 "$BIN/ddpm" sample --checkpoint "$RUN" --num 64 --steps 100 --seed 0 --device cuda \
    --precision bf16 --quiet --out "$1" 2>&1 | tail -3
  cp "$RUN/loss.png" "$OUT/flowers-loss.png" 2>/dev/null
  tail -2 "$RUN/metrics.jsonl" 2>/dev/null
}

if [ "${1:-}" = finish ]; then
  stage "waiting for the Flowers run"
  while pgrep -f "ddpm train --dataset flowers" >/dev/null; do sleep 2; done
  stage "Flowers run ended"
  cp /tmp/flowers.log "$OUT/flowers.log" 2>/dev/null
  flowers_grid "$OUT/flowers-samples.png" 2>&1 | tee -a "$OUT/flowers.log"
  stage done
  exit
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "libraries:"; ldd "$BIN/ddpm" | grep -E "cudnn|nccl|cublas|not found"
} 2>&1 | tee "$OUT/gpu.txt"

stage "a device that is not there (this machine has one GPU)" | tee -a "$OUT/gpu.txt"
timeout 60 "$BIN/ddpm" train --dataset mnist --model mnist-small --device cuda:1 --steps 1 --data-dir data --no-fetch --out /tmp/cuda1-run \
  2>&1 | tail -3 | tee -a "$OUT/gpu.txt"

stage "a cifar10 training step (batch 128, bf16): convolutions by cuDNN vs im2col tensor ops"
for conv in cudnn unfold; do
  line=$(DDPM_CUDA_CONV=$conv DDPM_BENCH_PHASES=1 timeout 90 "$BIN/xtask" bench-worker time \
    --preset cifar10 --task train --batch 128 --warmup 2 --iters 4 --device cuda --precision bf16 \
    2>>"$OUT/bench.log")
  echo "DDPM_CUDA_CONV=$conv: $line" | tee -a "$OUT/bench.log"
done

stage "benchmark: cifar10 training and sampling steps, batch 128, bf16, ours vs PyTorch"
timeout 200 "$BIN/xtask" bench-gpu --python python3 --out "$OUT/gpu-bench.md" 2>&1 | tail -30 | tee -a "$OUT/bench.log"

stage "Flowers 32x32, cifar-small, bf16, ${FLOWERS_SECONDS}s (detached)"
rm -rf "$RUN"
# timeout sends SIGTERM: the run finishes its step and writes a checkpoint.
setsid nohup timeout -s TERM "$FLOWERS_SECONDS" "$BIN/ddpm" train --dataset flowers \
  --model cifar-small --image-size 32 --device cuda --precision bf16 --batch-size 128 --lr 2e-4 \
  --steps 1000000 --data-dir data --no-fetch --sample-every 0 --checkpoint-every 500 \
  --log-every 50 --quiet --out "$RUN" >/tmp/flowers.log 2>&1 < /dev/null &
sleep 1

stage "f16 with dynamic loss scaling, from a scale of 2^24: real overflows skipped, the scale halved"
DDPM_F16_INITIAL_SCALE=16777216 DDPM_LOG=ddpm_train=debug NO_COLOR=1 timeout 90 "$BIN/ddpm" train \
  --dataset mnist --model mnist-small --device cuda --precision f16 --batch-size 64 --steps 40 \
  --data-dir data --no-fetch --sample-every 0 --checkpoint-every 1000 --log-every 10 --quiet \
  --out /tmp/f16-run > /tmp/f16.log 2>&1
echo "overflow steps skipped: $(grep -c 'f16 overflow' /tmp/f16.log)" | tee "$OUT/f16.txt"
grep -E "f16 overflow|loss scale|rror" /tmp/f16.log | head -12 | tee -a "$OUT/f16.txt"
grep -h -A5 '"loss_scaler"' "$(ls /tmp/f16-run/checkpoints/*.json | tail -1)" | tee -a "$OUT/f16.txt"
tail -2 /tmp/f16-run/metrics.jsonl 2>/dev/null | tee -a "$OUT/f16.txt"

stage "test matrix (GPU column), beside the Flowers run"
timeout 300 "$BIN/xtask" test-matrix --gpu --ddpm "$PWD/$BIN/ddpm" --data-dir data 2>&1 | tee "$OUT/test-matrix.txt"

if [ $(( $(date +%s) - start )) -lt 480 ]; then
  stage "a grid from the Flowers run's newest checkpoint so far"
  flowers_grid "$OUT/flowers-samples-partial.png" 2>&1 | tee "$OUT/flowers-partial.log"
fi
stage "first call done; the Flowers run goes on"
