"""The native-resolution refiner: the coarse model-grid dose made sharp on the case grid.

The diffusion model runs on a coarse model grid (e.g. 48 x 64 x 64 over the body's crop:
7-8 mm voxels across a head-and-neck body with shoulders); trilinear upsampling of its dose
cannot restore the steep fall-off around the targets, so even the reference dose loses
~1.2 Gy of OpenKBP dose score in the round trip (the "floor"). The refiner is the cascade's
second stage (as in cascaded diffusion and SR3, but deterministic): a small 3-D U-Net on the
case grid that takes the upsampled coarse dose and the native-resolution structures and CT,
and adds a residual to the coarse dose. It is trained on reference round trips
(:mod:`dosegym.diffusion.refiner_train`), so its job is super-resolution of the dose it is
given, not a correction toward the training doses: an aligned model's changes survive it.

**Inputs** (:data:`REFINER_CHANNELS`, float32 on the case grid, cropped to the body's
bounding box plus ``margin_vox`` voxels): ``coarse`` the upsampled coarse dose / highest Rx;
``targets`` each target voxel = its Rx / highest Rx; ``body`` {0, 1}; the 8 OAR groups
(:data:`~dosegym.data.oar_groups.OAR_GROUPS`) {0, 1}; ``ct`` HU clipped to [-1000, 1500]
and scaled to [-1, 1] (0 without a CT); the voxel spacing ``spacing_z/y/x`` in mm /
``spacing_scale_mm`` (constant channels: the net sees how anisotropic the grid is).
Everything but ``coarse`` depends only on the case: :class:`RefinerInputs` builds it once
and keeps it compact (masks as bool, CT and targets as float16).

**Output**: ``coarse + residual`` (normalised dose), then :class:`CaseDecoder` clamps it at
0, multiplies by the highest Rx and zeroes it outside the body: Gy on the case grid,
differentiable end to end (gradient-based agents backpropagate through it).

**Checkpoint**: an optional sub-folder ``CHECKPOINT/refiner/`` with ``config.json``
(``{"format": "dosegym-refiner", "format_version": 1, "refiner": RefinerConfig, ...}``) and
``refiner.safetensors``. A checkpoint without it decodes by trilinear upsampling alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from safetensors.torch import save_file
from torch import nn

from dosegym._version import __version__
from dosegym.data.atomic import atomic_folder, json_text
from dosegym.data.case import Case
from dosegym.data.oar_groups import OAR_GROUPS
from dosegym.diffusion.checkpoint import check_format, load_weights
from dosegym.diffusion.config import parse_config
from dosegym.diffusion.slots import ModelSpec, Resampler, body_mask, normalise_ct, oars_map, targets_map
from dosegym.errors import ModelError

REFINER_DIR = "refiner"
REFINER_FORMAT = "dosegym-refiner"
REFINER_FORMAT_VERSION = 1
REFINER_WEIGHTS = "refiner.safetensors"
REFINER_WRITER = "dosegym refiner"
#: The input channels, in order (see the module docstring).
REFINER_CHANNELS: tuple[str, ...] = (
    "coarse",
    "targets",
    "body",
    *(f"oar_{g}" for g in OAR_GROUPS),
    "ct",
    "spacing_z",
    "spacing_y",
    "spacing_x",
)
#: The U-Net halves the grid this many times: a crop is padded to a multiple of 2**LEVELS.
LEVELS = 2


class RefinerConfig(BaseModel):
    """The refiner network: a 3-level U-Net (native, 1/2, 1/4) of ``channels`` features."""

    model_config = ConfigDict(extra="forbid")

    channels: tuple[int, int, int] = (8, 24, 48)
    """Features at native resolution, at 1/2 and at 1/4."""
    margin_vox: int = 4
    """Case voxels kept around the body's bounding box (the crop the refiner runs on)."""
    spacing_scale_mm: float = 5.0
    """The spacing channels are the voxel spacing in mm divided by this."""

    @field_validator("channels")
    @classmethod
    def _positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1:
            raise ValueError(f"channels must be positive, got {v}")
        return v


class _Block(nn.Module):
    """Two 3x3x3 convolutions with SiLU, residual (no normalisation: patches in training and
    whole crops at inference see the same statistics)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


class Refiner(nn.Module):
    """See the module docstring: ``forward(inputs)`` with ``inputs`` ``(B, C, Z, Y, X)`` in
    :data:`REFINER_CHANNELS` order (channel 0 the coarse dose) -> the refined dose
    ``(B, 1, Z, Y, X)`` (normalised, not clamped). Any Z, Y, X (padded internally)."""

    def __init__(self, config: RefinerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RefinerConfig()
        c0, c1, c2 = self.config.channels
        self.stem = nn.Conv3d(len(REFINER_CHANNELS), c0, 3, padding=1)
        self.down1 = nn.Conv3d(c0, c1, 3, stride=2, padding=1)
        self.enc1 = _Block(c1, c1)
        self.down2 = nn.Conv3d(c1, c2, 3, stride=2, padding=1)
        self.mid = _Block(c2, c2)
        self.up2 = nn.Conv3d(c2, c1, 3, padding=1)  # at 1/4, then upsampled
        self.dec1 = nn.Conv3d(2 * c1, c1, 3, padding=1)
        self.up1 = nn.Conv3d(c1, c0, 3, padding=1)  # at 1/2, then upsampled
        self.dec0 = nn.Conv3d(2 * c0, c0, 3, padding=1)
        self.head = nn.Conv3d(c0, 1, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # starts as the identity: refined == coarse
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[1] != len(REFINER_CHANNELS):
            raise ModelError(
                f"refiner: inputs must be (B, {len(REFINER_CHANNELS)}, Z, Y, X) in the order "
                f"{list(REFINER_CHANNELS)}, got {tuple(inputs.shape)}"
            )
        size = inputs.shape[2:]
        m = 2**LEVELS
        pad = [p for n in reversed(size) for p in (0, (-n) % m)]
        x = F.pad(inputs, pad)
        h0 = F.silu(self.stem(x))
        h1 = self.enc1(self.down1(h0))
        h2 = self.mid(self.down2(h1))
        u1 = _up(self.up2(F.silu(h2)), h1)
        u1 = F.silu(self.dec1(F.silu(torch.cat([u1, h1], 1))))
        u0 = _up(self.up1(u1), h0)
        u0 = F.silu(self.dec0(F.silu(torch.cat([u0, h0], 1))))
        out = x[:, :1] + self.head(u0)
        return out[:, :, : size[0], : size[1], : size[2]]


def _up(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``h`` trilinearly resized to ``like``'s grid."""
    return F.interpolate(h, size=like.shape[2:], mode="trilinear", align_corners=False)


def body_crop(case: Case, margin_vox: int) -> tuple[slice, slice, slice]:
    """The body's bounding box (CT > -500 HU without a body; the whole grid without either)
    plus ``margin_vox`` voxels on every side, clipped to the case grid, as (z, y, x) slices."""
    body, _ = body_mask(case)
    shape = case.grid.shape
    if body is None or not body.any():
        return tuple(slice(0, n) for n in shape)  # type: ignore[return-value]
    idx = np.argwhere(body)
    lo = np.maximum(idx.min(axis=0) - margin_vox, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin_vox, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class RefinerInputs:
    """The case-only channels of one case's refiner input, cropped (see the module docstring):
    ``crop`` (z, y, x) slices of the case grid; ``targets`` float16 (the Rx levels);
    ``masks`` ``(1 + groups, z, y, x)`` bool (the body, then the OAR groups); ``ct`` float16;
    ``spacing_mm`` (z, y, x)."""

    crop: tuple[slice, slice, slice]
    targets: np.ndarray
    masks: np.ndarray
    ct: np.ndarray
    spacing_mm: tuple[float, float, float]

    @staticmethod
    def of(case: Case, config: RefinerConfig) -> RefinerInputs:
        """The inputs of ``case``; ``ModelError`` when it has no prescription (no Rx to scale by)."""
        rx = case.max_prescription_gy
        if rx is None:
            raise ModelError(f"{case.source}: the refiner needs a prescription (1.0 = highest Rx); none")
        crop = body_crop(case, config.margin_vox)
        shape = tuple(s.stop - s.start for s in crop)
        tmap = targets_map(case, float(rx))
        targets = np.zeros(shape, np.float16) if tmap is None else tmap[crop].astype(np.float16)
        body, _ = body_mask(case)
        masks = np.zeros((1 + len(OAR_GROUPS), *shape), dtype=bool)
        masks[0] = True if body is None else body[crop]
        omap = oars_map(case)
        if omap is not None:
            masks[1:] = omap[(slice(None), *crop)] > 0.5
        ct = (
            np.zeros(shape, np.float16) if case.ct is None else normalise_ct(case.ct[crop]).astype(np.float16)
        )
        return RefinerInputs(crop, targets, masks, ct, tuple(float(s) for s in case.grid.spacing_mm))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.targets.shape)  # type: ignore[return-value]

    def stack(
        self,
        coarse: torch.Tensor,
        config: RefinerConfig,
        window: tuple[slice, slice, slice] | None = None,
    ) -> torch.Tensor:
        """The full input ``(B, C, z, y, x)`` from ``coarse`` ``(B, z, y, x)`` (the crop's, or
        ``window``'s inside the crop), on ``coarse``'s device and dtype."""
        w = window or tuple(slice(0, n) for n in self.shape)
        dev, dt = coarse.device, coarse.dtype
        b = coarse.shape[0]

        def chan(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[w])).to(dev, dt)

        fixed = torch.stack(
            [chan(self.targets), *[chan(m) for m in self.masks], chan(self.ct)], 0
        )  # (3 + groups, z, y, x)
        spacing = torch.tensor(self.spacing_mm, device=dev, dtype=dt) / config.spacing_scale_mm
        spacing = spacing[:, None, None, None].expand(3, *fixed.shape[1:])
        static = torch.cat([fixed, spacing], 0)[None].expand(b, -1, -1, -1, -1)
        return torch.cat([coarse[:, None], static], 1)


class CaseDecoder:
    """Model-grid dose -> Gy on one case's grid: the resampler's trilinear upsampling, then
    the refiner when there is one (see the module docstring). ``decode(x)`` takes normalised
    dose ``(..., Z, Y, X)`` on the model grid and returns ``(..., Zc, Yc, Xc)`` Gy, clamped at
    0, zero outside the body; differentiable."""

    def __init__(self, case: Case, resampler: Resampler, refiner: Refiner | None = None) -> None:
        self.case_id = case.case_id
        self.resampler = resampler
        self.refiner = refiner
        self.inputs = None if refiner is None else RefinerInputs.of(case, refiner.config)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        res = self.resampler
        if self.refiner is None or self.inputs is None:
            return res.decode(x)
        coarse = res.to_case(x, "linear").clamp_min(0.0)
        lead = coarse.shape[:-3]
        flat = coarse.reshape(-1, *coarse.shape[-3:])
        crop = self.inputs.crop
        dev = next(self.refiner.parameters()).device
        inputs = self.inputs.stack(flat[(slice(None), *crop)].to(dev), self.refiner.config)
        refined = self.refiner(inputs)[:, 0].to(flat.device, flat.dtype)
        full = flat.clone()
        full[(slice(None), *crop)] = refined
        dose = full.clamp_min(0.0) * float(res.rx_max_gy)
        if res.body is not None:
            dose = dose * torch.as_tensor(res.body, device=dose.device, dtype=dose.dtype)
        return dose.reshape(*lead, *dose.shape[-3:])


# --------------------------------------------------------------------------------------
# The checkpoint sub-folder
# --------------------------------------------------------------------------------------
def save_refiner(folder: str | Path, refiner: Refiner, record: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` (a refiner folder: ``config.json`` + ``refiner.safetensors``)
    atomically; ``record`` (JSON-ready: training steps, data, measured figures) is kept in
    ``config.json`` under ``"record"``."""
    dest = Path(folder)
    with atomic_folder(dest, REFINER_WRITER) as tmp:
        doc = {
            "format": REFINER_FORMAT,
            "format_version": REFINER_FORMAT_VERSION,
            "dosegym_version": __version__,
            "refiner": refiner.config.model_dump(mode="json"),
            "record": record or {},
        }
        (tmp / "config.json").write_text(json_text(doc))
        state = {k: v.detach().contiguous().cpu() for k, v in refiner.state_dict().items()}
        save_file(state, str(tmp / REFINER_WEIGHTS))
    return dest


def read_refiner_config(folder: str | Path) -> tuple[RefinerConfig, dict[str, Any]]:
    """The :class:`RefinerConfig` of a refiner folder and its JSON document; checks the format."""
    path = Path(folder) / "config.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable refiner config ({exc})") from exc
    check_format(doc, path, REFINER_FORMAT, REFINER_FORMAT_VERSION)
    return parse_config(RefinerConfig, doc.get("refiner", {}), f"{path} field 'refiner'"), doc


def load_refiner(folder: str | Path, device: torch.device | str = "cpu") -> Refiner:
    """The refiner of a refiner folder, in eval mode, frozen, on ``device``."""
    config, _ = read_refiner_config(folder)
    refiner = Refiner(config)
    load_weights(refiner, Path(folder) / REFINER_WEIGHTS)
    return refiner.requires_grad_(False).eval().to(device)


def checkpoint_refiner(
    checkpoint: str | Path, spec: ModelSpec, device: torch.device | str = "cpu"
) -> Refiner | None:
    """The refiner of a model checkpoint folder (its ``refiner/`` sub-folder), or None without
    one. A refiner trained for another model grid (its record's ``model_spec`` is not
    ``spec``) raises ``ModelError``: it would sharpen a dose it never saw."""
    folder = Path(checkpoint) / REFINER_DIR
    if not (folder / "config.json").is_file():
        return None
    _, doc = read_refiner_config(folder)
    trained_for = (doc.get("record") or {}).get("model_spec")
    if trained_for is not None and trained_for != spec.model_dump(mode="json"):
        raise ModelError(
            f"{folder}: the refiner was trained for the model grid {trained_for}, the checkpoint's is "
            f"{spec.model_dump(mode='json')}; retrain it (`dosegym refiner train`) or remove the folder"
        )
    return load_refiner(folder, device)
