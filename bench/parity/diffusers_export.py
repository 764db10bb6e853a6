"""Checks that `ddpm export --format diffusers` writes pipelines diffusers itself loads and runs
the same (docs/pretrained.md, "Export to diffusers").

1. Runs the ignored test `parity_export_for_diffusers` of crates/ddpm-cli/tests/export.rs, which
   exports the `cifar-small` and `cifar10` presets with every parameter randomized through
   `ddpm export` into WORK/<preset>/pipeline and writes our UNet's output on a fixed input to
   WORK/<preset>/expected.safetensors (`x`, `t`, `eps`); `cifar-small-classes` is `cifar-small`
   class-conditional (10 classes and the null label: diffusers' `num_class_embeds = 11`), whose
   input also has `labels`; `cifar-small-diffusers` is `cifar-small` with diffusers' own
   UNet2DModel defaults (16-feature attention heads, flip_sin_to_cos, freq_shift 0,
   downsample_padding 1, norm_eps 1e-5).
2. Loads each pipeline with `DDPMPipeline.from_pretrained` (strict: diffusers reports missing or
   unexpected keys as errors here), checks its scheduler's betas are ours (to float32 rounding:
   diffusers computes them in float32), runs its UNet on the same `x` and `t`, and prints the largest
   difference from our output, absolute and relative to the largest value of diffusers' output.

Needs torch, diffusers and safetensors (the benchmark venv: target/bench-venv). Fails (exit 1)
when a relative error exceeds --tol (1e-4, the issue's bar).

Usage: python bench/parity/diffusers_export.py [--work DIR] [--skip-export] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import diffusers
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
PRESETS = ["cifar-small", "cifar10", "cifar-small-classes", "cifar-small-diffusers"]


def export(work: str) -> None:
    env = dict(os.environ, DDPM_EXPORT_PARITY_DIR=os.path.abspath(work))
    cmd = [
        "cargo", "test", "--release", "--workspace", "--test", "export", "--",
        "--ignored", "--exact", "parity_export_for_diffusers",
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def check(work: str, preset: str) -> tuple[int, float, float, str, str]:
    pipe_dir = os.path.join(work, preset, "pipeline")
    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    assert isinstance(pipe.unet, UNet2DModel), type(pipe.unet)
    assert isinstance(pipe.scheduler, DDPMScheduler), type(pipe.scheduler)
    # from_pretrained warns and initializes randomly on missing keys unless told otherwise; load
    # the state dict strictly as well, so a naming slip cannot pass.
    strict = UNet2DModel.from_pretrained(os.path.join(pipe_dir, "unet"), low_cpu_mem_usage=False)
    ours_sd = load_file(os.path.join(pipe_dir, "unet", "diffusion_pytorch_model.safetensors"))
    missing, unexpected = strict.load_state_dict(ours_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    expected = load_file(os.path.join(work, preset, "expected.safetensors"))
    unet = pipe.unet.eval()
    with torch.no_grad():
        # A class-conditional export takes its labels (a class and the null label).
        labels = expected.get("labels")
        out = unet(expected["x"], expected["t"], class_labels=labels).sample
    diff = (out - expected["eps"]).abs().max().item()
    # diffusers computes its betas in float32 (torch.linspace): ours to float32 rounding.
    ours_betas = expected["betas"]
    beta_err = ((pipe.scheduler.betas.double() - ours_betas).abs() / ours_betas).max().item()
    assert beta_err < 1e-6, f"{preset}: scheduler betas differ by {beta_err:.2e} relative"
    scale = out.abs().max().item()
    params = sum(p.numel() for p in unet.parameters())
    betas = "trained_betas" if pipe.scheduler.config.trained_betas is not None else (
        pipe.scheduler.config.beta_schedule
    )
    return params, diff, diff / scale, f"{betas} ({beta_err:.1e})", str(tuple(expected["x"].shape))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "diffusers-export-parity"))
    ap.add_argument("--skip-export", action="store_true", help="reuse WORK as it is")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    if not a.skip_export:
        export(a.work)
    torch.manual_seed(0)
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    print("| preset | parameters | input | scheduler betas (rel. error) | max abs error | relative |")
    print("|---|---|---|---|---|---|")
    ok = True
    for preset in PRESETS:
        params, diff, rel, betas, shape = check(a.work, preset)
        ok &= rel <= a.tol
        print(f"| {preset} | {params:,} | {shape} | {betas} | {diff:.2e} | {rel:.2e} |")
    print("PASS" if ok else f"FAIL: a relative error above {a.tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
