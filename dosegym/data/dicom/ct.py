"""The CT series of a DICOM RT folder: slices in HU, sorted along the slice normal, checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dosegym.data.dicom.files import Folder, header_cosines, header_floats, pick_ct
from dosegym.data.dicom.stack import Stack, pixel_array, slice_thickness, uneven_gap
from dosegym.errors import DataError

AIR_HU = -1000.0


@dataclass(frozen=True)
class CtSeries:
    """The CT series picked from a folder (``files`` empty: none) as a stack.

    ``problem`` says why its slices form no 3-D grid (no CT, unequal gaps such as a missing
    slice, a single slice without ``SliceThickness``), else ``None``.
    """

    files: list[tuple[Path, Dataset]]
    stack: Stack | None
    problem: str | None
    thickness_mm: float | None  # SliceThickness of the first file

    @property
    def first(self) -> Dataset | None:
        return self.files[0][1] if self.files else None


def read_ct_series(found: Folder, rtstruct: Dataset | None) -> CtSeries:
    """The folder's CT series (the one ``rtstruct`` references when there are several)."""
    files = pick_ct(found, rtstruct) if found.ct else []
    stack, problem = ct_stack(files) if files else (None, f"{found.path}: no CT image series")
    thickness = slice_thickness(files[0][1]) if files else None
    if stack is not None and problem is None and len(stack.offsets) == 1 and not thickness:
        problem = f"{files[0][0]}: a single CT slice without SliceThickness has no 3-D grid"
    return CtSeries(files, stack, problem, thickness)


def ct_stack(files: list[tuple[Path, Dataset]]) -> tuple[Stack, str | None]:
    """The CT series as a stack in HU, slices sorted along the normal; checks consistency.

    Also returns why the slices form no grid (unequal gaps, e.g. a missing slice), else ``None``.
    """
    path0, ds0 = files[0]
    r, c = header_cosines(ds0, path0)
    n = np.cross(r, c)
    spacing = header_floats(ds0, "PixelSpacing", 2, path0)
    shape = (int(ds0.get("Rows", 0)), int(ds0.get("Columns", 0)))
    positions = []
    for p, ds in files:
        rp, cp = header_cosines(ds, p)
        if not (np.allclose(rp, r, atol=1e-4) and np.allclose(cp, c, atol=1e-4)):
            raise DataError(f"{p}: ImageOrientationPatient differs from {path0.name}'s; one series needs one")
        if not np.allclose(header_floats(ds, "PixelSpacing", 2, p), spacing, atol=1e-4):
            raise DataError(f"{p}: PixelSpacing differs from {path0.name}'s")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape:
            raise DataError(f"{p}: Rows/Columns differ from {path0.name}'s {shape}")
        positions.append(header_floats(ds, "ImagePositionPatient", 3, p))
    pos = np.asarray(positions)
    w = pos @ n
    order = np.argsort(w, kind="stable")
    w, pos = w[order], pos[order]
    paths = [files[o][0] for o in order]
    dup = np.flatnonzero(np.diff(w) < 1e-3)
    if dup.size:
        k = int(dup[0])
        raise DataError(f"{paths[k + 1]}: ImagePositionPatient repeats the slice position of {paths[k].name}")
    gap = uneven_gap(w)
    problem = None
    if gap is not None:
        problem = (
            f"{paths[gap + 1]}: ImagePositionPatient is {w[gap + 1] - w[gap]:.4g} mm from "
            f"{paths[gap].name}, expected {np.median(np.diff(w)):.4g} mm: slices are not "
            "equally spaced (a slice may be missing)"
        )
    drift = (pos - pos[0]) - np.outer(w - w[0], n)
    if np.abs(drift).max(initial=0.0) > max(0.01, 0.01 * spacing.min()):
        raise DataError(f"{path0}: slice positions move within the image plane (gantry tilt); not supported")
    slices = []
    for o in order:
        p, ds = files[o]
        px = pixel_array(ds, p)
        if px.shape != shape:
            raise DataError(f"{p}: PixelData has shape {px.shape}, expected Rows x Columns {shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(px.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    stack = Stack(
        np.stack(slices),
        pos[0],
        r,
        c,
        (float(spacing[0]), float(spacing[1])),
        w - w[0],
        f"{path0.parent} (CT series)",
    )
    return stack, problem
