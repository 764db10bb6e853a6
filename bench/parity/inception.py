#!/usr/bin/env python3
"""Parity check of ddpm-rs's Inception FID network against pytorch-fid's own module.

Builds pytorch-fid's `InceptionV3([3])` (resize_input=True, normalize_input=True) with RANDOM
weights (pytorch-fid's constructor downloads its weights; here the download is replaced by the
random model's own state dict, and the BatchNorm running statistics are randomized so that they
matter), saves that state dict in the three forms ddpm-rs reads (legacy `torch.save`, zip
`torch.save`, safetensors), runs a few images in [0, 1] through it (grayscale 28x28 repeated to
RGB and RGB 32x32) and saves images and pool3 features. `cargo xtask parity inception` runs this
script and then the Rust side on the same files, and compares.

Also the resize check: torch's F.interpolate(bilinear, align_corners=False) of a few images to
299x299, saved for the Rust resize to be compared with.

    python bench/parity/inception.py OUT_DIR [--seed 0]
    python bench/parity/inception.py --fixtures DIR   # the small .pth files of ddpm-train's tests
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F


def random_fid_inception(seed):
    """pytorch-fid's InceptionV3([3]) with random weights and random BatchNorm statistics, and
    the state dict it loaded (fid_inception_v3's names, as in pytorch-fid's weights file)."""
    import pytorch_fid.inception as pfi

    g = torch.Generator().manual_seed(seed)
    loaded = {}

    def fake_download(*args, **kwargs):
        # torchvision's Inception3 has the names and shapes of fid_inception_v3 (pytorch-fid's
        # blocks subclass torchvision's with the same constructor arguments).
        shapes = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
        for name, t in shapes.items():
            if not t.is_floating_point():
                v = t.clone()
            elif name.endswith("conv.weight"):
                v = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
            elif name.endswith("bn.weight"):
                v = 0.5 + torch.rand(t.shape, generator=g)
            elif name.endswith("bn.bias"):
                v = 0.2 * torch.randn(t.shape, generator=g)
            elif name.endswith("running_mean"):
                v = 0.1 * torch.randn(t.shape, generator=g)
            elif name.endswith("running_var"):
                v = 0.5 + torch.rand(t.shape, generator=g)
            else:
                v = 0.01 * torch.randn(t.shape, generator=g)
            loaded[name] = v.contiguous()
        return dict(loaded)

    # fid_inception_v3 calls the module's load_state_dict_from_url: replace the download only.
    saved = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = fake_download
    try:
        net = pfi.InceptionV3([3], resize_input=True, normalize_input=True)
    finally:
        pfi.load_state_dict_from_url = saved
    return net.eval(), loaded


def save_state(state, out):
    from safetensors.torch import save_file

    floats = {k: v.contiguous() for k, v in state.items() if v.is_floating_point()}
    torch.save(state, os.path.join(out, "weights-legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(state, os.path.join(out, "weights-zip.pth"))
    save_file(floats, os.path.join(out, "weights.safetensors"))


def inputs(seed):
    g = torch.Generator().manual_seed(seed + 1)
    gray = torch.rand((4, 1, 28, 28), generator=g)
    rgb = torch.rand((4, 3, 32, 32), generator=g)
    return {"gray28": gray, "rgb32": rgb}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixtures", help="write the tiny .pth test fixtures into this directory")
    a = p.parse_args()
    if a.fixtures:
        os.makedirs(a.fixtures, exist_ok=True)
        state = {
            "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
            "a.bias": torch.tensor([-1.5, 2.0]),
            "n": torch.tensor(7),
        }
        torch.save(state, os.path.join(a.fixtures, "legacy.pth"), _use_new_zipfile_serialization=False)
        torch.save(state, os.path.join(a.fixtures, "zip.pth"))
        return
    if not a.out:
        p.error("OUT directory needed")
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(a.out, exist_ok=True)
    net, state = random_fid_inception(a.seed)
    assert torch.equal(net.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(net.blocks[3][2].branch_pool.bn.running_var,
                       state["Mixed_7c.branch_pool.bn.running_var"])
    save_state(state, a.out)
    tensors = {}
    meta = {"seed": a.seed, "torch": torch.__version__, "cases": []}
    with torch.no_grad():
        for case, x in inputs(a.seed).items():
            rgb = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            feats = net(rgb)[0].reshape(x.shape[0], -1)
            tensors[f"{case}.images"] = x.contiguous()
            tensors[f"{case}.features"] = feats.contiguous()
            resized = F.interpolate(rgb, size=(299, 299), mode="bilinear", align_corners=False)
            tensors[f"{case}.resized"] = resized[:1].contiguous()
            meta["cases"].append(case)
    save_file(tensors, os.path.join(a.out, "cases.safetensors"))
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(f"pytorch-fid reference written to {a.out} ({', '.join(meta['cases'])})")


if __name__ == "__main__":
    main()
