"""Where PyTorch eager's GPU time goes in the reference training step of `xtask bench-gpu`
(bench/pytorch/bench.py's `time_train`: cifar10, batch 128, bf16 autocast): 3 warm-up steps,
then 2 profiled steps; prints the kernels by total device time.

Usage (repository root, on a GPU machine): python3 bench/gpu/torch_profile.py [preset] [batch]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "bench/pytorch")
import bench  # noqa: E402
import models  # noqa: E402


def main() -> int:
    preset = sys.argv[1] if len(sys.argv) > 1 else "cifar10"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    device = torch.device("cuda")
    config = models.PRESETS[preset]
    model = models.build_model(config).to(device)
    shape = models.image_shape(config)
    gen = torch.Generator().manual_seed(0)
    bench.time_train(model, shape, batch, 3, 0, gen, device, "bf16")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        times = bench.time_train(model, shape, batch, 0, 2, gen, device, "bf16")
    print("PyTorch step times (s):", [round(t, 4) for t in times])
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    total = sum(getattr(e, key) for e in events) / 1e3 / 2
    print(f"GPU time per step: {total:.2f} ms")
    print(events.table(sort_by=key, row_limit=35, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
