"""PyTorch side of `cargo xtask bench`: times one preset's training step or sampling, the same
work as the Rust worker (`xtask bench-worker time`), and prints one line of JSON.

  train:  per step: random timesteps, Gaussian noise, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
          (linear schedule, T = 1000), eps prediction in training mode (dropout on), MSE loss,
          backward, gradient clipping to norm 1, AdamW (lr 2e-4, betas (0.9, 0.999), eps 1e-8,
          no weight decay);
  sample: per step: one forward pass without gradients (evaluation mode); then whole
          deterministic DDIM samples (eta 0, x0 clipped to [-1, 1]) of `--ddim-steps` steps.

Usage: python bench.py --preset mnist-small --task train --batch 32 --warmup 2 --iters 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

import models


def peak_rss_kb() -> int | None:
    """Peak resident set size of this process (VmHWM), in KiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def linear_alphas_cumprod(timesteps: int = 1000) -> torch.Tensor:
    """abar_t of the DDPM paper's schedule (betas linear from 1e-4 to 0.02), in float64."""
    betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced over [0, T-1], rounded (ddpm-schedule's respacing)."""
    if steps == 1:
        return [timesteps - 1]
    stride = (timesteps - 1) / (steps - 1)
    return [min(int(round(i * stride)), timesteps - 1) for i in range(steps)]


def time_train(model, shape, batch, warmup, iters, gen) -> list[float]:
    abar = linear_alphas_cumprod()
    sa = abar.sqrt().float()
    s1 = (1.0 - abar).sqrt().float()
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x0 = torch.rand((batch, *shape), generator=gen) * 2 - 1
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn((batch, *shape), generator=gen)
        x_t = sa[t][:, None, None, None] * x0 + s1[t][:, None, None, None] * noise
        pred = model(x_t, t)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def ddim_sample(model, shape, batch, steps, gen) -> torch.Tensor:
    abar = linear_alphas_cumprod()
    ts = list(reversed(spaced_timesteps(1000, steps)))
    x = torch.randn((batch, *shape), generator=gen)
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((batch,), t, dtype=torch.int64))
        x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-1, 1)
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x.clamp(-1, 1)


def time_sample(model, shape, batch, warmup, iters, ddim_batch, ddim_steps, ddim_runs, gen):
    model.eval()
    times = []
    x = torch.randn((batch, *shape), generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            model(x, t)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    ddim = []
    for _ in range(ddim_runs):
        start = time.perf_counter()
        ddim_sample(model, shape, ddim_batch, ddim_steps, gen)
        ddim.append(time.perf_counter() - start)
    return times, ddim


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(models.PRESETS))
    ap.add_argument("--task", required=True, choices=["train", "sample"])
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ddim-batch", type=int, default=0)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--ddim-runs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = models.PRESETS[args.preset]
    model = models.build_model(config)
    shape = models.image_shape(config)
    ddim = []
    if args.task == "train":
        times = time_train(model, shape, args.batch, args.warmup, args.iters, gen)
    else:
        times, ddim = time_sample(
            model, shape, args.batch, args.warmup, args.iters,
            args.ddim_batch or args.batch, args.ddim_steps, args.ddim_runs, gen,
        )
    print(
        json.dumps(
            {
                "engine": "pytorch",
                "preset": args.preset,
                "task": args.task,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "params": models.num_parameters(model),
                "times_s": times,
                "ddim_s": ddim,
                "ddim_batch": args.ddim_batch or args.batch,
                "ddim_steps": args.ddim_steps,
                "peak_rss_kb": peak_rss_kb(),
                "version": f"torch {torch.__version__}, Python {platform.python_version()}",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
