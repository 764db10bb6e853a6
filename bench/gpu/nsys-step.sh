#!/usr/bin/env bash
# Where the GPU time of our cifar10 training step goes (batch 128, bf16): Nsight Systems over 3
# steps, its kernel summary to stdout (and $OUT/kernels.csv). Run by run-on-gpu.sh's `profile`
# stage after bench/gpu/setup.sh (BIN, OUT and the library path set); prints a note and exits 0
# where there is no nsys.
set -uo pipefail
BIN=${BIN:-dist/cuda}
OUT=${OUT:-target/gpu-out}
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -z "$nsys" ]; then
  echo "(no nsys on this machine: no kernel profile)"
  exit 0
fi
"$nsys" profile -o /tmp/step --force-overwrite true --stats=false \
  "$BIN/xtask" bench-worker time --preset cifar10 --task train --batch 128 --warmup 1 \
  --iters 3 --device cuda --precision bf16 > /dev/null 2>&1
"$nsys" stats --report cuda_gpu_kern_sum --format csv /tmp/step.nsys-rep 2>/dev/null \
  | head -40 | cut -c1-220 | tee "$OUT/kernels.csv"
