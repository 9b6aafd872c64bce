"""A small 3D U-Net denoiser backbone (z, y, x), small enough to train on 2 CPU cores.

It maps fused slot features ``(B, base_channels, Z', Y', X')`` (``Z' = Z / patch_z`` ...)
and a timestep ``(B,)`` to features of the same shape, normalised and activated, ready for
a slot head. Residual blocks get the timestep through an additive embedding; the residual
branch's last convolution starts at zero so every block begins as the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from dosegym.diffusion.config import UNetConfig
from dosegym.errors import ModelError


class ResBlock3D(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention3D(nn.Module):
    """Multi-head self-attention over all voxels of a (coarse) feature grid."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ModelError(f"unet: attention channels {channels} not divisible by attention_heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *sp = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(h).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return x + self.out(a).transpose(1, 2).reshape(b, c, *sp)


class UNet3D(nn.Module):
    """See module docstring; ``dim`` is the width of the fused input and of the output."""

    def __init__(self, cfg: UNetConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = tuple(cfg.patch)
        levels = len(cfg.channel_mult)
        factor = 2 ** (levels - 1)
        for axis, (n, p) in enumerate(zip(shape, self.patch)):
            if n % p or (n // p) % factor:
                raise ModelError(
                    f"unet: grid size {n} on axis {'zyx'[axis]} must be divisible by patch {p} and then by "
                    f"2^(levels-1) = {factor} (channel_mult has {levels} levels); shape {tuple(shape)}"
                )
        base, g = cfg.base_channels, cfg.groups
        self.dim = base
        temb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        chans = [base * m for m in cfg.channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = base
        for i, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3D(c, ch, temb_dim, g, cfg.dropout))
                c = ch
            self.down.append(blocks)
            self.downsample.append(
                nn.Conv3d(c, c, 3, stride=2, padding=1) if i < levels - 1 else nn.Identity()
            )
        self.mid1 = ResBlock3D(c, c, temb_dim, g, cfg.dropout)
        self.mid_attn = Attention3D(c, cfg.attention_heads, g) if cfg.mid_attention else None
        self.mid2 = ResBlock3D(c, c, temb_dim, g, cfg.dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            ch = chans[i]
            blocks = nn.ModuleList()
            for j in range(cfg.num_res_blocks):
                blocks.append(ResBlock3D(c + (chans[i] if j == 0 else 0), ch, temb_dim, g, cfg.dropout))
                c = ch
            self.up.append(blocks)
            out_c = chans[i - 1] if i > 0 else base
            self.upsample.append(nn.Conv3d(c, out_c, 3, padding=1) if i > 0 else nn.Conv3d(c, base, 1))
            c = out_c
        self.out_norm = nn.GroupNorm(g, base)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = get_timestep_embedding(t.float(), self.dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_mlp(temb.to(h.dtype))
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid1(h, temb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, temb)
        last = len(self.up) - 1
        for k, (blocks, up) in enumerate(zip(self.up, self.upsample)):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, temb)
            if k < last:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = up(h)
        return F.silu(self.out_norm(h))
