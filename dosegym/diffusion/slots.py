"""Model slots: a ``Case`` on its own grid -> normalised tensors on the model grid, and back.

Slots (fixed order, :data:`SLOTS`) and their channels, values and resampling:

=============  ========  ===============================================  =========
slot           channels  value on the model grid                          resampled
=============  ========  ===============================================  =========
``ct``         1         HU clipped to [-1000, 1500], scaled to [-1, 1]   linear
``body``       1         {0, 1}                                           nearest
``targets``    1         each target voxel = its Rx / highest Rx (0 out)  nearest
``oars``       8         {0, 1} per canonical OAR group (:data:`OAR_GROUPS`) nearest
``beam_plate`` 1         GDP-HMM beam plate / number of plate beams       computed
``angle_plate`` 1        GDP-HMM angle plate {0, 1}                       computed
``dose``       1         dose / highest Rx (1.0 = prescription)           linear
=============  ========  ===============================================  =========

The plates are computed directly on the model grid (:mod:`dosegym.data.geometry`), so they
are as sharp as the model grid allows. "linear" is a tent filter: plain trilinear
interpolation when the model grid is finer than the source, widened to the sampling step
when it is coarser (anti-aliased downsampling); outside the source volume the value is the
slot's background (air for CT, 0 otherwise).

**Model grid** (:class:`ModelSpec`): the crop is the bounding box of the body plus
``margin_mm`` on every side, and the field of ``shape`` voxels is centred on it. With
``spacing_mm`` given, that spacing is used on every axis whose crop fits in
``shape * spacing_mm``; an axis whose crop is larger is coarsened just enough to fit, so
nothing of the body is ever cut off (the spacing actually used is in the ``Resampler``).
With ``spacing_mm=None`` every axis is fitted to its crop. A fixed physical spacing keeps
penumbra widths and dose fall-off the same number of voxels across cases, which is why it
is the recommended setting. The diffusion runs in pixel space at this resolution (no
latent autoencoder): model grids are small (e.g. 48 x 64 x 64) and doses are smooth.

Roles: every slot of a ``ModelSpec`` has a role, ``condition`` (given to the model),
``generate`` (the slot the model denoises; exactly one) or ``absent`` (not available or
dropped). A missing slot listed in ``ModelSpec.required`` raises ``ModelError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from dosegym.data.case import Case
from dosegym.data.grid import Grid
from dosegym.data.oar_groups import OAR_GROUPS, oar_group
from dosegym.errors import DataError, ModelError

SLOTS: tuple[str, ...] = ("ct", "body", "targets", "oars", "beam_plate", "angle_plate", "dose")
Role = Literal["condition", "generate", "absent"]
ROLES: tuple[str, ...] = ("condition", "generate", "absent")
ROLE_CODES: dict[str, int] = {r: i for i, r in enumerate(ROLES)}

SLOT_CHANNELS: dict[str, int] = {
    "ct": 1,
    "body": 1,
    "targets": 1,
    "oars": len(OAR_GROUPS),
    "beam_plate": 1,
    "angle_plate": 1,
    "dose": 1,
}
#: How a slot is mapped back to a case grid: ``linear`` (tent / trilinear) or ``nearest``.
SLOT_INTERP: dict[str, str] = {
    "ct": "linear",
    "body": "nearest",
    "targets": "nearest",
    "oars": "nearest",
    "beam_plate": "linear",
    "angle_plate": "nearest",
    "dose": "linear",
}
CT_RANGE_HU = (-1000.0, 1500.0)
#: HU above which a voxel counts as body when a case has no body mask but has a CT.
BODY_FROM_CT_HU = -500.0


def normalise_ct(ct_hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-1000, 1500] and scaled linearly to [-1, 1]."""
    lo, hi = CT_RANGE_HU
    return ((np.clip(ct_hu, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)


class ModelSpec(BaseModel):
    """The model grid and the slots a model knows (see module docstring).

    ``shape`` and ``spacing_mm`` are (z, y, x); ``spacing_mm=None`` fits every axis to the
    crop; ``margin_mm`` pads the body bounding box on every side.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, int, int] = (48, 64, 64)
    spacing_mm: tuple[float, float, float] | None = (4.0, 4.0, 4.0)
    margin_mm: float = 10.0
    slots: tuple[str, ...] = SLOTS
    generate: str = "dose"
    required: tuple[str, ...] = ("targets",)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 2:
            raise ValueError(f"shape must be 3 sizes >= 2 (z, y, x), got {v}")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and (min(v) <= 0 or not all(math.isfinite(s) for s in v)):
            raise ValueError(f"spacing_mm must be 3 finite values > 0 mm (z, y, x) or null, got {v}")
        return v

    @model_validator(mode="after")
    def _slots(self) -> ModelSpec:
        unknown = [s for s in (*self.slots, self.generate, *self.required) if s not in SLOTS]
        if unknown:
            raise ValueError(f"unknown slot(s) {unknown}; valid: {list(SLOTS)}")
        if self.generate not in self.slots:
            raise ValueError(f"generate slot {self.generate!r} is not among slots {list(self.slots)}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")
        return self


@dataclass
class ModelInput:
    """Slot tensors on the model grid plus a role for every slot of the spec.

    ``tensors``: slot -> ``(C, Z, Y, X)`` float32, or ``(B, C, Z, Y, X)`` when ``batched``.
    The ``generate`` slot's tensor, when present, is the clean target (training) and is not
    shown to the model. ``rx_max_gy``: the highest prescription (Gy) that ``dose`` and
    ``targets`` were divided by, shape ``()`` or ``(B,)``. ``available`` (batched only):
    slot -> ``(B,)`` bool, False where a sample lacks a slot that others in the batch have.
    """

    tensors: dict[str, torch.Tensor]
    roles: dict[str, Role]
    rx_max_gy: torch.Tensor
    batched: bool = False
    available: dict[str, torch.Tensor] = field(default_factory=dict)
    case_ids: tuple[str, ...] = ()

    @property
    def generate_slot(self) -> str:
        gen = [s for s, r in self.roles.items() if r == "generate"]
        if len(gen) != 1:
            raise ModelError(f"ModelInput needs exactly one 'generate' slot, roles are {self.roles}")
        return gen[0]

    @property
    def batch_size(self) -> int:
        if not self.batched:
            raise ModelError("ModelInput is not batched; use collate([...]) first")
        return int(self.rx_max_gy.shape[0])

    @property
    def device(self) -> torch.device:
        return self.rx_max_gy.device

    def to(self, device: torch.device | str) -> ModelInput:
        """A copy with every tensor on ``device``."""
        return ModelInput(
            {k: v.to(device) for k, v in self.tensors.items()},
            dict(self.roles),
            self.rx_max_gy.to(device),
            self.batched,
            {k: v.to(device) for k, v in self.available.items()},
            self.case_ids,
        )

    def with_roles(self, **roles: Role) -> ModelInput:
        """A copy with some roles changed (e.g. ``with_roles(beam_plate="generate",
        dose="condition")``); a slot made ``condition`` must have a tensor."""
        new = dict(self.roles)
        for slot, role in roles.items():
            if slot not in new:
                raise ModelError(f"slot {slot!r} is not in this input; slots: {list(new)}")
            if role not in ROLES:
                raise ModelError(f"role {role!r} for slot {slot!r} is invalid; valid: {list(ROLES)}")
            if role == "condition" and slot not in self.tensors:
                raise ModelError(f"slot {slot!r} cannot be a condition: the input has no tensor for it")
            new[slot] = role
        out = ModelInput(
            dict(self.tensors),
            new,
            self.rx_max_gy,
            self.batched,
            dict(self.available),
            self.case_ids,
        )
        _ = out.generate_slot
        return out

    def expand(self, n: int) -> ModelInput:
        """Repeat a batched input of one case ``n`` times along the batch axis."""
        if not self.batched or self.batch_size != 1:
            raise ModelError("expand needs a batched input of exactly one case")
        return ModelInput(
            {k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()},
            dict(self.roles),
            self.rx_max_gy.expand(n),
            True,
            {k: v.expand(n) for k, v in self.available.items()},
            self.case_ids * n,
        )

    def mirrored(self) -> ModelInput:
        """A batched input followed by its left-right mirror image: ``2B`` samples, the last B
        with every tensor flipped along x (the last axis). The crop is centred on the body, so
        the mirror is the mirrored patient's input (the OAR groups are not lateral)."""
        if not self.batched:
            raise ModelError("mirrored needs a batched input (use collate([...]) first)")
        return ModelInput(
            {k: torch.cat([v, v.flip(-1)]) for k, v in self.tensors.items()},
            dict(self.roles),
            torch.cat([self.rx_max_gy, self.rx_max_gy]),
            True,
            {k: torch.cat([v, v]) for k, v in self.available.items()},
            self.case_ids * 2,
        )


def collate(inputs: Sequence[ModelInput]) -> ModelInput:
    """Stack unbatched inputs of the same spec into one batched input.

    A slot that is a condition in some samples and absent in others becomes a condition of
    the batch with ``available`` False (and zeros) for the samples that lack it.
    """
    if not inputs:
        raise ModelError("collate: no inputs")
    if any(mi.batched for mi in inputs):
        raise ModelError("collate: inputs must be unbatched (tensors (C, Z, Y, X))")
    slots = list(inputs[0].roles)
    gens = {mi.generate_slot for mi in inputs}
    if len(gens) != 1 or any(list(mi.roles) != slots for mi in inputs):
        raise ModelError("collate: inputs differ in slots or generate slot; they must share one spec")
    roles: dict[str, Role] = {}
    tensors: dict[str, torch.Tensor] = {}
    available: dict[str, torch.Tensor] = {}
    for slot in slots:
        have = [slot in mi.tensors and mi.roles[slot] != "absent" for mi in inputs]
        gen = inputs[0].roles[slot] == "generate"
        roles[slot] = "generate" if gen else ("condition" if any(have) else "absent")
        if gen:
            have = [slot in mi.tensors for mi in inputs]
            if any(have) and not all(have):
                raise ModelError(f"collate: generate slot {slot!r} has a tensor in some samples only")
        if not any(have):
            continue
        ref = next(mi.tensors[slot] for mi, h in zip(inputs, have) if h)
        tensors[slot] = torch.stack(
            [mi.tensors[slot] if h else torch.zeros_like(ref) for mi, h in zip(inputs, have)]
        )
        available[slot] = torch.tensor(have, dtype=torch.bool, device=ref.device)
    return ModelInput(
        tensors,
        roles,
        torch.stack([torch.as_tensor(mi.rx_max_gy, dtype=torch.float32) for mi in inputs]),
        True,
        available,
        tuple(cid for mi in inputs for cid in mi.case_ids),
    )


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------
def _axis_weights(positions: torch.Tensor, n_src: int, mode: str, width: float) -> torch.Tensor:
    """(n_out, n_src) weights sampling a source axis at fractional ``positions``.

    ``nearest``: one-hot at the rounded index (zero row outside ``[-0.5, n_src - 0.5)``).
    ``linear``: tent of half-width ``max(width, 1)`` samples, normalised over the whole
    integer line, so positions outside the source see zeros (zero padding).
    """
    pos = positions.to(torch.float64)
    if mode == "nearest":
        idx = torch.floor(pos + 0.5).long()
        valid = (idx >= 0) & (idx < n_src)
        w = torch.zeros(pos.shape[0], n_src, dtype=torch.float64)
        w[valid.nonzero().squeeze(1), idx[valid]] = 1.0
        return w.float()
    s = max(float(width), 1.0)
    pad = int(math.ceil(s)) + 1
    src = torch.arange(-pad, n_src + pad, dtype=torch.float64)
    w = torch.clamp(1.0 - (src[None, :] - pos[:, None]).abs() / s, min=0.0)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return w[:, pad : pad + n_src].float()


def _apply(volume: torch.Tensor, wz: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """Separable resampling of the last three axes (z, y, x) of ``volume``."""
    dev, dt = volume.device, volume.dtype
    v = torch.einsum("...zyx,cx->...zyc", volume, wx.to(dev, dt))
    v = torch.einsum("...zyc,by->...zbc", v, wy.to(dev, dt))
    return torch.einsum("...zbc,az->...abc", v, wz.to(dev, dt))


@dataclass(frozen=True)
class Resampler:
    """Maps between a case grid and its model grid (same direction, axis-aligned crop).

    Model voxel ``k`` along axis ``a`` sits at case index ``start[a] + k * step[a]``.
    ``rx_max_gy`` turns normalised dose back into Gy. ``body`` (case grid) zeroes the
    decoded dose outside the body, where a dose has no meaning.
    """

    case_grid: Grid
    model_grid: Grid
    start: tuple[float, float, float]
    step: tuple[float, float, float]
    rx_max_gy: float
    body: np.ndarray | None = None

    def to_model(
        self, array: np.ndarray | torch.Tensor, mode: str = "linear", fill: float = 0.0
    ) -> torch.Tensor:
        """A case-grid array ``(..., Z, Y, X)`` sampled on the model grid (float32 tensor)."""
        vol = torch.as_tensor(np.asarray(array, dtype=np.float32) if isinstance(array, np.ndarray) else array)
        vol = vol.float()
        if tuple(vol.shape[-3:]) != self.case_grid.shape:
            raise ModelError(
                f"to_model: array shape {tuple(vol.shape)} does not end with the case grid "
                f"{self.case_grid.shape}"
            )
        ws = [
            _axis_weights(
                self.start[a] + torch.arange(self.model_grid.shape[a]) * self.step[a],
                self.case_grid.shape[a],
                mode,
                self.step[a],
            )
            for a in range(3)
        ]
        return _apply(vol - fill, *ws) + fill

    def to_case(self, tensor: torch.Tensor, mode: str = "linear", fill: float = 0.0) -> torch.Tensor:
        """A model-grid tensor ``(..., Z, Y, X)`` mapped onto the full case grid (same device,
        differentiable): ``linear`` for doses and images, ``nearest`` for masks; outside the
        model field the value is ``fill``."""
        if tuple(tensor.shape[-3:]) != self.model_grid.shape:
            raise ModelError(
                f"to_case: tensor shape {tuple(tensor.shape)} does not end with the model grid "
                f"{self.model_grid.shape}"
            )
        ws = [
            _axis_weights(
                (torch.arange(self.case_grid.shape[a]) - self.start[a]) / self.step[a],
                self.model_grid.shape[a],
                mode,
                1.0 / self.step[a],
            )
            for a in range(3)
        ]
        return _apply(tensor - fill, *ws) + fill

    def slot_to_case(self, tensor: torch.Tensor, slot: str) -> torch.Tensor:
        """A slot's model-grid values ``(..., Z, Y, X)`` on the case grid, resampled as the slot
        needs (:data:`SLOT_INTERP`); CT outside the model field is air (-1)."""
        if slot not in SLOT_INTERP:
            raise ModelError(f"unknown slot {slot!r}; valid: {list(SLOTS)}")
        return self.to_case(tensor, SLOT_INTERP[slot], fill=-1.0 if slot == "ct" else 0.0)

    def decode(self, tensor: torch.Tensor) -> torch.Tensor:
        """Normalised dose on the model grid ``(..., Z, Y, X)`` -> Gy on the case grid,
        clamped at 0 and zero outside the body (when the case has one)."""
        dose = self.to_case(tensor, "linear").clamp_min(0.0) * float(self.rx_max_gy)
        if self.body is not None:
            dose = dose * torch.as_tensor(self.body, device=dose.device, dtype=dose.dtype)
        return dose


def body_mask(case: Case) -> tuple[np.ndarray | None, bool]:
    """The case's body, else CT > -500 HU, else None; and whether it may fill the body slot."""
    if case.body is not None:
        return case.body, True
    if case.ct is not None:
        body = case.ct > BODY_FROM_CT_HU
        if body.any():
            return body, True
    return None, False


def make_resampler(case: Case, spec: ModelSpec) -> Resampler:
    """The model grid of ``case`` under ``spec`` (see module docstring); no volume is sampled."""
    body, _ = body_mask(case)
    cgrid = case.grid
    if body is not None:
        idx = np.argwhere(body)
        lo, hi = idx.min(axis=0).astype(float), idx.max(axis=0).astype(float)
    else:
        lo, hi = np.zeros(3), np.asarray(cgrid.shape, dtype=float) - 1
    cs = np.asarray(cgrid.spacing_mm)
    centre = (lo + hi) / 2.0
    extent_mm = (hi - lo + 1) * cs + 2 * spec.margin_mm
    n = np.asarray(spec.shape, dtype=float)
    fit_mm = extent_mm / n
    spacing = fit_mm if spec.spacing_mm is None else np.maximum(np.asarray(spec.spacing_mm), fit_mm)
    step = spacing / cs
    start = centre - (n - 1) / 2.0 * step
    origin = cgrid.index_to_mm(start)
    mgrid = Grid(spec.shape, tuple(spacing), tuple(origin), cgrid.direction)
    rx = case.max_prescription_gy
    return Resampler(
        cgrid,
        mgrid,
        tuple(float(v) for v in start),
        tuple(float(v) for v in step),
        float(rx) if rx is not None else float("nan"),
        case.body,
    )


def targets_map(case: Case, rx_max: float) -> np.ndarray | None:
    """Each target voxel = its Rx / ``rx_max`` (the highest of overlapping targets), 0 elsewhere;
    float32 on the case grid; None without prescriptions."""
    if not case.prescriptions:
        return None
    out = np.zeros(case.grid.shape, dtype=np.float32)
    for rx in sorted(case.prescriptions, key=lambda p: p.dose_gy):
        mask = case.structures[rx.target]
        out[mask] = np.maximum(out[mask], rx.dose_gy / rx_max)
    return out


def oars_map(case: Case) -> np.ndarray | None:
    """``(len(OAR_GROUPS), Z, Y, X)`` float32 {0, 1}: each OAR in its canonical group; None without OARs."""
    names = case.oars
    if not names:
        return None
    out = np.zeros((len(OAR_GROUPS), *case.grid.shape), dtype=np.float32)
    for name in names:
        out[oar_group(name)][case.structures[name]] = 1.0
    return out


def to_model(
    case: Case,
    spec: ModelSpec,
    generate: str | None = None,
    absent: Sequence[str] = (),
) -> tuple[ModelInput, Resampler]:
    """Crop, resample and normalise ``case`` onto the model grid of ``spec``.

    ``generate`` overrides ``spec.generate``; slots in ``absent`` are dropped (role absent).
    Returns an unbatched :class:`ModelInput` and the :class:`Resampler` back to the case.
    Raises ``ModelError`` naming the slot when a slot of ``spec.required`` is missing, and
    when ``dose`` or ``targets`` is wanted but the case has no prescription.
    """
    gen = generate or spec.generate
    if gen not in spec.slots:
        raise ModelError(f"generate slot {gen!r} is not among the model's slots {list(spec.slots)}")
    bad = [s for s in absent if s not in spec.slots]
    if bad:
        raise ModelError(f"absent slot(s) {bad} are not among the model's slots {list(spec.slots)}")
    res = make_resampler(case, spec)
    rx_max = case.max_prescription_gy
    body, body_ok = body_mask(case)
    tensors: dict[str, torch.Tensor] = {}
    needs_rx = {"dose", "targets"} & set(spec.slots)
    wanted = [s for s in spec.slots if s not in absent or s == gen]
    for slot in wanted:
        value: torch.Tensor | None = None
        if slot in needs_rx and rx_max is None:
            value = None
        elif slot == "ct" and case.ct is not None:
            value = res.to_model(normalise_ct(case.ct), "linear", fill=-1.0)[None]
        elif slot == "body" and body is not None and body_ok:
            value = res.to_model(body.astype(np.float32), "nearest")[None]
        elif slot == "targets":
            tmap = targets_map(case, float(rx_max))  # type: ignore[arg-type]
            value = None if tmap is None else res.to_model(tmap, "nearest")[None]
        elif slot == "oars":
            omap = oars_map(case)
            value = None if omap is None else res.to_model(omap, "nearest")
        elif slot == "dose" and case.dose is not None:
            value = res.to_model(case.dose / np.float32(rx_max), "linear")[None]
        elif slot in ("beam_plate", "angle_plate") and case.beams is not None:
            value = _plate(slot, case, res, spec)
        if value is not None:
            tensors[slot] = value.contiguous()
    roles: dict[str, Role] = {}
    for slot in spec.slots:
        if slot == gen:
            roles[slot] = "generate"
        elif slot in tensors and slot not in absent:
            roles[slot] = "condition"
        else:
            roles[slot] = "absent"
            tensors.pop(slot, None)
    missing = [s for s in spec.required if roles.get(s) == "absent" and s != gen]
    if missing:
        why = {
            "targets": "needs prescriptions naming target structures",
            "dose": "needs a reference dose and a prescription",
            "beam_plate": "needs beams and a target",
            "angle_plate": "needs beams",
            "body": "needs a body mask or a CT",
        }
        reasons = "; ".join(f"{s} {why.get(s, 'needs its data')}" for s in missing)
        raise ModelError(f"{case.source}: required slot(s) {missing} missing for the model ({reasons})")
    if gen in needs_rx and rx_max is None:
        raise ModelError(
            f"{case.source}: generating {gen!r} needs a prescription (1.0 = highest Rx); the case has none"
        )
    rx_t = torch.tensor(float(rx_max) if rx_max is not None else float("nan"), dtype=torch.float32)
    return ModelInput(tensors, roles, rx_t, False, {}, (case.case_id,)), res


def _plate(slot: str, case: Case, res: Resampler, spec: ModelSpec) -> torch.Tensor | None:
    """Beam or angle plate computed on the model grid itself (see module docstring)."""
    from dosegym.data import geometry

    beams = case.beams
    assert beams is not None
    try:
        if slot == "angle_plate":
            return torch.from_numpy(geometry.angle_plate(res.model_grid, beams))[None]
        if not case.targets:
            return None
        union = np.logical_or.reduce([case.structures[t] for t in case.targets]).astype(np.float32)
        target = res.to_model(union, "nearest").numpy() > 0.5
        if not target.any():
            return None
        plate = geometry.beam_plate(res.model_grid, target, beams)
        return torch.from_numpy(plate / np.float32(len(geometry.plate_angles(beams))))[None]
    except DataError as exc:
        raise ModelError(f"{case.source}: cannot compute slot {slot!r}: {exc}") from exc
