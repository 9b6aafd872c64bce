"""The Any2Any denoiser: per-slot encoders summed into one token grid, one backbone, slot heads.

For every slot ``s`` of the spec the fused input is::

    h = sum_s  modality[s] + role[role_s]                       (broadcast over the grid)
      + sum_{s condition}  encoder_s(cond[s])                   (clean condition values)
      + encoder_g(x_t)                                          (g = the generate slot)

with learned modality and role embeddings (``condition``, ``generate``, ``absent``); there
is no cross-attention between slots, fusion is by summation. An absent slot (missing, or
dropped by modality dropout during training) contributes only its two embeddings, so the
network knows what it was not shown. The backbone (3D U-Net or Wan) maps ``h`` and the
timestep to features, and the generate slot's head maps them to the prediction
(epsilon, v or x0, as ``DiffusionConfig.prediction_type`` says). Any slot can be the
generate slot; the default is ``dose``.

``objective="regression"``: the same network called with ``x_t=None`` and ``t=0`` predicts
the generate slot directly (one forward pass, trained with L1).
"""

from __future__ import annotations

import torch
from torch import nn

from dosegym.diffusion.config import ModelConfig, WanConfig
from dosegym.diffusion.encoders import SlotEncoder, SlotHead
from dosegym.diffusion.slots import ROLE_CODES, SLOT_CHANNELS, ModelInput
from dosegym.errors import ModelError


class Any2Any(nn.Module):
    """See module docstring. ``config`` is the (resolved) :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        spec = config.spec
        if config.backbone == "unet":
            from dosegym.diffusion.backbones.unet3d import UNet3D

            self.backbone: nn.Module = UNet3D(config.unet, spec.shape)
        else:
            from dosegym.diffusion.backbones.wan import WanBackbone

            assert config.wan is not None
            self.backbone = WanBackbone(config.wan, spec.shape)
            # A checkpoint rebuilds the architecture without the pretrained folder.
            config = config.model_copy(
                update={
                    "wan": WanConfig(
                        architecture=self.backbone.architecture,
                        patch_size=config.wan.patch_size,
                        gradient_checkpointing=config.wan.gradient_checkpointing,
                    )
                }
            )
        self.config = config
        self.slots: tuple[str, ...] = tuple(spec.slots)
        dim, patch = self.backbone.dim, self.backbone.patch
        self.encoders = nn.ModuleDict({s: SlotEncoder(SLOT_CHANNELS[s], dim, patch) for s in self.slots})
        self.heads = nn.ModuleDict({s: SlotHead(dim, SLOT_CHANNELS[s], patch) for s in self.slots})
        self.modality = nn.Parameter(torch.randn(len(self.slots), dim) * 0.02)
        self.role = nn.Parameter(torch.randn(len(ROLE_CODES), dim) * 0.02)
        self.token_shape = tuple(n // p for n, p in zip(spec.shape, patch))

    def role_codes(self, cond: ModelInput, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_slots)`` role codes per sample: the batch role, made ``absent`` where a
        sample lacks the slot (``cond.available``) or ``drop`` (``(B, n_slots)`` bool) says so."""
        b = cond.batch_size
        codes = torch.empty(b, len(self.slots), dtype=torch.long, device=cond.device)
        for i, slot in enumerate(self.slots):
            role = cond.roles.get(slot, "absent")
            codes[:, i] = ROLE_CODES[role]
            if role == "condition":
                off = ~cond.available.get(slot, torch.ones(b, dtype=torch.bool, device=cond.device))
                if drop is not None:
                    off = off | drop[:, i]
                codes[off, i] = ROLE_CODES["absent"]
        return codes

    def forward(
        self,
        x_t: torch.Tensor | None,
        t: torch.Tensor,
        cond: ModelInput,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict for the generate slot of ``cond`` (batched): ``(B, C, Z, Y, X)``.

        ``x_t``: the noisy generate slot ``(B, C, Z, Y, X)``, or ``None`` (regression).
        ``t``: timesteps ``(B,)`` or a scalar. ``drop``: optional ``(B, n_slots)`` bool,
        condition slots to treat as absent (modality dropout).
        """
        if not cond.batched:
            raise ModelError("Any2Any.forward needs a batched ModelInput (use slots.collate)")
        gen = cond.generate_slot
        if gen not in self.slots:
            raise ModelError(f"generate slot {gen!r} is not among the model's slots {list(self.slots)}")
        unknown = [s for s, r in cond.roles.items() if r != "absent" and s not in self.slots]
        if unknown:
            raise ModelError(f"input slot(s) {unknown} are not among the model's slots {list(self.slots)}")
        b = cond.batch_size
        shape = tuple(self.config.spec.shape)
        if x_t is not None and tuple(x_t.shape) != (b, SLOT_CHANNELS[gen], *shape):
            raise ModelError(
                f"x_t shape {tuple(x_t.shape)} != {(b, SLOT_CHANNELS[gen], *shape)} (B, C, Z, Y, X) "
                f"for slot {gen!r}"
            )
        t = torch.as_tensor(t, device=cond.device)
        t = t.reshape(1).expand(b) if t.numel() == 1 else t.reshape(b)
        codes = self.role_codes(cond, drop)
        emb = (self.modality[None] + self.role[codes]).sum(dim=1)  # (B, dim)
        h = emb[:, :, None, None, None].expand(-1, -1, *self.token_shape)
        cond_code = ROLE_CODES["condition"]
        for i, slot in enumerate(self.slots):
            on = codes[:, i] == cond_code
            if not bool(on.any()):
                continue
            x = cond.tensors[slot]
            if tuple(x.shape[-3:]) != shape:
                raise ModelError(f"slot {slot!r} tensor {tuple(x.shape)} is not on the model grid {shape}")
            h = h + self.encoders[slot](x.to(h.dtype)) * on.to(h.dtype)[:, None, None, None, None]
        if x_t is not None:
            h = h + self.encoders[gen](x_t.to(h.dtype))
        feats = self.backbone(h, t.to(h.device))
        return self.heads[gen](feats)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
