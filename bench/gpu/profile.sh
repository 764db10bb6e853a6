#!/usr/bin/env bash
# Where the GPU time of a cifar10 training step goes (batch 128, bf16), ours and PyTorch eager's,
# on a GPU machine (no Rust there): Nsight Compute's kernel durations of one of our steps
# (kernel_summary.py sums them by kernel), and PyTorch's profiler over its reference step
# (torch_profile.py). Needs dist/cuda/{xtask(.xz),env.sh} from `cargo xtask build-cuda --xz`.
#
#   OUT=/tmp/out bash bench/gpu/profile.sh   # NCU_ONLY=1: the ncu profile alone
set -uo pipefail
OUT=${OUT:-target/gpu-out}
BIN=${BIN:-dist/cuda}
mkdir -p "$OUT"
for b in ddpm xtask unet-tests; do
  if [ -f "$BIN/$b.xz" ] && [ ! -x "$BIN/$b" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$BIN/$b.xz" "$BIN/$b" && chmod +x "$BIN/$b"
  fi
done
# shellcheck source=/dev/null
. "$BIN/env.sh"
start=$(date +%s)
stage() { echo "== $1 (t+$(( $(date +%s) - start ))s)"; }
if [ -x "$BIN/unet-tests" ] && [ -z "${NCU_ONLY:-}" ]; then
  stage "our CUDA kernels against the CPU"
  if DDPM_REQUIRE_CUDA=1 timeout 120 "$BIN/unet-tests" kernels::cuda --test-threads 1 \
    > "$OUT/kernel-tests.txt" 2>&1; then
    echo "kernel tests: pass"
  else
    echo "kernel tests FAILED: the rest runs with DDPM_CUDA_KERNELS=basic"
    export DDPM_CUDA_KERNELS=basic
  fi
  grep -E "^test |test result" "$OUT/kernel-tests.txt" | tail -12
fi
[ -n "${NCU_ONLY:-}" ] || stage "a cifar10 training step (batch 128, bf16) with DDPM_CUDA_KERNELS=basic and as set"
[ -n "${NCU_ONLY:-}" ] || for k in basic "${DDPM_CUDA_KERNELS:-all}"; do
  line=$(DDPM_CUDA_KERNELS=$k DDPM_BENCH_PHASES=1 timeout 90 "$BIN/xtask" bench-worker time \
    --preset cifar10 --task train --batch 128 --warmup 2 --iters 4 --device cuda --precision bf16 \
    2>"$OUT/phases-$k.log" | python3 -c 'import json,sys; t=sorted(json.load(sys.stdin)["times_s"]); print("median step %.1f ms" % (1e3*t[len(t)//2]))')
  echo "DDPM_CUDA_KERNELS=$k: $line; $(grep phases "$OUT/phases-$k.log" | tail -1)" | tee -a "$OUT/phases.txt"
  grep -v phases "$OUT/phases-$k.log" | tail -3
done
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$ncu" ]; then
  stage "one of our steps under ncu (${NCU_LAUNCHES:-6000} kernels at most)"
  DDPM_PROFILE_LAST_STEP=1 timeout "${NCU_TIMEOUT:-150}" "$ncu" --clock-control none \
    --profile-from-start off --metrics gpu__time_duration.sum --csv \
    --launch-count "${NCU_LAUNCHES:-6000}" --log-file "$OUT/ncu.csv" \
    "$BIN/xtask" bench-worker time --preset cifar10 --task train --batch 128 --warmup 1 --iters 1 \
    --device cuda --precision bf16 > /dev/null 2> "$OUT/ncu.stderr"
  echo "ncu exit $?"; tail -3 "$OUT/ncu.stderr"
  python3 bench/gpu/kernel_summary.py "$OUT/ncu.csv" 45 | tee "$OUT/ours-kernels.txt"
else
  echo "(no ncu on this machine)"
fi
[ -n "${NCU_ONLY:-}" ] && exit
stage "PyTorch's reference step under torch.profiler"
timeout 120 python3 bench/gpu/torch_profile.py cifar10 128 2>&1 | tee "$OUT/torch-kernels.txt" | cut -c1-200 | head -60
stage done
