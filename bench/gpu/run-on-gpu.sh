#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in two bounded calls, on a GPU machine with PyTorch and no Rust:
#
#   bash bench/gpu/run-on-gpu.sh          # our CUDA kernels' tests, the step with and without
#                                         # them, single ops, the cifar10 benchmark against
#                                         # PyTorch eager, then starts the Flowers run
#                                         # (detached) and runs the test matrix beside it
#   bash bench/gpu/run-on-gpu.sh finish   # waits for the Flowers run, samples its EMA weights
#
# The Flowers run (cifar-small on the real Flowers data at 32x32, bf16) is started in its own
# process session so that it outlives the first call; the second call must follow while the
# machine is still held. A grid from the run's newest checkpoint is also written at the end of
# the first call, so a lost second call loses only the longer run.
#
# Needs, from the repository root: dist/cuda/{ddpm,xtask,env.sh} from `cargo xtask build-cuda`
# (or ddpm.xz/xtask.xz, unpacked here), dist/cuda/unet-tests(.xz) (our CUDA kernels' tests, from
# the same command; skipped where missing), and data/mnist + data/flowers (`cargo xtask fetch-data`).
# Environment: OUT (where results go), FLOWERS_SECONDS (length of the Flowers run, default 420;
# 0: no Flowers run, the test matrix alone), SKIP_OPS (set: no single-op timings and host-bound
# check), PROFILE (set: ncu's kernel times of one step, bench/gpu/profile.sh).
set -uo pipefail
FLOWERS_SECONDS=${FLOWERS_SECONDS:-420}
RUN=/tmp/flowers-run
# shellcheck source=bench/gpu/setup.sh
. bench/gpu/setup.sh

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

kernel_tests

stage "a cifar10 training step (batch 128, bf16): the first CUDA kernels (basic) and all"
for k in basic "${DDPM_CUDA_KERNELS:-all}"; do
  line=$(DDPM_CUDA_KERNELS=$k DDPM_BENCH_PHASES=1 timeout 90 "$BIN/xtask" bench-worker time \
    --preset cifar10 --task train --batch 128 --warmup 2 --iters 4 --device cuda --precision bf16 \
    2>>"$OUT/bench.log")
  echo "DDPM_CUDA_KERNELS=$k: $line" | tee -a "$OUT/bench.log"
done

if [ -z "${SKIP_OPS:-}" ]; then
stage "single ops, batch 128, 128 channels, 32x32, bf16"
timeout 60 "$BIN/xtask" bench-worker ops --device cuda --precision bf16 --batch 128 \
  --channels 128 --size 32 --iters 10 2>&1 | tee "$OUT/ops.txt"

stage "is the step bound by the host? a sampling step at batch 1 and 128, and CPU time used"
for b in 1 128; do
  ( TIMEFORMAT="batch $b: %U s user + %S s sys CPU over %R s"
    time DDPM_BENCH_PHASES=1 timeout 60 "$BIN/xtask" bench-worker time --preset cifar10 --task sample \
      --batch $b --warmup 2 --iters 20 --device cuda --precision bf16 2>/dev/null \
      | python3 -c 'import json,sys; t=json.load(sys.stdin)["times_s"]; t.sort(); print("median %.1f ms" % (1e3*t[len(t)//2]))' ) 2>&1 \
    | tee -a "$OUT/host-bound.txt"
done

fi

nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -n "$nsys" ]; then
  stage "where the GPU time of a cifar10 training step goes (nsys, 3 steps)"
  timeout 120 "$nsys" profile -o /tmp/step --force-overwrite true --stats=false \
    "$BIN/xtask" bench-worker time --preset cifar10 --task train --batch 128 --warmup 1 \
    --iters 3 --device cuda --precision bf16 > /dev/null 2>&1
  timeout 60 "$nsys" stats --report cuda_gpu_kern_sum --format csv /tmp/step.nsys-rep \
    2>/dev/null | head -40 | cut -c1-220 | tee "$OUT/kernels.csv"
else
  echo "(no nsys on this machine: no kernel profile)"
fi

if [ -n "${PROFILE:-}" ]; then
  stage "kernel times of one training step (ncu)"
  NCU_ONLY=1 OUT="$OUT" BIN="$BIN" bash bench/gpu/profile.sh 2>&1 | tail -32
fi

stage "benchmark: cifar10 training and sampling steps, batch 128, bf16, ours vs PyTorch"
timeout 200 "$BIN/xtask" bench-gpu --python python3 --rounds 1 --out "$OUT/gpu-bench.md" 2>&1 | tail -30 | tee -a "$OUT/bench.log"

if [ "$FLOWERS_SECONDS" = 0 ]; then
  stage "test matrix (GPU column)"
  timeout 240 "$BIN/xtask" test-matrix --gpu --ddpm "$PWD/$BIN/ddpm" --data-dir data 2>&1 | tee "$OUT/test-matrix.txt"
  stage "done (FLOWERS_SECONDS=0: no Flowers run)"
  exit
fi

stage "Flowers 32x32, cifar-small, bf16, ${FLOWERS_SECONDS}s (detached)"
rm -rf "$RUN"
# timeout sends SIGTERM: the run finishes its step and writes a checkpoint.
setsid nohup timeout -s TERM "$FLOWERS_SECONDS" "$BIN/ddpm" train --dataset flowers \
  --model cifar-small --image-size 32 --device cuda --precision bf16 --batch-size 128 --lr 2e-4 \
  --steps 1000000 --data-dir data --no-fetch --sample-every 0 --checkpoint-every 500 \
  --log-every 50 --quiet --out "$RUN" >/tmp/flowers.log 2>&1 < /dev/null &
sleep 1

stage "test matrix (GPU column), beside the Flowers run"
timeout 240 "$BIN/xtask" test-matrix --gpu --ddpm "$PWD/$BIN/ddpm" --data-dir data 2>&1 | tee "$OUT/test-matrix.txt"

if [ $(( $(date +%s) - start )) -lt 500 ]; then
  stage "a grid from the Flowers run's newest checkpoint so far"
  flowers_grid "$OUT/flowers-samples-partial.png" 2>&1 | tee "$OUT/flowers-partial.log"
fi
stage "first call done; the Flowers run goes on"
