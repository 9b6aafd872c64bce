"""The grid a DICOM RT case is read on: the CT's, or the first RTDOSE's (``grid="auto"``,
``"ct"`` or ``"dose"``).

Rules: the "Grid" paragraph of :mod:`dosegym.data.dicom` and :func:`~dosegym.data.dicom.read_dicom`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from dosegym.data.dicom.ct import AIR_HU, CtSeries
from dosegym.data.dicom.rtdose import dose_on_own_grid
from dosegym.data.dicom.rtstruct import newell_normal, plane_positions
from dosegym.data.dicom.stack import Stack, canonical_grid, reorient
from dosegym.data.grid import Grid
from dosegym.errors import DataError

GridMode = Literal["auto", "ct", "dose"]


@dataclass(frozen=True)
class CaseGrid:
    """The grid chosen for a case and what comes with it."""

    grid: Grid
    on_ct: bool  # the CT's grid (else the first RTDOSE's)
    reason: str  # why this grid (``meta["grid_reason"]``)
    ct: np.ndarray | None  # HU on ``grid``; ``None`` on the RTDOSE grid without a CT that fits
    slab_mm: float | None  # thickness of the slab each contour plane stands for
    first_dose: np.ndarray | None = None  # the first RTDOSE on ``grid`` (its own grid), Gy
    note: str | None = None  # how the first RTDOSE was resampled onto equal frames


def fits_ct(
    mode: GridMode,
    ct: CtSeries,
    planar: dict[int, list[np.ndarray]],
    names: dict[int, str],
    has_dose: bool,
) -> tuple[bool, str | None]:
    """Whether the case goes on the CT grid, and why the CT grid does not fit (``None``: it fits).

    Raises ``DataError`` when the asked-for grid cannot be had: ``"ct"`` with a CT series
    that forms no grid, or no grid at all (the CT does not fit and there is no RTDOSE).
    """
    problem = ct.problem
    if mode == "ct" and problem is not None:
        raise DataError(problem)
    if ct.stack is not None and problem is None:
        problem = _ct_short(ct.stack, ct.thickness_mm or 0.0, planar, names)
    on_ct = mode == "ct" or (mode == "auto" and problem is None)
    if not on_ct and not has_dose:
        raise DataError(f"{problem}; and there is no RTDOSE to read the case on instead")
    return on_ct, problem


def case_grid(
    mode: GridMode,
    on_ct: bool,
    problem: str | None,
    ct: CtSeries,
    doses: list[tuple[Path, Dataset]],
    dose_stacks: list[Stack],
    planar: dict[int, list[np.ndarray]],
) -> CaseGrid:
    """Build the grid :func:`fits_ct` chose (axes made canonical, see ``stack``), with the CT on it.

    ``doses`` and their ``dose_stacks``: the RTDOSE files that make the total (the first
    gives the RTDOSE grid).
    """
    if on_ct:
        native = ct.stack.native_grid(ct.thickness_mm)
        grid, order, flips = canonical_grid(native)
        reason = "the CT series holds every contour plane" if mode == "auto" else "asked for: grid='ct'"
        return CaseGrid(grid, True, reason, reorient(ct.stack.values, order, flips), native.spacing_mm[0])
    first, grid, note = dose_on_own_grid(dose_stacks[0], doses[0][1])
    hu = None
    if problem is None:  # grid="dose" with a CT that holds the structures
        hu = ct.stack.sample(grid, outside=AIR_HU)
        reason = "asked for: grid='dose' (CT resampled onto it, air outside the CT)"
    else:
        reason = f"{problem}; read on the grid of {doses[0][0].name} without a CT"
    if ct.stack is not None and len(ct.stack.offsets) > 1:
        slab = float(np.median(np.diff(ct.stack.offsets)))
    else:
        slab = ct.thickness_mm or _contour_spacing(planar)
    return CaseGrid(grid, False, reason, hu, slab, first, note)


def _ct_short(stack: Stack, thickness_mm: float, planar: dict[int, list[np.ndarray]], names) -> str | None:
    """Why the CT's slices (slabs of one slice) do not hold every contour plane, else ``None``."""
    n = stack.normal
    half = 0.5 * (float(np.median(np.diff(stack.offsets))) if len(stack.offsets) > 1 else thickness_mm)
    lo = float(stack.position @ n) - half
    hi = float(stack.position @ n + stack.offsets[-1]) + half
    missing = []
    for number, contours in planar.items():
        w = plane_positions(contours, n)
        if np.any((w < lo - 1e-3) | (w > hi + 1e-3)):
            missing.append((names.get(number, f"ROINumber {number}"), float(w.min()), float(w.max())))
    if not missing:
        return None
    name, w0, w1 = missing[0]
    count = len(stack.offsets)
    return (
        f"{stack.source}: {count} slice{'s' if count > 1 else ''} ({lo:.1f} to {hi:.1f} mm along the "
        f"slice normal) do not hold the contours of {len(missing)} ROI{'s' if len(missing) > 1 else ''} "
        f"(e.g. {name!r}: planes {w0:.1f} to {w1:.1f} mm)"
    )


def _contour_spacing(planar: dict[int, list[np.ndarray]]) -> float | None:
    """The usual gap (mm) between neighbouring contour planes of all ROIs (``None``: < 2 planes)."""
    contours = [c for cs in planar.values() for c in cs]
    if not contours:
        return None
    normal = newell_normal(max(contours, key=len))
    normal = normal / max(np.linalg.norm(normal), 1e-12)
    gaps = np.diff(np.unique(np.round(plane_positions(contours, normal[::-1]), 2)))
    gaps = gaps[gaps > 0.01]
    return float(np.median(gaps)) if gaps.size else None
