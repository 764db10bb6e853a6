#!/usr/bin/env bash
# Where the GPU time of a cifar10 training step goes (batch 128, bf16), ours and PyTorch eager's,
# on a GPU machine (no Rust there): Nsight Compute's kernel durations of one of our steps
# (kernel_summary.py sums them by kernel), and PyTorch's profiler over its reference step
# (torch_profile.py). Needs dist/cuda/{xtask(.xz),env.sh} from `cargo xtask build-cuda --xz`.
#
#   OUT=/tmp/out bash bench/gpu/profile.sh   # NCU_ONLY=1: the ncu profile alone
set -uo pipefail
# shellcheck source=bench/gpu/setup.sh
. bench/gpu/setup.sh
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
