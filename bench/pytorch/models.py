"""PyTorch reference of the ddpm-rs noise-prediction networks.

Written from the Rust sources of `crates/ddpm-unet` (unet.rs, ddpm_unet.rs, resnet.rs,
attention.rs, resample.rs, layers.rs, embedding.rs, ops.rs), layer for layer, so that:

- every module and parameter name equals the tensor name of the Rust model (docs/tensor-names.md),
  and a weights file written by `DiffusionModel::save` loads with `load_state_dict(strict=True)`;
- the presets (`PRESETS`) equal `ModelConfig::preset` in crates/ddpm-unet/src/model.rs;
- given the same weights, the forward pass computes the same function (`parity.py` checks it).

Two architectures:
- `Unet`: the lucidrains / annotated-diffusion U-Net (weight-standardized ResNet blocks with
  scale-shift time conditioning, linear attention at every level, full attention in the middle,
  pixel-unshuffle downsampling, nearest upsampling);
- `DdpmUnet`: the DDPM paper's U-Net (additive time conditioning, dropout, single-head attention,
  strided-conv downsampling after (0, 1, 0, 1) zero padding).

Configs are plain dicts in the JSON form of the Rust `ModelConfig` (`{"arch": "unet", ...}`), as
stored in the metadata key `ddpm.model_config` of our weights files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The presets of `ModelConfig::preset`, in the serde JSON form of the Rust configs.
_UNET_DEFAULT = {
    "arch": "unet",
    "image_size": 32,
    "channels": 3,
    "dim": 64,
    "init_dim": None,
    "out_dim": None,
    "dim_mults": [1, 2, 4, 8],
    "self_condition": False,
    "resnet_block_groups": 8,
    "init_conv_kernel": 7,
    "attn_heads": 4,
    "attn_dim_head": 32,
}
_DDPM_CIFAR10 = {
    "arch": "ddpm_unet",
    "image_size": 32,
    "in_channels": 3,
    "out_channels": None,
    "ch": 128,
    "ch_mult": [1, 2, 2, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.1,
    "groups": 32,
}
PRESETS = {
    "mnist-small": {
        **_UNET_DEFAULT,
        "image_size": 28,
        "channels": 1,
        "dim": 16,
        "dim_mults": [1, 2, 4],
        "resnet_block_groups": 4,
        "init_conv_kernel": 1,
    },
    "fashion": {
        **_UNET_DEFAULT,
        "image_size": 28,
        "channels": 1,
        "dim": 28,
        "dim_mults": [1, 2, 4],
        "resnet_block_groups": 4,
        "init_conv_kernel": 1,
    },
    "cifar-small": {
        **_DDPM_CIFAR10,
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [8],
        "groups": 8,
    },
    "cifar10": dict(_DDPM_CIFAR10),
    # LearnOpenCV's "Guide to training DDPMs from scratch" at 32x32 (DdpmUnetConfig::learnopencv).
    "learnopencv": {
        **_DDPM_CIFAR10,
        "ch": 64,
        "ch_mult": [1, 2, 4, 4],
        "attn_resolutions": [16, 8],
        "groups": 8,
    },
    # The layout of google/ddpm-celebahq-256 (DdpmUnetConfig::celebahq_256): diffusers'
    # block_out_channels (128, 128, 256, 256, 512, 512), attention at 16x16 only.
    "celebahq-256": {
        **_DDPM_CIFAR10,
        "image_size": 256,
        "ch_mult": [1, 1, 2, 2, 4, 4],
        "dropout": 0.0,
    },
}


def normalize_config(config: dict) -> dict:
    """The config with its optional fields filled in as serde's defaults do."""
    if config["arch"] == "unet":
        optional = {"init_dim": None, "out_dim": None, "self_condition": False}
    else:
        optional = {"out_channels": None}
    return {**optional, **config}


def build_model(config: dict) -> nn.Module:
    """The network of a config dict (`{"arch": "unet" | "ddpm_unet", ...}`)."""
    config = normalize_config(config)
    arch = config["arch"]
    if arch == "unet":
        return Unet(config)
    if arch == "ddpm_unet":
        return DdpmUnet(config)
    raise ValueError(f"unknown arch {arch!r}")


def image_shape(config: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the images a config's model reads."""
    config = normalize_config(config)
    c = config["channels"] if config["arch"] == "unet" else config["in_channels"]
    return c, config["image_size"], config["image_size"]


# ----------------------------------------------------------------------------------------------
# Shared pieces (embedding.rs, layers.rs)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(b,) timesteps -> (b, dim): [sin(t f_i)..., cos(t f_i)...], f_i = exp(-ln(1e4) i / (h-1)).

    As embedding.rs: the frequencies are computed in float64 and rounded to float32, the
    products in float32, zero-padded when `dim` is odd.
    """
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -scale).to(torch.float32)
    args = t.to(torch.float32)[:, None] * freqs.to(t.device)[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class WeightStandardizedConv2d(nn.Conv2d):
    """A conv whose kernel is standardized per output channel at every forward (Qiao et al.
    2019): `(w - mean) / sqrt(var + eps)`, biased variance, eps 1e-5 (1e-3 in half precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        centered = w - mean
        var = centered.pow(2).mean(dim=(1, 2, 3), keepdim=True)
        w = centered / torch.sqrt(var + eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


# ----------------------------------------------------------------------------------------------
# The lucidrains / annotated-diffusion Unet (unet.rs)


class SinusoidalPosEmb(nn.Module):
    """Index 0 of `time_mlp` (no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(t, self.dim)


class Block(nn.Module):
    """Weight-standardized 3x3 conv, GroupNorm(eps 1e-5), optional scale-shift, SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out, eps=1e-5)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """`block2(block1(x, scale_shift(t))) + res_conv(x)` (resnet.rs `ResnetBlock`)."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t_emb):
        ss = self.mlp(t_emb)[:, :, None, None]
        scale, shift = ss.chunk(2, dim=1)
        h = self.block1(x, (scale, shift))
        h = self.block2(h)
        return h + self.res_conv(x)


def _split_heads(qkv: torch.Tensor, heads: int, dim_head: int):
    """(b, 3 * heads * d, h, w) -> q, k, v each (b, heads, d, h*w)."""
    b, _, h, w = qkv.shape
    return [p.reshape(b, heads, dim_head, h * w) for p in qkv.chunk(3, dim=1)]


class LinearAttention(nn.Module):
    """Softmax over features for q, over positions for k; scale dim_head^-0.5 on q;
    `to_out` = 1x1 conv then GroupNorm(1, eps 1e-5)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        hidden = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim, eps=1e-5))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_heads(self.to_qkv(x), self.heads, self.dim_head)
        q = q.softmax(dim=2) * self.dim_head**-0.5
        k = k.softmax(dim=3)
        context = k @ v.transpose(2, 3)  # (b, heads, d, e)
        out = context.transpose(2, 3) @ q  # (b, heads, e, n)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class Attention(nn.Module):
    """Multi-head softmax attention over all pixels; channels of the output are (head, d)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        hidden = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_heads(self.to_qkv(x), self.heads, self.dim_head)
        sim = (q * self.dim_head**-0.5).transpose(2, 3) @ k  # (b, heads, i, j)
        attn = sim.softmax(dim=3)
        out = v @ attn.transpose(2, 3)  # (b, heads, d, i)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class PreNorm(nn.Module):
    """`fn(GroupNorm(1, dim, eps 1e-5)(x))`."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim, eps=1e-5)

    def forward(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """`x + fn(x)`."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


class PixelUnshuffle2x(nn.Module):
    """(b, c, h, w) -> (b, 4c, h/2, w/2), channel order (c, p1, p2) as einops'
    `b c (h p1) (w p2) -> b (c p1 p2) h w` (ops.rs `pixel_unshuffle_2x`)."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * 4, h // 2, w // 2)


def downsample(dim: int, dim_out: int) -> nn.Module:
    """Pixel unshuffle then a 1x1 conv (`<level>.3.1.*`)."""
    return nn.Sequential(PixelUnshuffle2x(), nn.Conv2d(dim * 4, dim_out, 1))


def upsample(dim: int, dim_out: int) -> nn.Module:
    """Nearest 2x upsampling then a 3x3 conv (`<level>.3.1.*`)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


class Unet(nn.Module):
    """The lucidrains / annotated-diffusion U-Net (unet.rs `Unet`)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        dim = cfg["dim"]
        init_dim = cfg["init_dim"] or dim
        channels = cfg["channels"]
        self.self_condition = bool(cfg["self_condition"])
        in_ch = channels * (2 if self.self_condition else 1)
        k = cfg["init_conv_kernel"]
        self.init_conv = nn.Conv2d(in_ch, init_dim, k, padding=k // 2)
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        dims = [init_dim] + [dim * m for m in cfg["dim_mults"]]
        in_out = list(zip(dims[:-1], dims[1:]))
        g = cfg["resnet_block_groups"]
        heads, dh = cfg["attn_heads"], cfg["attn_dim_head"]
        n = len(in_out)
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i + 1 == n
            self.downs.append(
                nn.ModuleList(
                    [
                        ResnetBlock(d_in, d_in, time_dim, g),
                        ResnetBlock(d_in, d_in, time_dim, g),
                        Residual(PreNorm(d_in, LinearAttention(d_in, heads, dh))),
                        nn.Conv2d(d_in, d_out, 3, padding=1) if last else downsample(d_in, d_out),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, time_dim, g)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid, heads, dh)))
        self.mid_block2 = ResnetBlock(mid, mid, time_dim, g)
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i + 1 == n
            self.ups.append(
                nn.ModuleList(
                    [
                        ResnetBlock(d_out + d_in, d_out, time_dim, g),
                        ResnetBlock(d_out + d_in, d_out, time_dim, g),
                        Residual(PreNorm(d_out, LinearAttention(d_out, heads, dh))),
                        nn.Conv2d(d_out, d_in, 3, padding=1) if last else upsample(d_out, d_in),
                    ]
                )
            )
        out_dim = cfg["out_dim"] or channels
        self.final_res_block = ResnetBlock(init_dim * 2, init_dim, time_dim, g)
        self.final_conv = nn.Conv2d(init_dim, out_dim, 1)

    def forward(self, x, t, x_self_cond=None):
        # x: (b, c, s, s), t: (b,)
        if self.self_condition:
            cond = x_self_cond if x_self_cond is not None else torch.zeros_like(x)
            x = torch.cat([cond, x], dim=1)
        x = self.init_conv(x)
        r = x
        t = self.time_mlp(t)
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = block2(x, t)
            x = attn(x)
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), t)
            x = block2(torch.cat([x, skips.pop()], dim=1), t)
            x = attn(x)
            x = up(x)
        x = self.final_res_block(torch.cat([x, r], dim=1), t)
        return self.final_conv(x)


# ----------------------------------------------------------------------------------------------
# The DDPM paper's U-Net (ddpm_unet.rs)


class DdpmResnetBlock(nn.Module):
    """`shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + temb_proj(silu(t))))))`,
    GroupNorm eps 1e-6."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = F.silu(self.norm2(h))
        h = self.conv2(self.dropout(h))
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nn.Module):
    """`x + proj_out(attention(norm(x)))`, single head over all pixels, GroupNorm eps 1e-6."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w)
        k = self.k(hn).reshape(b, c, h * w)
        v = self.v(hn).reshape(b, c, h * w)
        weights = (q.transpose(1, 2) @ k) * c**-0.5  # (b, i, j)
        weights = weights.softmax(dim=2)
        out = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class StridedConvDown(nn.Module):
    """Zero-pad one row and column at the bottom and right, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class NearestUp(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (`upsample.conv.*`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Temb(nn.Module):
    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])


class _Mid(nn.Module):
    def __init__(self, block_in: int, temb_ch: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = DdpmResnetBlock(block_in, block_in, temb_ch, groups, dropout)
        self.attn_1 = AttnBlock(block_in, groups)
        self.block_2 = DdpmResnetBlock(block_in, block_in, temb_ch, groups, dropout)


class DdpmUnet(nn.Module):
    """The DDPM paper's U-Net (ddpm_unet.rs `DdpmUnet`)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        ch = cfg["ch"]
        ch_mult = cfg["ch_mult"]
        temb_ch = ch * 4
        g, p = cfg["groups"], cfg["dropout"]
        nrb = cfg["num_res_blocks"]
        n = len(ch_mult)
        in_mult = [1] + list(ch_mult)
        res = [cfg["image_size"] >> i for i in range(n)]
        with_attn = [r in cfg["attn_resolutions"] for r in res]
        self.ch = ch
        self.temb = _Temb(ch, temb_ch)
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(nrb):
                level.block.append(DdpmResnetBlock(block_in, block_out, temb_ch, g, p))
                block_in = block_out
                if with_attn[i]:
                    level.attn.append(AttnBlock(block_in, g))
            if i + 1 < n:
                level.downsample = StridedConvDown(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, temb_ch, g, p)
        ups = [None] * n
        for i in reversed(range(n)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i]
            for j in range(nrb + 1):
                skip_in = ch * in_mult[i] if j == nrb else ch * ch_mult[i]
                level.block.append(DdpmResnetBlock(block_in + skip_in, block_out, temb_ch, g, p))
                block_in = block_out
                if with_attn[i]:
                    level.attn.append(AttnBlock(block_in, g))
            if i > 0:
                level.upsample = NearestUp(block_in)
            ups[i] = level
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        out_ch = cfg["out_channels"] or cfg["in_channels"]
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, x, t, x_self_cond=None):
        # x: (b, c, s, s), t: (b,)
        temb = sinusoidal_embedding(t, self.ch)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if j < len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if j < len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = F.silu(self.norm_out(h))
        return self.conv_out(h)


def num_parameters(model: nn.Module) -> int:
    """The number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
