"""RTDOSE: dose planes in Gy at their frame offsets, and the plan's total from the folder's
RTDOSE files (summation types BEAM, PLAN, MULTI_PLAN, FRACTION).

Rules: the "Dose" paragraph of :mod:`dosegym.data.dicom`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dosegym.data.dicom.files import Folder, header_cosines, header_floats, read_one
from dosegym.data.dicom.rtplan import treatment_beams
from dosegym.data.dicom.stack import (
    Stack,
    canonical_grid,
    pixel_array,
    reorient,
    slice_thickness,
    uneven_gap,
)
from dosegym.data.grid import Grid
from dosegym.errors import DataError

_DOSE_UNITS_TO_GY = {"GY": 1.0, "CGY": 0.01}
_TOTAL_DOSE_TYPES = ("PLAN", "MULTI_PLAN")
_DOSE_SUMMATION_TYPES = ("PLAN", "MULTI_PLAN", "BEAM", "FRACTION", "")


def dose_stack(ds: Dataset, path: Path) -> Stack:
    """An RTDOSE as a stack in Gy (frames sorted along the normal)."""
    units = str(ds.get("DoseUnits", "")).upper()
    if units not in _DOSE_UNITS_TO_GY:
        raise DataError(
            f"{path}: DoseUnits {units!r} is not an absolute dose; valid: {sorted(_DOSE_UNITS_TO_GY)}"
        )
    if "DoseGridScaling" not in ds:
        raise DataError(f"{path}: DoseGridScaling is missing")
    scaling = float(ds.DoseGridScaling) * _DOSE_UNITS_TO_GY[units]
    values = pixel_array(ds, path).astype(np.float64) * scaling
    if values.ndim == 2:
        values = values[None]
    offsets = (
        np.asarray([float(v) for v in ds.GridFrameOffsetVector], dtype=np.float64)
        if "GridFrameOffsetVector" in ds
        else np.zeros(1)
    )
    if offsets.shape != (values.shape[0],):
        raise DataError(
            f"{path}: GridFrameOffsetVector has {offsets.size} values for {values.shape[0]} frames"
        )
    # Relative offsets start at 0; absolute ones (first = the IPP's position) are made relative.
    offsets = offsets - offsets[0]
    if offsets.size > 1 and np.all(np.diff(offsets) < 0):
        offsets, values = offsets[::-1], values[::-1]
    if offsets.size > 1 and not np.all(np.diff(offsets) > 0):
        raise DataError(f"{path}: GridFrameOffsetVector is not monotonic")
    r, c = header_cosines(ds, path)
    spacing = header_floats(ds, "PixelSpacing", 2, path)
    return Stack(
        values,
        header_floats(ds, "ImagePositionPatient", 3, path),
        r,
        c,
        (float(spacing[0]), float(spacing[1])),
        offsets,
        str(path),
    )


def dose_on_own_grid(stack: Stack, ds: Dataset) -> tuple[np.ndarray, Grid, str | None]:
    """An RTDOSE on its own (canonical) grid: dose in Gy (``float32``), grid, note.

    Unequally spaced frames (a non-uniform ``GridFrameOffsetVector``) are resampled linearly
    onto equal frames over the same span at the smallest gap; the note says so.
    """
    note = None
    if uneven_gap(stack.offsets) is not None:
        gaps = np.diff(stack.offsets)
        span = float(stack.offsets[-1] - stack.offsets[0])
        frames = int(np.ceil(span / float(gaps.min()) - 1e-6)) + 1
        shape = (frames, *stack.values.shape[1:])
        uniform = replace(stack, values=np.zeros(shape), offsets=np.linspace(0.0, span, frames))
        values = stack.sample(uniform.native_grid(), outside=0.0)
        note = (
            f"{stack.source}: GridFrameOffsetVector is not uniform (gaps {gaps.min():.4g} to "
            f"{gaps.max():.4g} mm); the dose was resampled linearly onto {frames} frames "
            f"{span / (frames - 1):.4g} mm apart"
        )
        stack = replace(uniform, values=values)
    grid, order, flips = canonical_grid(stack.native_grid(slice_thickness(ds)))
    return reorient(stack.values, order, flips).astype(np.float32), grid, note


def read_rtdose(path: str | Path) -> tuple[np.ndarray, Grid]:
    """Read an RTDOSE file: dose in Gy (``float32``, (z, y, x)) on its own grid.

    The grid is reoriented like the reader's (see module docstring); frames must be equally
    spaced. Raises ``DataError`` for relative doses, missing scaling or unreadable files.
    """
    p, ds = read_one(path, "RTDOSE", pixels=True)
    stack = dose_stack(ds, p)
    grid, order, flips = canonical_grid(stack.native_grid(slice_thickness(ds)))
    return reorient(stack.values, order, flips).astype(np.float32), grid


def _summation_type(ds: Dataset) -> str:
    return str(ds.get("DoseSummationType", "") or "").upper()


def pick_doses(found: Folder) -> list[tuple[Path, Dataset]]:
    """The RTDOSE files that make the plan's total: all BEAM doses, else the one PLAN dose."""
    doses = found.rtdose
    kinds = [_summation_type(ds) for _, ds in doses]
    if len(doses) > 1 and not all(k == "BEAM" for k in kinds):
        totals = [d for d, k in zip(doses, kinds, strict=True) if k in _TOTAL_DOSE_TYPES]
        if len(totals) != 1:
            names = ", ".join(f"{p.name} ({k})" for (p, _), k in zip(doses, kinds, strict=True))
            raise DataError(
                f"{found.path}: several RTDOSE files ({names}); keep one PLAN dose or only BEAM doses"
            )
        doses = totals
    for p, ds in doses:
        kind = _summation_type(ds)
        if kind not in _DOSE_SUMMATION_TYPES:
            raise DataError(
                f"{p}: DoseSummationType {kind!r} is not a dose dosegym can total; valid: PLAN, "
                "MULTI_PLAN, BEAM (several are summed), FRACTION (times the RTPLAN's fractions), "
                "or empty (taken as PLAN)"
            )
    return doses


def _fractions_planned(dose: tuple[Path, Dataset], plan: tuple[Path, Dataset] | None) -> int:
    """``NumberOfFractionsPlanned`` of the fraction group a FRACTION dose belongs to."""
    path, ds = dose
    groups = (plan[1].get("FractionGroupSequence") or []) if plan is not None else []
    wanted = [
        g.get("ReferencedFractionGroupNumber")
        for r in ds.get("ReferencedRTPlanSequence") or []
        for g in r.get("ReferencedFractionGroupSequence") or []
    ]
    group = next((g for g in groups if g.get("FractionGroupNumber") in wanted), groups[0] if groups else None)
    planned = group.get("NumberOfFractionsPlanned") if group is not None else None
    try:
        fractions = int(planned)
    except (TypeError, ValueError):
        fractions = 0
    if fractions < 1:
        raise DataError(
            f"{path}: DoseSummationType FRACTION is the dose of one fraction; its total needs "
            f"NumberOfFractionsPlanned >= 1 from the RTPLAN's FractionGroupSequence "
            f"({'no RTPLAN in the folder' if plan is None else f'{plan[0].name} has {planned!r}'}); "
            "add the RTPLAN or export the PLAN dose"
        )
    return fractions


def dose_coverage(stacks: list[Stack], grid: Grid) -> np.ndarray:
    """Where ``grid``'s voxel centres lie within the span of some RTDOSE's voxel centres."""
    covered = np.zeros(grid.shape, dtype=bool)
    for stack in stacks:
        covered |= replace(stack, values=np.ones(stack.values.shape, np.float32)).sample(grid, 0.0) > 0.5
    return covered


def total_dose(
    folder: Path,
    doses: list[tuple[Path, Dataset]],
    stacks: list[Stack],
    plan: tuple[Path, Dataset] | None,
    grid: Grid,
    first: np.ndarray | None = None,
) -> tuple[np.ndarray | None, list[str]]:
    """The plan's total dose (Gy, ``float32``) on ``grid`` from the picked RTDOSE files
    (:func:`pick_doses`) and their ``stacks``, and notes on how it was totalled.

    ``first`` is the first dose already on ``grid`` (when ``grid`` is its own). BEAM doses
    that miss treatment beams of ``plan`` raise ``DataError``; so does a FRACTION dose
    without the number of fractions. ``None`` without doses.
    """
    dose = None
    for k, stack in enumerate(stacks):
        part = first if k == 0 and first is not None else stack.sample(grid, outside=0.0)
        dose = part if dose is None else dose + part
    notes: list[str] = []
    kinds = [_summation_type(ds) for _, ds in doses]
    if "BEAM" in kinds:
        names = ", ".join(p.name for p, _ in doses)
        beams_planned = treatment_beams(plan[1]) if plan else 0
        if beams_planned > len(doses):
            raise DataError(
                f"{folder}: {len(doses)} BEAM dose(s) ({names}) for the {beams_planned} treatment beams "
                f"of {plan[0].name}: the total would miss beams; add every beam's RTDOSE or the PLAN dose"
            )
        notes.append(f"dose: the sum of {len(doses)} BEAM dose(s) ({names})")
    elif kinds == ["FRACTION"]:
        fractions = _fractions_planned(doses[0], plan)
        dose = dose * np.float32(fractions)
        notes.append(f"dose: {doses[0][0].name} is one FRACTION; multiplied by the {fractions} planned")
    elif kinds == [""]:
        notes.append(f"dose: {doses[0][0].name} has no DoseSummationType; taken as the PLAN dose")
    return dose, notes
