"""Writes the diffusers fixtures of ddpm-rs' `--pretrained` support (docs/pretrained.md).

Needs torch, diffusers and safetensors (plain `pip install torch diffusers safetensors`; the CPU
is enough). Everything is seeded, so a rerun with the same library versions rewrites the same
numbers; the versions used are recorded in the outputs.

1. crates/ddpm-schedule/tests/fixtures/diffusers_betas.json: the betas (and, for two cases, the
   alphas_cumprod) that diffusers' DDPMScheduler computes for each `beta_schedule` and for
   `trained_betas`, with the scheduler config each came from.
2. crates/ddpm-unet/tests/fixtures/diffusers-tiny/:
   - pipeline/: a tiny random UNet2DModel (two levels, attention at the second, 16x16 RGB) and a
     DDPMScheduler, written by `DDPMPipeline.save_pretrained` (safetensors, the google/ddpm-*
     layout: model_index.json, unet/, scheduler/), its weights renamed to
     unet/diffusion_pytorch_model.st (no committed file looks like a checkpoint; the tests
     assemble the directory under diffusers' name, see crates/ddpm-unet/tests/support/);
   - flat-bin/: the same model in the flat layout (model_index.json, config.json,
     scheduler_config.json at the top) with its weights as a PyTorch pickle
     `diffusion_pytorch_model.bin` under the old attention names (query/key/value/proj_attn)
     that the google/ddpm-* .bin files use;
   - diffusers-tiny-modern/: the same files (but flat-bin/) for a tiny UNet2DModel with
     diffusers' own defaults (MODERN_UNET: 4-feature attention heads, flip_sin_to_cos,
     freq_shift 0, downsample_padding 1, norm_eps 1e-5), the layout of the models diffusers'
     training example writes;
   - expected.st (a safetensors file): a fixed input `x` (2, 3, 16, 16) and timesteps `t`, the UNet's output
     `eps` on them, and a 10-step DDIM run (eta 0, clipped x0, `use_clipped_model_output`) of
     DDIMPipeline from the initial noise `ddim_noise`: the final sample `ddim_sample` (in
     [-1, 1], before the pipeline's conversion to [0, 1]), the pipeline's own images
     `ddim_images` (NHWC in [0, 1]) and the timesteps it visited `ddim_timesteps`.

Usage: python bench/pytorch/diffusers_fixtures.py [--root REPO_ROOT] [--only schedules|unet|unet-modern]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import diffusers
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

TINY_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=4,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    time_embedding_type="positional",
)

# diffusers' own defaults (those of the models its training example train_unconditional.py
# writes, the most common DDPMs on the Hub): heads of `attention_head_dim` features, [cos, sin]
# time embedding with freq_shift 0, symmetric downsampling padding, GroupNorm eps 1e-5. Only
# what makes it tiny is given; every setting below is left to diffusers.
MODERN_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=4,
)

SCHEDULE_CASES = [
    ("linear", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
    (
        "scaled_linear",
        dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ),
    ("squaredcos_cap_v2", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")),
    # Few steps: the last betas reach the 0.999 cap.
    ("squaredcos_cap_v2_short", dict(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2")),
    ("sigmoid", dict(num_train_timesteps=200, beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02)),
    ("laplace", dict(num_train_timesteps=100, beta_schedule="laplace")),
    (
        "trained_betas",
        dict(num_train_timesteps=5, beta_schedule="linear", trained_betas=[0.01, 0.02, 0.05, 0.1, 0.3]),
    ),
]


def schedule_fixture(path: str) -> None:
    cases = []
    for name, cfg in SCHEDULE_CASES:
        s = DDPMScheduler(**cfg)
        case = {
            "name": name,
            # Without diffusers' private keys (such as the unordered `_use_default_values`).
            "config": {k: v for k, v in s.config.items() if not k.startswith("_")},
            "betas": [float(b) for b in s.betas],
        }
        if name in ("linear", "squaredcos_cap_v2"):
            case["alphas_cumprod"] = [float(a) for a in s.alphas_cumprod]
        cases.append(case)
    out = {
        "made_by": "bench/pytorch/diffusers_fixtures.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32 (diffusers computes the betas in float32)",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=0, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter (GroupNorm weights and biases too), so that a misplaced
    tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def legacy_names(state: dict) -> dict:
    """The attention tensor names of diffusers' first releases (still in the google/ddpm-* .bin
    files)."""
    out = {}
    for k, v in state.items():
        for new, old in LEGACY.items():
            if f".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                break
        out[k] = v.clone().contiguous()
    return out


def tiny_fixture(root: str, config: dict = TINY_UNET, flat: bool = True) -> None:
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    randomize(unet, 1)
    unet.eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(os.path.join(root, "pipeline"), safe_serialization=True)

    if flat:
        flat_dir = os.path.join(root, "flat-bin")
        os.makedirs(flat_dir)
        for src, name in [
            (("unet", "config.json"), "config.json"),
            (("scheduler", "scheduler_config.json"), "scheduler_config.json"),
            (("model_index.json",), "model_index.json"),
        ]:
            shutil.copy(os.path.join(root, "pipeline", *src), os.path.join(flat_dir, name))
        torch.save(legacy_names(unet.state_dict()), os.path.join(flat_dir, "diffusion_pytorch_model.bin"))

    # The UNet on a fixed input.
    g = torch.Generator().manual_seed(2)
    x = torch.randn((2, 3, 16, 16), generator=g)
    t = torch.tensor([3, 777], dtype=torch.int64)
    with torch.no_grad():
        eps = unet(x, t).sample

    # A 10-step DDIM run of DDIMPipeline (eta 0, so no noise but the initial one).
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim_pipe = DDIMPipeline(unet=unet, scheduler=ddim)
    noise = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    images = ddim_pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(3),
        eta=0.0,
        num_inference_steps=10,
        use_clipped_model_output=True,
        output_type="np",
    ).images
    # The same loop by hand, from the same noise, for the sample before the conversion to
    # [0, 1] (and to check that the pipeline started from `noise`).
    ddim.set_timesteps(10)
    sample = noise.clone()
    with torch.no_grad():
        for step_t in ddim.timesteps:
            out = unet(sample, step_t).sample
            sample = ddim.step(out, step_t, sample, eta=0.0, use_clipped_model_output=True).prev_sample
    by_hand = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    gap = abs(by_hand - images).max()
    assert gap < 1e-6, f"the pipeline did not start from the saved noise: {gap}"

    save_file(
        {
            "x": x.contiguous(),
            "t": t.contiguous(),
            "eps": eps.contiguous(),
            "ddim_noise": noise.contiguous(),
            "ddim_sample": sample.contiguous(),
            "ddim_images": torch.from_numpy(images).contiguous(),
            "ddim_timesteps": ddim.timesteps.to(torch.int64).contiguous(),
        },
        os.path.join(root, "expected.st"),
        metadata={
            "made_by": "bench/pytorch/diffusers_fixtures.py",
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
            "parameters": str(sum(p.numel() for p in unet.parameters())),
        },
    )
    unet_dir = os.path.join(root, "pipeline", "unet")
    os.replace(
        os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"),
        os.path.join(unet_dir, "diffusion_pytorch_model.st"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--root", default=os.path.normpath(os.path.join(here, "..", "..")))
    ap.add_argument(
        "--only", choices=["schedules", "unet", "unet-modern"], help="write only one of the fixtures"
    )
    args = ap.parse_args()
    if args.only in (None, "schedules"):
        schedule_fixture(os.path.join(args.root, "crates/ddpm-schedule/tests/fixtures/diffusers_betas.json"))
    if args.only in (None, "unet"):
        tiny_fixture(os.path.join(args.root, "crates/ddpm-unet/tests/fixtures/diffusers-tiny"))
    if args.only in (None, "unet-modern"):
        tiny_fixture(
            os.path.join(args.root, "crates/ddpm-unet/tests/fixtures/diffusers-tiny-modern"),
            MODERN_UNET,
            flat=False,
        )
    print("fixtures written")


if __name__ == "__main__":
    main()
