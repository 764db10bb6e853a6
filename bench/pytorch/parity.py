"""Checks that the PyTorch reference (models.py) is the model of ddpm-rs.

Reads a weights file written by `DiffusionModel::save` (tensors plus the model config as JSON in
the metadata key `ddpm.model_config`) and a file of a fixed input and the Rust model's output on
it (written by `cargo xtask bench-worker export`), then checks:

1. the config in the weights file equals our PyTorch preset of the same name;
2. the parameter count of the PyTorch model equals ours;
3. the weights load with `load_state_dict(strict=True)` (same names, same shapes);
4. the PyTorch forward output on the same input matches ours: max |ours - torch| <= tol * max |ours|;
5. our FLOP count of one image's forward pass (`ddpm_unet::flops`, in the metadata key
   `flops_forward`) equals what PyTorch's `FlopCounterMode` counts (convolutions and matrix
   products) on the same forward pass, within 0.1%.

Usage: python parity.py WEIGHTS.safetensors IO.safetensors [--tol 1e-4]
Prints a summary line and, last, one line of JSON; exits 1 when a check fails.
Runnable on its own: `cargo xtask bench --parity-only` writes both files and runs this.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("io")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with safe_open(args.weights, framework="pt") as f:
        meta = f.metadata() or {}
    if "ddpm.model_config" not in meta:
        print(f"{args.weights}: no ddpm.model_config metadata: not written by ddpm-rs", file=sys.stderr)
        return 2
    config = json.loads(meta["ddpm.model_config"])
    with safe_open(args.io, framework="pt") as f:
        io_meta = f.metadata() or {}
    preset = io_meta.get("preset")
    ours_params = int(io_meta["num_parameters"])

    failures = []
    if preset in models.PRESETS:
        ours_cfg = models.normalize_config(config)
        torch_cfg = models.normalize_config(models.PRESETS[preset])
        if ours_cfg != torch_cfg:
            failures.append(f"preset {preset}: config differs: ours {ours_cfg}, PyTorch {torch_cfg}")

    model = models.build_model(config)
    torch_params = models.num_parameters(model)
    if torch_params != ours_params:
        failures.append(f"parameter count: ours {ours_params}, PyTorch {torch_params}")

    state = load_file(args.weights)
    file_params = sum(t.numel() for t in state.values())
    if file_params != ours_params:
        failures.append(f"the weights file holds {file_params} parameters, ours reported {ours_params}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        failures.append(f"load_state_dict(strict=True) failed: {e}")

    io = load_file(args.io)
    x, t, ours = io["x"], io["t"].to(torch.int64), io["out"]
    model.eval()
    with torch.no_grad():
        theirs = model(x, t)
    if theirs.shape != ours.shape:
        failures.append(f"output shape: ours {tuple(ours.shape)}, PyTorch {tuple(theirs.shape)}")
        max_abs = rel = rel_l2 = float("nan")
    else:
        diff = (theirs.double() - ours.double()).abs()
        max_abs = diff.max().item()
        scale = ours.double().abs().max().item()
        rel = max_abs / scale if scale > 0 else max_abs
        rel_l2 = ((theirs.double() - ours.double()).norm() / ours.double().norm()).item()
        if not rel <= args.tol:
            failures.append(f"output differs: max |ours - torch| / max |ours| = {rel:.3g} > {args.tol:g}")

    flops_ours = int(io_meta["flops_forward"]) if "flops_forward" in io_meta else None
    flops_torch = None
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x[:1], t[:1])
        flops_torch = int(counter.get_total_flops())
    except ImportError:
        pass
    if flops_ours is not None and flops_torch is not None:
        if abs(flops_ours - flops_torch) > 1e-3 * flops_torch:
            failures.append(f"FLOPs of one forward pass: ours {flops_ours}, PyTorch's FlopCounterMode {flops_torch}")

    ok = not failures
    for f in failures:
        print(f"parity {preset}: FAIL: {f}", file=sys.stderr)
    print(
        f"parity {preset}: {'ok' if ok else 'FAILED'}: {ours_params} parameters (PyTorch {torch_params}), "
        f"max rel. error {rel:.2e}, rel. L2 error {rel_l2:.2e} (tolerance {args.tol:g}), "
        f"input {tuple(x.shape)} at t={t.tolist()}, FLOPs per image ours {flops_ours} PyTorch {flops_torch}",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "preset": preset,
                "ok": ok,
                "params_ours": ours_params,
                "params_torch": torch_params,
                "max_abs_err": max_abs,
                "max_rel_err": rel,
                "rel_l2_err": rel_l2,
                "tol": args.tol,
                "failures": failures,
                "flops_ours": flops_ours,
                "flops_torch": flops_torch,
                "torch_version": torch.__version__,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
