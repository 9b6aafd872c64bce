"""The video-prior backbone: diffusers ``WanTransformer3DModel`` with z as the frame axis.

A Wan video transformer sees ``(B, C, frames, height, width)``; a dose volume ``(z, y, x)``
is a "video" of axial slices. We keep the pretrained transformer blocks (self-attention
with 3-D RoPE, cross-attention, FFN, their timestep modulation) and its timestep embedder,
output norm and modulation, and **replace** its input patch embedding and its output
projection by our per-slot encoders and heads (:mod:`dosegym.diffusion.encoders`):
``patch_embedding`` and ``proj_out`` are deleted from the loaded model, and the new
projections keep PyTorch's default (non-zero) initialisation.

Text cross-attention: every block is given one all-zero text token (``(B, 1, text_dim)``).
Through Wan's text projection (Linear, GELU, Linear) that token becomes a learned constant,
and attention over a single key returns its value: each block's cross-attention turns into
a learned per-block bias. We keep it rather than bypass it because the pretrained blocks
were trained with cross-attention in the residual stream; removing it would change their
statistics, while the null token keeps the blocks' code and weights unchanged (no
monkey-patching) at the cost of one-token attention. The real "empty prompt" embedding
would need the umT5 text encoder, which we do not ship.

``WanConfig.patch_size`` may set a patch other than the pretrained one (the patch embedding
is replaced anyway; RoPE positions are per token). Shape checks (diffusers truncates
silently): every model-grid axis must be divisible by the patch size, and
``rope_max_seq_len`` must be at least the largest patched axis; otherwise ``ModelError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from dosegym.diffusion.config import WanConfig
from dosegym.errors import ModelError


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def load_wan(pretrained_dir: str | Path) -> WanTransformer3DModel:
    """Load a ``WanTransformer3DModel`` from a local diffusers folder (no network).

    ``pretrained_dir`` is the transformer folder (``config.json`` + weights) or a pipeline
    folder holding ``transformer/``.
    """
    root = Path(pretrained_dir).expanduser()
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"wan.pretrained_dir {root}: no diffusers config.json there or in transformer/; "
            "give a local folder written by save_pretrained (e.g. Wan2.1-T2V-1.3B-Diffusers/transformer)"
        )
    try:
        return WanTransformer3DModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"wan.pretrained_dir {folder}: cannot load a WanTransformer3DModel ({exc})") from exc


class WanBackbone(nn.Module):
    """Wan transformer blocks over fused slot tokens (see module docstring).

    ``forward(tokens (B, dim, Z/pz, Y/py, X/px), t (B,)) -> (B, dim, ...)``: the tokens
    after Wan's output norm and timestep modulation, before any projection.
    """

    def __init__(self, cfg: WanConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        if cfg.pretrained_dir is not None:
            self.wan = load_wan(cfg.pretrained_dir)
        else:
            try:
                self.wan = WanTransformer3DModel.from_config(dict(cfg.architecture or {}))
            except (TypeError, ValueError) as exc:
                raise ModelError(
                    f"wan.architecture is not a valid WanTransformer3DModel config ({exc})"
                ) from exc
        self.architecture: dict[str, Any] = {
            k: _jsonable(v) for k, v in self.wan.config.items() if not k.startswith("_")
        }
        arch = self.wan.config
        self.patch = tuple(int(p) for p in (cfg.patch_size or arch.patch_size))
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ModelError(
                f"wan: patch_size must be 3 values >= 1 (frames, height, width), got {self.patch}"
            )
        for axis, (n, p) in enumerate(zip(shape, self.patch)):
            if n % p:
                raise ModelError(
                    f"wan: model grid {tuple(shape)} axis {'zyx'[axis]} ({n}) is not divisible by the "
                    f"patch size {p} (patch_size {self.patch}); diffusers would silently drop the remainder"
                )
        patched = [n // p for n, p in zip(shape, self.patch)]
        if max(patched) > arch.rope_max_seq_len:
            raise ModelError(
                f"wan: largest patched axis {max(patched)} (grid {tuple(shape)} / patch {self.patch}) "
                f"exceeds rope_max_seq_len={arch.rope_max_seq_len}; raise it in the architecture or use "
                "a larger patch"
            )
        self.dim = int(arch.num_attention_heads * arch.attention_head_dim)
        self.text_dim = int(arch.text_dim)
        del self.wan.patch_embedding
        del self.wan.proj_out
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        wan = self.wan
        b, d, f, h, w = tokens.shape
        pt, ph, pw = wan.rope.patch_size  # rope only reads the token grid from this shape
        rope = wan.rope(tokens.new_empty((1, 0, f * pt, h * ph, w * pw)))
        x = tokens.flatten(2).transpose(1, 2).contiguous()
        null_text = tokens.new_zeros((b, 1, self.text_dim))
        temb, tproj, text, _ = wan.condition_embedder(t, null_text, None)
        tproj = tproj.unflatten(1, (6, -1))
        for block in wan.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, text, tproj, rope, use_reentrant=False)
            else:
                x = block(x, text, tproj, rope)
        shift, scale = (wan.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (wan.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return x.transpose(1, 2).reshape(b, d, f, h, w)
