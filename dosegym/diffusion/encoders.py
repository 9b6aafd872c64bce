"""Per-slot encoders (input stems) and heads (output projections) of the Any2Any model.

Patch ``(1, 1, 1)``: the encoder is a 3×3×3 convolution stem and the head a 3×3×3
convolution, both at full model-grid resolution. A larger patch (``(pz, py, px)``): the
encoder is a patch embedding (``Conv3d`` with kernel = stride = patch) onto a token grid
``patch`` times coarser, and the head a per-token linear map to ``C * pz * py * px``
values, unpatchified back to the model grid (as Wan's ``proj_out`` does).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SlotEncoder(nn.Module):
    """``(B, C, Z, Y, X)`` -> ``(B, dim, Z/pz, Y/py, X/px)``."""

    def __init__(self, channels: int, dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        if tuple(patch) == (1, 1, 1):
            self.proj = nn.Conv3d(channels, dim, 3, padding=1)
        else:
            self.proj = nn.Conv3d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SlotHead(nn.Module):
    """``(B, dim, Z/pz, Y/py, X/px)`` -> ``(B, C, Z, Y, X)``."""

    def __init__(self, dim: int, channels: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = tuple(patch)
        self.channels = channels
        if self.patch == (1, 1, 1):
            self.proj = nn.Conv3d(dim, channels, 3, padding=1)
        else:
            self.proj = nn.Conv3d(dim, channels * math.prod(self.patch), 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.proj(h)
        if self.patch == (1, 1, 1):
            return out
        b, _, f, hh, ww = out.shape
        pz, py, px = self.patch
        # channel layout (pz, py, px, C), as Wan's proj_out + unpatchify
        out = out.reshape(b, pz, py, px, self.channels, f, hh, ww)
        out = out.permute(0, 4, 5, 1, 6, 2, 7, 3)
        return out.reshape(b, self.channels, f * pz, hh * py, ww * px)
