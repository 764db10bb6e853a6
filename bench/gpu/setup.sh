# Sourced by the GPU scripts (run-on-gpu.sh, profile.sh) from the repository root: the output
# folder, the binaries of `cargo xtask build-cuda` (unpacked from their .xz where needed) with
# their library environment, a `stage` line with the elapsed time, and `kernel_tests`.
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

# Our CUDA kernels' tests against the CPU (where dist/cuda/unet-tests exists); on a failure the
# rest of the script runs with DDPM_CUDA_KERNELS=off (candle's ops).
kernel_tests() {
  [ -x "$BIN/unet-tests" ] || return 0
  stage "our CUDA kernels against the CPU (ddpm-kernels' tests, CUDA device required)"
  if timeout 120 "$BIN/unet-tests" cuda:: --test-threads 1 \
    > "$OUT/kernel-tests.txt" 2>&1; then
    echo "kernel tests: pass"
  else
    echo "kernel tests FAILED: the rest runs with DDPM_CUDA_KERNELS=off (candle's ops)"
    export DDPM_CUDA_KERNELS=off
  fi
  grep -E "^test |test result" "$OUT/kernel-tests.txt" | tail -12
}
