"""PyTorch side of `cargo xtask bench`: times one preset's training step or sampling, the same
work as the Rust worker (`xtask bench-worker time`), and prints one line of JSON.

  train:  per step, as `ddpm train`'s (ddpm_train::Trainer::train_step): a batch of u8 images
          from memory turned into floats in [-1, 1], random timesteps, Gaussian noise,
          x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (linear schedule, T = 1000), eps
          prediction in training mode (dropout on), MSE loss, backward, gradient clipping to
          norm 1, AdamW (betas (0.9, 0.999), eps 1e-8, no weight decay), then the EMA update of
          the weights (decay 0.995 warmed up as min(decay, (1 + n) / (10 + n)) at update n);
  sample: per step: one forward pass without gradients (evaluation mode); then whole
          deterministic DDIM samples (eta 0, x0 clipped to [-1, 1]) of `--ddim-steps` steps.

  peak:   the machine's matrix-multiply rate: a large square matmul (f32 without TF32; bf16 too
          on CUDA), best of a few repetitions, in FLOP/s.

On CUDA (`--device cuda`) every timed step ends with `torch.cuda.synchronize()`, and
`--precision bf16|f16` runs the model under `torch.autocast` (f32 weights and optimizer, as our
side; f16 adds a GradScaler), which is PyTorch's standard mixed precision.

`--mode` picks how PyTorch runs:
  eager:   plain eager PyTorch (the default);
  compile: the model under `torch.compile` (inductor), nothing else changed;
  best:    what a performance-minded user turns on: `torch.compile` (inductor; `--compile-mode`,
           default "max-autotune" on CUDA and inductor's default on the CPU), channels_last
           model and inputs, fused AdamW (`fused=True`), and on CUDA `cudnn.benchmark` and TF32
           matmuls and convolutions wherever f32 is computed.
Compilation happens in the untimed warm-up steps (compiled modes run one more than `--warmup`:
the first run after compiling is still slow); `compile_s` in the JSON is the warm-up's time
beyond that many steady steps (for sampling, plus the first call at the DDIM batch size). When
compiling fails, the JSON line carries `error` (the exception's first line) and no times.

Usage: python bench.py --preset mnist-small --task train --batch 32 --warmup 2 --iters 5 --threads 2
       python bench.py --preset cifar10 --task train --batch 128 --device cuda --precision bf16 --mode best
       python bench.py --task peak --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import models

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
# ddpm_train::TrainConfig's defaults, which `ddpm train` and our benchmark worker use.
LR = 1e-3
EMA_DECAY = 0.995


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "f32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=DTYPES[precision])


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


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], n: int) -> None:
    """Moves the averages towards the weights after optimizer step `n` (1-based), in place, with
    the decay warm-up of ddpm_train::ema (every tensor in one foreach call where torch has it)."""
    d = min(EMA_DECAY, (1.0 + n) / (10.0 + n))
    with torch.no_grad():
        weights = [p.detach() for p in params]
        if hasattr(torch, "_foreach_lerp_"):
            torch._foreach_lerp_(ema, weights, 1.0 - d)
        else:
            for e, w in zip(ema, weights):
                e.lerp_(w, 1.0 - d)


def channels_last(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if on else x


def mark_step(device: torch.device, compiled: bool) -> None:
    """Tells CUDA-graph trees (max-autotune's CUDA graphs) that a new step begins."""
    if compiled and device.type == "cuda" and hasattr(torch, "compiler"):
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
        if mark is not None:
            mark()


def make_optimizer(params, best: bool):
    """AdamW with TrainConfig's defaults; fused (one kernel for every tensor) in best mode."""
    kwargs = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if best:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError) as e:
            print(f"bench.py: fused AdamW unavailable ({e}); foreach AdamW", file=sys.stderr)
    return torch.optim.AdamW(params, **kwargs)


def time_train(model, shape, batch, warmup, iters, gen, device, precision, mode="eager"):
    """Returns the seconds of each timed step and of each warm-up step."""
    best = mode == "best"
    compiled = mode != "eager"
    abar = linear_alphas_cumprod()
    sa = abar.sqrt().float().to(device)
    s1 = (1.0 - abar).sqrt().float().to(device)
    model.train()
    params = list(model.parameters())
    opt = make_optimizer(params, best)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "f16")
    ema = [p.detach().clone().float() for p in params]
    # Random u8 images held in memory, a few batches of them, as our worker's data set (the u8
    # cache of ddpm_data::Dataset, (c, h, w) per image); each step takes the next batch of a
    # shuffled epoch and converts it to floats, as ddpm_data::Loader does.
    images = torch.randint(0, 256, (max(4 * batch, 64), *shape), dtype=torch.uint8,
                           generator=gen)
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    times, warm = [], []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        if pos + batch > len(images):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        x0 = channels_last((images[idx].float() / 127.5 - 1.0).to(device), best)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        noise = channels_last(torch.randn((batch, *shape), generator=gen).to(device), best)
        x_t = sa[t][:, None, None, None] * x0 + s1[t][:, None, None, None] * noise
        mark_step(device, compiled)
        with autocast(device, precision):
            pred = model(x_t, t)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, params, i + 1)
        loss.item()
        sync(device)
        (times if i >= warmup else warm).append(time.perf_counter() - start)
    return times, warm


@torch.no_grad()
def ddim_sample(model, shape, batch, steps, gen, device, precision, mode="eager") -> torch.Tensor:
    abar = linear_alphas_cumprod()
    ts = list(reversed(spaced_timesteps(1000, steps)))
    x = channels_last(torch.randn((batch, *shape), generator=gen).to(device), mode == "best")
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        mark_step(device, mode != "eager")
        with autocast(device, precision):
            eps = model(x, torch.full((batch,), t, dtype=torch.int64, device=device)).float()
        x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-1, 1)
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    x = x.clamp(-1, 1)
    sync(device)
    return x


def time_sample(model, shape, batch, warmup, iters, ddim_batch, ddim_steps, ddim_runs, gen,
                device, precision, mode="eager"):
    """Returns the seconds of each timed step, of each DDIM sample, of each warm-up step, and of
    the untimed first call at the DDIM batch size (compiled modes, when it differs)."""
    model.eval()
    compiled = mode != "eager"
    times, warm = [], []
    x = channels_last(torch.randn((batch, *shape), generator=gen).to(device), mode == "best")
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    with torch.no_grad():
        for i in range(warmup + iters):
            sync(device)
            start = time.perf_counter()
            mark_step(device, compiled)
            with autocast(device, precision):
                model(x, t)
            sync(device)
            (times if i >= warmup else warm).append(time.perf_counter() - start)
    ddim_warm = None
    if compiled and ddim_runs > 0 and ddim_batch != batch:
        # A compiled model specializes on shapes: compile the DDIM batch's graph before timing.
        start = time.perf_counter()
        ddim_sample(model, shape, ddim_batch, 1, gen, device, precision, mode)
        ddim_warm = time.perf_counter() - start
    ddim = []
    for _ in range(ddim_runs):
        start = time.perf_counter()
        ddim_sample(model, shape, ddim_batch, ddim_steps, gen, device, precision, mode)
        ddim.append(time.perf_counter() - start)
    return times, ddim, warm, ddim_warm


def compile_seconds(warm: list[float], times: list[float], extra: float | None) -> float:
    """Warm-up time beyond as many steady steps (the median timed step), plus the first call at
    another batch size less one steady step of it (taken as the steady step itself)."""
    if not warm or not times:
        return 0.0
    steady = statistics.median(times)
    return max(0.0, sum(warm) - len(warm) * steady) + (extra or 0.0)


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n x n x n matrix products (2 n^3 FLOPs each)."""
    a = torch.randn((n, n), device=device).to(dtype)
    b = torch.randn((n, n), device=device).to(dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def measure_peak(device: torch.device, size: int) -> dict:
    """The matmul rates of this machine: f32 (TF32 off) and, on CUDA, bf16."""
    torch.backends.cuda.matmul.allow_tf32 = False
    n = size or (8192 if device.type == "cuda" else 2048)
    rates = {"f32": matmul_rate(n, torch.float32, device)}
    if device.type == "cuda":
        rates["bf16"] = matmul_rate(n, torch.bfloat16, device)
    return {"size": n, "rates": rates}


def setup_mode(model, device: torch.device, mode: str, compile_mode: str | None):
    """The model prepared for `mode` (see the module docs)."""
    if mode == "best":
        model = model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    if mode in ("compile", "best"):
        if compile_mode is None:
            compile_mode = "max-autotune" if device.type == "cuda" and mode == "best" else "default"
        model = torch.compile(model, mode=compile_mode, dynamic=False)
    return model, compile_mode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(models.PRESETS))
    ap.add_argument("--task", required=True, choices=["train", "sample", "peak"])
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--mode", default="eager", choices=["eager", "compile", "best"])
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile's mode (default: max-autotune for best on CUDA, else default)")
    ap.add_argument("--peak-size", type=int, default=0, help="matrix side of --task peak")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ddim-batch", type=int, default=0)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--ddim-runs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    version = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cpu":
        # What ATen's kernels and inductor's code use (ATEN_CPU_CAPABILITY caps it).
        version += f", CPU capability {torch.backends.cpu.get_cpu_capability()}"

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "peak":
        peak = measure_peak(device, args.peak_size)
        print(json.dumps({"engine": "pytorch", "device": args.device, "version": version,
                          "threads": torch.get_num_threads(), **peak}))
        return 0
    if args.preset is None or args.batch <= 0:
        ap.error("--preset and --batch are required for train and sample")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = models.PRESETS[args.preset]
    model = models.build_model(config).to(device)
    params = models.num_parameters(model)
    shape = models.image_shape(config)
    ddim, compile_s, error, compile_mode = [], None, None, None
    # A compiled model's first run after compiling is still slow (code loaded, kernels tuned):
    # one more untimed step, counted in compile_s.
    warmup = args.warmup + (1 if args.mode != "eager" else 0)
    try:
        runner, compile_mode = setup_mode(model, device, args.mode, args.compile_mode)
        if args.task == "train":
            times, warm = time_train(runner, shape, args.batch, warmup, args.iters, gen,
                                     device, args.precision, args.mode)
            extra = None
        else:
            times, ddim, warm, extra = time_sample(
                runner, shape, args.batch, warmup, args.iters,
                args.ddim_batch or args.batch, args.ddim_steps, args.ddim_runs, gen, device,
                args.precision, args.mode,
            )
        if args.mode != "eager":
            compile_s = compile_seconds(warm, times, extra)
    except Exception as e:  # noqa: BLE001 - any failure of compiling is reported, not raised
        if args.mode == "eager":
            raise
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
        print(f"bench.py: {args.mode} mode failed on {args.preset}: {error}", file=sys.stderr)
        times, ddim = [], []
    gpu_peak_kb = None
    gpu_name = None
    if device.type == "cuda":
        gpu_peak_kb = torch.cuda.max_memory_allocated(device) // 1024
        gpu_name = torch.cuda.get_device_name(device)
    print(
        json.dumps(
            {
                "engine": "pytorch",
                "preset": args.preset,
                "task": args.task,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "params": params,
                "times_s": times,
                "ddim_s": ddim,
                "ddim_batch": args.ddim_batch or args.batch,
                "ddim_steps": args.ddim_steps,
                "peak_rss_kb": peak_rss_kb(),
                "device": args.device,
                "precision": args.precision,
                "gpu_peak_kb": gpu_peak_kb,
                "gpu_name": gpu_name,
                "version": version,
                "mode": args.mode,
                "compile_mode": compile_mode,
                "compile_s": compile_s,
                "error": error,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
