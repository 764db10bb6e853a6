"""Checks that `ddpm sample --pretrained` reads diffusers' UNet2DModel as diffusers computes it, at
full size (docs/pretrained.md, "What was verified"): the committed fixtures are tiny; this makes
the real layouts with random weights.

1. For each case below, builds a `UNet2DModel` with that config, gives every parameter a random
   value (the GroupNorms too), saves it with `DDPMPipeline.save_pretrained` into
   WORK/<case>/pipeline, and writes its output on a fixed input to WORK/<case>/expected.safetensors
   (`x`, `t`, `eps`).
2. Runs the ignored test `parity_import_from_diffusers` of crates/ddpm-unet/tests/diffusers.rs,
   which loads each pipeline through our reader and prints the largest difference from
   diffusers' output (absolute, and relative to its largest value); it fails above 1e-4.

Cases:
- `ddpm-cifar10-32`: the config of google/ddpm-cifar10-32 (the DDPM paper's settings, one head);
- `train-unconditional-128`: the model diffusers' training example `train_unconditional.py`
  builds at its default resolution, every other setting diffusers' default (8-feature heads:
  64 per block at 512 channels; `flip_sin_to_cos`, `freq_shift` 0, `downsample_padding` 1,
  `norm_eps` 1e-5), the layout of most DDPMs on the Hub.

Needs torch, diffusers and safetensors (the benchmark venv: target/bench-venv).

Usage: python bench/parity/diffusers_import.py [--work DIR] [--cases NAME,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import diffusers
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))

CASES = {
    "ddpm-cifar10-32": dict(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    "train-unconditional-128": dict(
        sample_size=128,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=(
            "DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def write_case(work: str, name: str) -> None:
    out = os.path.join(work, name)
    os.makedirs(out, exist_ok=True)
    unet = UNet2DModel(**CASES[name])
    randomize(unet, 1)
    unet.eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
        os.path.join(out, "pipeline"), safe_serialization=True
    )
    s = unet.config.sample_size
    x = torch.randn((2, 3, s, s), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 777], dtype=torch.int64)
    with torch.no_grad():
        eps = unet(x, t).sample
    save_file(
        {"x": x.contiguous(), "t": t, "eps": eps.contiguous()},
        os.path.join(out, "expected.safetensors"),
        metadata={"parameters": str(sum(p.numel() for p in unet.parameters()))},
    )
    print(f"{name}: {sum(p.numel() for p in unet.parameters()):,} parameters written", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "diffusers-import-parity"))
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    for name in a.cases.split(","):
        write_case(a.work, name)
    env = dict(os.environ, DDPM_IMPORT_PARITY_DIR=os.path.abspath(a.work))
    cmd = [
        "cargo", "test", "--release", "--workspace", "--test", "diffusers", "--",
        "--ignored", "--exact", "parity_import_from_diffusers", "--nocapture",
    ]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
