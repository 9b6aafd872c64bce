"""DICOM RT: read a folder (CT series, RTSTRUCT, RTDOSE, RTPLAN) into a ``Case``; write RT sets.

Geometry. DICOM patient coordinates are LPS ``(x, y, z)`` mm; dosegym stores them z-first, so
the DICOM point ``(x, y, z)`` is the dosegym point ``(z, y, x)``. This module is the only place
where that conversion happens. An image stack is described by ``ImageOrientationPatient``
(row cosine ``r``: direction of increasing column index; column cosine ``c``), the slice normal
``n = r × c`` and ``PixelSpacing`` = (between rows, between columns). CT slices are sorted by
``ImagePositionPatient · n``; the native index axes (slice, row, column) run along
``(n, c, r)``. The reader then transposes and flips the axes so that each index axis runs
along the positive patient axis nearest to it: for axial series (HFS, FFS, HFP, FFP) the
grid's direction becomes the identity, so larger x index = further patient left (+x LPS),
larger y = posterior, larger z = superior. Oblique series keep a (near-identity) direction.

Grid. The case lies on the CT grid when the CT series holds every contour plane (each slice
a slab one slice thick); otherwise (no CT, a partial CT of one or a few slices, a CT with a
missing slice) on the RTDOSE grid, with ``ct`` ``None``: a plan exported as RTSTRUCT +
RTDOSE can still be scored. ``meta["grid_source"]`` ("ct" or "rtdose") and
``meta["grid_reason"]`` say which grid and why, ``meta["notes"]`` what was cut or scaled.
On the RTDOSE grid the slab of a contour plane is the CT's slice gap (or SliceThickness),
else the usual gap between contour planes. Structures are cut to the grid (the share cut off
is noted; one wholly outside is left out). A target (PTV/CTV/GTV) more than 1 % outside the
RTDOSE grid raises ``DataError`` on either grid: its dose there is unknown.

Structures (``RTSTRUCT``). ``CLOSED_PLANAR`` contours are rasterised on the case grid, plane
by plane, by a supersampled even-odd fill (``dosegym.data._raster.fill_polygons``): several
contours on one plane combine by XOR, so an inner contour is a hole. The fractional occupancy
goes to ``Case.occupancy[name]`` and the mask is ``occupancy >= 0.5`` (if that leaves a tiny
structure empty, its voxels of highest occupancy). Through the planes, each contour plane
stands for a slab one CT slice thick centred on it: a grid slice takes the contours of the
nearest plane within half a CT slice, so a structure extends half a slice beyond its first
and last contoured planes (end-capping), contours between slices go to the nearest slice,
and a finer or coarser grid (``grid="dose"``) samples the nearest plane. ``POINT`` and open
contours are ignored, as are ROIs without contours. The ROI whose ``RTROIInterpretedType``
is ``EXTERNAL`` (else one named Body/External) becomes ``Case.body`` and is not repeated in
``Case.structures`` (``case.structure("Body")`` still finds it).

Dose (``RTDOSE``). ``pixel × DoseGridScaling`` in ``DoseUnits`` GY (CGY divided by 100);
frames at ``ImagePositionPatient + GridFrameOffsetVector · n``. On the CT grid it is
resampled by trilinear interpolation and is zero outside the span of the dose voxel centres.
Several ``BEAM`` doses are summed; otherwise one ``PLAN`` (or ``MULTI_PLAN``) dose is used;
a ``FRACTION`` dose is multiplied by the RTPLAN's ``NumberOfFractionsPlanned`` (refused
without one); an empty ``DoseSummationType`` is taken as PLAN (noted); other types are
refused. Unequally spaced frames are resampled linearly onto equal ones (noted).

Plan (``RTPLAN``). Treatment beams only (setup fields are skipped). Static beams give the
gantry angle of their first control point; an arc (``GantryRotationDirection`` CW/CC) makes
the technique VMAT and lists every control-point gantry angle. Couch angles run parallel to
the gantry angles. The isocenter is the first treatment beam's. Prescriptions come from
``DoseReferenceSequence`` items of type TARGET (``TargetPrescriptionDose``, total Gy) and the
fraction group that references them (else the first; ``NumberOfFractionsPlanned``, default
1). The target is the ROI named by ``ReferencedROINumber``, else by the description, else
the PTV with the highest number in its name (or the only PTV); otherwise no prescription.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

from dosegym.data._raster import fill_polygons, plane_contours, select_planes
from dosegym.data.atomic import atomic_folder, atomic_path
from dosegym.data.case import TARGET_PREFIXES, Beams, Case, Prescription, canonical_name
from dosegym.data.grid import Grid
from dosegym.data.io import _is_dicom_file
from dosegym.errors import DataError

AIR_HU = -1000.0
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_DOSE_UNITS_TO_GY = {"GY": 1.0, "CGY": 0.01}
_TOTAL_DOSE_TYPES = ("PLAN", "MULTI_PLAN")
_DOSE_SUMMATION_TYPES = ("PLAN", "MULTI_PLAN", "BEAM", "FRACTION", "")
_BODY_NAMES = ("body", "external")
_PTV_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
@dataclass
class _Folder:
    """The DICOM files of one folder, by kind (path, dataset)."""

    path: Path
    ct: dict[str, list[tuple[Path, Dataset]]] = field(default_factory=dict)
    rtstruct: list[tuple[Path, Dataset]] = field(default_factory=list)
    rtdose: list[tuple[Path, Dataset]] = field(default_factory=list)
    rtplan: list[tuple[Path, Dataset]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _read_file(path: Path, *, pixels: bool) -> Dataset:
    """Read one DICOM file (also without the 128-byte preamble) or raise ``DataError``."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
        header = [str(ds.get(k, "") or "") for k in ("SOPClassUID", "Modality")]  # values decode here
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if not all(header):
        raise DataError(f"{path}: not a readable DICOM file (no DICOM header, SOPClassUID or Modality)")
    return ds


def _scan(folder: Path, *, pixels: bool) -> _Folder:
    """Read every DICOM file directly in ``folder`` (hidden files are skipped).

    A file counts as DICOM if it ends in ``.dcm`` or has the ``DICM`` marker; one that then
    cannot be read raises ``DataError``. Other files and non-RT modalities are ignored.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of DICOM files")
    found = _Folder(folder)
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() != ".dcm" and not _is_dicom_file(p):
            found.ignored.append(p.name)
            continue
        ds = _read_file(p, pixels=pixels)
        modality = str(ds.Modality).upper()
        if modality == "CT" and ds.SOPClassUID == CTImageStorage:
            found.ct.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
        elif modality == "RTSTRUCT":
            found.rtstruct.append((p, ds))
        elif modality == "RTDOSE":
            found.rtdose.append((p, ds))
        elif modality == "RTPLAN":
            found.rtplan.append((p, ds))
        else:
            found.ignored.append(p.name)
    return found


def _only(items: list[tuple[Path, Dataset]], kind: str, folder: Path) -> tuple[Path, Dataset] | None:
    if len(items) > 1:
        names = ", ".join(p.name for p, _ in items)
        raise DataError(f"{folder}: several {kind} files ({names}); keep exactly one per case")
    return items[0] if items else None


def _referenced_series(rtstruct: Dataset) -> set[str]:
    out = set()
    for fr in rtstruct.get("ReferencedFrameOfReferenceSequence") or []:
        for st in fr.get("RTReferencedStudySequence") or []:
            for se in st.get("RTReferencedSeriesSequence") or []:
                out.add(str(se.get("SeriesInstanceUID", "")))
    return out


def _pick_ct(found: _Folder, rtstruct: Dataset | None) -> list[tuple[Path, Dataset]]:
    if not found.ct:
        seen = ", ".join(sorted(p.name for p, _ in found.rtstruct + found.rtdose + found.rtplan))
        raise DataError(
            f"{found.path}: missing CT: no CT image series (Modality CT) found"
            f"{f' beside {seen}' if seen else ''}; a DICOM RT case needs its planning CT"
        )
    if len(found.ct) == 1:
        return next(iter(found.ct.values()))
    wanted = _referenced_series(rtstruct) if rtstruct is not None else set()
    chosen = [uid for uid in found.ct if uid in wanted]
    if len(chosen) != 1:
        listing = "; ".join(f"{uid} ({len(v)} files, e.g. {v[0][0].name})" for uid, v in found.ct.items())
        raise DataError(
            f"{found.path}: several CT series ({listing}) and the RTSTRUCT does not pick one; "
            "keep one CT series per folder"
        )
    return found.ct[chosen[0]]


def _keywords(ds: Dataset, keywords: Sequence[str]) -> dict[str, str]:
    return {k: str(ds.get(k, "") or "") for k in keywords}


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {keyword}: missing or not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: {keyword}: expected {n} finite numbers, got {value!r}")
    return arr


def _cosines(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    iop = _floats(ds, "ImageOrientationPatient", 6, path)
    r, c = iop[:3], iop[3:]
    if min(np.linalg.norm(r), np.linalg.norm(c)) < 0.5 or abs(np.dot(r, c)) > 1e-3:
        raise DataError(f"{path}: ImageOrientationPatient {iop.tolist()} is not two unit vectors at 90°")
    r = r / np.linalg.norm(r)
    c = c - np.dot(c, r) * r
    return r, c / np.linalg.norm(c)


def _uneven_gap(positions: np.ndarray) -> int | None:
    """Index of the first gap that differs from the median gap by over 1 % (or 0.01 mm)."""
    if len(positions) < 3:
        return None
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(0.01, 0.01 * abs(step)))
    return int(bad[0]) if bad.size else None


@dataclass(frozen=True)
class _Stack:
    """Image planes ``values[f, i, j]`` at LPS ``position + offsets[f] n + i dr c + j dc r``."""

    values: np.ndarray
    position: np.ndarray
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    offsets: np.ndarray
    source: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    def native_grid(self, slice_thickness_mm: float | None = None) -> Grid:
        """The grid of ``values`` (index axes slice, row, column); needs uniform offsets."""
        n = len(self.offsets)
        if n > 1:
            step = (self.offsets[-1] - self.offsets[0]) / (n - 1)
            gap = _uneven_gap(self.offsets)
            if gap is not None:
                raise DataError(
                    f"{self.source}: planes are not equally spaced (gap of "
                    f"{self.offsets[gap + 1] - self.offsets[gap]:.4g} mm after plane {gap}, "
                    f"expected {np.median(np.diff(self.offsets)):.4g} mm); read_dicom "
                    "resamples such a stack onto the case grid"
                )
        elif slice_thickness_mm:
            step = float(slice_thickness_mm)
        else:
            raise DataError(f"{self.source}: a single plane without SliceThickness has no 3-D grid")
        axes = np.column_stack([self.normal, self.col_cosine, self.row_cosine])  # LPS columns
        origin = self.position + self.offsets[0] * self.normal
        return Grid(
            self.values.shape,
            (step, self.pixel_spacing[0], self.pixel_spacing[1]),
            tuple(origin[::-1]),
            tuple(map(tuple, axes[::-1])),  # rows in (z, y, x) order, columns = index axes
        )

    def _index(self, axis: int, coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional index along ``axis`` (clipped into range) and where it is in range.

        ``coord`` is in mm along the normal for axis 0 (frames may be unequally spaced) and
        in pixels for the in-plane axes. Tolerance: 1e-4 of a voxel.
        """
        eps = 1e-4
        n = self.values.shape[axis]
        if axis > 0:
            return np.clip(coord, 0, n - 1), (coord >= -eps) & (coord <= n - 1 + eps)
        if n == 1:
            inside = np.abs(coord - self.offsets[0]) <= eps * max(self.pixel_spacing)
            return np.zeros_like(coord), inside
        tol = eps * float(np.diff(self.offsets).min())
        frames = np.interp(coord, self.offsets, np.arange(n, dtype=np.float64))
        return frames, (coord >= self.offsets[0] - tol) & (coord <= self.offsets[-1] + tol)

    def sample(self, grid: Grid, outside: float) -> np.ndarray:
        """Trilinear samples (``float32``) at the voxel centres of ``grid``; ``outside`` beyond.

        Points outside the span of the stack's voxel centres get ``outside``. Grids whose
        axes are parallel to the stack's are interpolated axis by axis (separably); others
        through ``scipy.ndimage.map_coordinates``. Both are exact for linear fields.
        """
        steps = (np.asarray(grid.direction) * np.asarray(grid.spacing_mm))[::-1]  # LPS per index
        base = np.asarray(grid.origin_mm)[::-1] - self.position
        axes = (self.normal, self.col_cosine, self.row_cosine)
        scale = (1.0, self.pixel_spacing[0], self.pixel_spacing[1])
        # stack coordinate a = coef[a, 0] + coef[a, 1:] . (k, i, j) of the grid
        coef = np.array([[base @ ax, *(steps.T @ ax)] for ax in axes]) / np.array(scale)[:, None]
        index = [np.arange(n, dtype=np.float64) for n in grid.shape]
        out = np.full(grid.shape, outside, dtype=np.float32)
        used = np.abs(coef[:, 1:]) > 1e-9 * np.abs(coef[:, 1:]).max(axis=1, keepdims=True)
        source = np.argmax(used, axis=1)  # the grid axis that drives each stack axis
        if np.all(used.sum(axis=1) == 1) and sorted(source.tolist()) == [0, 1, 2]:
            vals = self.values.astype(np.float64, copy=False)
            inside = []
            for a in range(3):
                pos, ok = self._index(a, coef[a, 0] + coef[a, 1 + source[a]] * index[source[a]])
                lo = np.clip(np.floor(pos).astype(np.int64), 0, max(vals.shape[a] - 2, 0))
                hi = np.minimum(lo + 1, vals.shape[a] - 1)
                w = (pos - lo).reshape([-1 if b == a else 1 for b in range(3)])
                vals = np.take(vals, lo, axis=a) * (1.0 - w) + np.take(vals, hi, axis=a) * w
                inside.append(ok)
            order = np.argsort(source)  # grid axis m is stack axis order[m]
            vals = np.transpose(vals, order)
            mask = np.ix_(*(np.flatnonzero(inside[o]) for o in order))
            out[mask] = vals[mask]
            return out
        k, i, j = index
        pts, inside = [], np.ones(grid.shape, dtype=bool)
        for a in range(3):
            coord = coef[a, 0] + coef[a, 1] * k[:, None, None] + coef[a, 2] * i[:, None] + coef[a, 3] * j
            pos, ok = self._index(a, coord)
            pts.append(pos)
            inside &= ok
        if inside.any():
            out[inside] = ndimage.map_coordinates(
                self.values.astype(np.float64, copy=False),
                np.stack([p[inside] for p in pts]),
                order=1,
                mode="nearest",
            )
        return out


def _canonical(grid: Grid) -> tuple[Grid, tuple[int, int, int], tuple[int, ...]]:
    """Reorder index axes so each runs along the positive patient axis nearest to it.

    Returns the new grid, the axis order (new axis p is old axis ``order[p]``) and the new
    axes that are flipped. Oblique grids whose axes do not map one-to-one stay as they are.
    """
    d = np.asarray(grid.direction)
    nearest = np.argmax(np.abs(d), axis=0)  # patient axis nearest to each index axis
    if sorted(nearest.tolist()) != [0, 1, 2]:
        return grid, (0, 1, 2), ()
    order = tuple(int(np.flatnonzero(nearest == p)[0]) for p in range(3))
    flips = tuple(p for p in range(3) if d[p, order[p]] < 0)
    corner = np.zeros(3)
    for p in flips:
        corner[order[p]] = grid.shape[order[p]] - 1
    new_d = d[:, list(order)] * np.array([-1.0 if p in flips else 1.0 for p in range(3)])
    out = Grid(
        tuple(grid.shape[o] for o in order),
        tuple(grid.spacing_mm[o] for o in order),
        tuple(grid.index_to_mm(corner)),
        tuple(map(tuple, new_d)),
    )
    return out, order, flips  # type: ignore[return-value]


def _reorient(arr: np.ndarray, order: tuple[int, int, int], flips: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.flip(np.transpose(arr, order), axis=flips))


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise DataError(f"{path}: PixelData cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _ct_stack(files: list[tuple[Path, Dataset]]) -> tuple[_Stack, str | None]:
    """The CT series as a stack in HU, slices sorted along the normal; checks consistency.

    Also returns why the slices form no grid (unequal gaps, e.g. a missing slice), else ``None``.
    """
    path0, ds0 = files[0]
    r, c = _cosines(ds0, path0)
    n = np.cross(r, c)
    spacing = _floats(ds0, "PixelSpacing", 2, path0)
    shape = (int(ds0.get("Rows", 0)), int(ds0.get("Columns", 0)))
    positions = []
    for p, ds in files:
        rp, cp = _cosines(ds, p)
        if not (np.allclose(rp, r, atol=1e-4) and np.allclose(cp, c, atol=1e-4)):
            raise DataError(f"{p}: ImageOrientationPatient differs from {path0.name}'s; one series needs one")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, p), spacing, atol=1e-4):
            raise DataError(f"{p}: PixelSpacing differs from {path0.name}'s")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape:
            raise DataError(f"{p}: Rows/Columns differ from {path0.name}'s {shape}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, p))
    pos = np.asarray(positions)
    w = pos @ n
    order = np.argsort(w, kind="stable")
    w, pos = w[order], pos[order]
    paths = [files[o][0] for o in order]
    dup = np.flatnonzero(np.diff(w) < 1e-3)
    if dup.size:
        k = int(dup[0])
        raise DataError(f"{paths[k + 1]}: ImagePositionPatient repeats the slice position of {paths[k].name}")
    gap = _uneven_gap(w)
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
        px = _pixels(ds, p)
        if px.shape != shape:
            raise DataError(f"{p}: PixelData has shape {px.shape}, expected Rows x Columns {shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(px.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    stack = _Stack(
        np.stack(slices),
        pos[0],
        r,
        c,
        (float(spacing[0]), float(spacing[1])),
        w - w[0],
        f"{path0.parent} (CT series)",
    )
    return stack, problem


def _dose_stack(ds: Dataset, path: Path) -> _Stack:
    """An RTDOSE as a stack in Gy (frames sorted along the normal)."""
    units = str(ds.get("DoseUnits", "")).upper()
    if units not in _DOSE_UNITS_TO_GY:
        raise DataError(
            f"{path}: DoseUnits {units!r} is not an absolute dose; valid: {sorted(_DOSE_UNITS_TO_GY)}"
        )
    if "DoseGridScaling" not in ds:
        raise DataError(f"{path}: DoseGridScaling is missing")
    scaling = float(ds.DoseGridScaling) * _DOSE_UNITS_TO_GY[units]
    values = _pixels(ds, path).astype(np.float64) * scaling
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
    r, c = _cosines(ds, path)
    spacing = _floats(ds, "PixelSpacing", 2, path)
    return _Stack(
        values,
        _floats(ds, "ImagePositionPatient", 3, path),
        r,
        c,
        (float(spacing[0]), float(spacing[1])),
        offsets,
        str(path),
    )


def _slice_thickness(ds: Dataset) -> float | None:
    value = ds.get("SliceThickness")
    try:
        return float(value) if value not in (None, "") and float(value) > 0 else None
    except (TypeError, ValueError):
        return None


def _dose_on_own_grid(stack: _Stack, ds: Dataset) -> tuple[np.ndarray, Grid, str | None]:
    """An RTDOSE on its own (canonical) grid: dose in Gy (``float32``), grid, note.

    Unequally spaced frames (a non-uniform ``GridFrameOffsetVector``) are resampled linearly
    onto equal frames over the same span at the smallest gap; the note says so.
    """
    note = None
    if _uneven_gap(stack.offsets) is not None:
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
    grid, order, flips = _canonical(stack.native_grid(_slice_thickness(ds)))
    return _reorient(stack.values, order, flips).astype(np.float32), grid, note


def read_rtdose(path: str | Path) -> tuple[np.ndarray, Grid]:
    """Read an RTDOSE file: dose in Gy (``float32``, (z, y, x)) on its own grid.

    The grid is reoriented like the reader's (see module docstring); frames must be equally
    spaced. Raises ``DataError`` for relative doses, missing scaling or unreadable files.
    """
    p = Path(path)
    ds = _read_file(p, pixels=True)
    if str(ds.Modality).upper() != "RTDOSE":
        raise DataError(f"{p}: Modality is {ds.Modality!r}, expected 'RTDOSE'")
    stack = _dose_stack(ds, p)
    grid, order, flips = _canonical(stack.native_grid(_slice_thickness(ds)))
    return _reorient(stack.values, order, flips).astype(np.float32), grid


# --------------------------------------------------------------------------------------
# RTSTRUCT
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Roi:
    """One RTSTRUCT ROI rasterised on a grid (``occupancy`` ``None``: no planar contours).

    ``outside_share`` is the share of the contoured volume that lies outside the grid and was
    cut off (0 when the grid holds it all, 1 when ``occupancy`` is empty).
    """

    number: int
    name: str
    interpreted_type: str
    occupancy: np.ndarray | None
    outside_share: float = 0.0


def _check_frame(
    ds: Dataset, path: Path, uids: set[str], frame_of_reference_uid: str, owner: str = "the CT's"
) -> None:
    others = sorted(u for u in uids if u and u != frame_of_reference_uid)
    if others:
        raise DataError(
            f"{path}: FrameOfReferenceUID {others[0]} differs from {owner} "
            f"{frame_of_reference_uid} (mismatched frames of reference); the file belongs to "
            "another image set"
        )


def _newell_normal(points: np.ndarray) -> np.ndarray:
    nxt = np.roll(points, -1, axis=0)
    normal = np.array(
        [
            np.sum((points[:, 1] - nxt[:, 1]) * (points[:, 2] + nxt[:, 2])),
            np.sum((points[:, 2] - nxt[:, 2]) * (points[:, 0] + nxt[:, 0])),
            np.sum((points[:, 0] - nxt[:, 0]) * (points[:, 1] + nxt[:, 1])),
        ]
    )
    return normal


def _rasterise_roi(
    contours: list[np.ndarray],
    grid: Grid,
    axis: int,
    supersample: int,
    half_thickness_mm: float,
    where: str,
) -> tuple[np.ndarray, float]:
    """Occupancy on ``grid`` of planar contours ((N, 3) (z, y, x) mm) lying across ``axis``.

    Also returns the share of the contoured volume outside the grid: the same rules applied
    to the slices and pixels beyond the grid's edges (only those the contours reach).
    """
    spacing = grid.spacing_mm[axis]
    plane_pos, in_plane = [], []
    other = [a for a in range(3) if a != axis]
    for n, pts in enumerate(contours):
        idx = grid.mm_to_index(pts)
        along = idx[:, axis] * spacing
        if np.ptp(along) > max(0.01, 0.1 * spacing):
            raise DataError(
                f"{where}: contour {n} is not planar along the grid's slices (spread {np.ptp(along):.3g} mm)"
            )
        plane_pos.append(float(along.mean()))
        in_plane.append(idx[:, other])
    planes, which = np.unique(np.round(plane_pos, 2), return_inverse=True)
    # the grid's slices, and those beyond it that may take a plane (a slab's reach, at most 64)
    reach = min(np.ceil(half_thickness_mm / spacing) + 1, 64)
    near = [np.arange(w // spacing - reach, w // spacing + reach + 1) for w in planes]
    slices = np.union1d(np.arange(grid.shape[axis]), np.concatenate(near))
    chosen = select_planes(planes, slices * spacing, half_thickness_mm)
    occ = np.zeros(grid.shape, dtype=np.float32)
    view = np.moveaxis(occ, axis, 0)
    plane_shape = (grid.shape[other[0]], grid.shape[other[1]])
    total = kept = 0.0
    for k, c in zip(slices, chosen, strict=True):
        if c < 0:
            continue
        polys = [in_plane[n] for n in np.flatnonzero(which == c)]
        pts = np.concatenate(polys)
        lo, hi = np.floor(pts.min(axis=0) + 0.5), np.floor(pts.max(axis=0) + 0.5) + 1
        inside = 0 <= k < grid.shape[axis]
        if inside:
            view[int(k)] = fill_polygons(polys, plane_shape, supersample)
            kept += float(view[int(k)].sum())
        if inside and np.all(lo >= 0) and np.all(hi <= plane_shape):
            total += float(view[int(k)].sum())
        else:  # the plane's full area on a window around its polygons, coarser if it is huge
            f = max(1.0, float(np.sqrt(np.prod(hi - lo) / 2**22)))
            window = tuple(int(n) for n in np.ceil((hi - lo) / f))
            total += f * f * float(fill_polygons([(q - lo) / f for q in polys], window, supersample).sum())
    return occ, (1.0 - kept / total if total > 0 else 0.0)


def _int(item: Dataset, keyword: str, where: str) -> int:
    try:
        return int(item.get(keyword))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}.{keyword} must be an integer, got {item.get(keyword)!r}") from exc


def _contour_points(contour: Dataset) -> np.ndarray:
    """ContourData as (N, 3) LPS mm, parsed from the raw bytes when still raw (fast path)."""
    elem = contour.get_item(0x30060050)
    if elem is None:
        raise ValueError("ContourData is missing")
    value = elem.value
    if isinstance(value, bytes):  # not converted to DSfloat objects yet: ~50x faster
        text = value.decode("ascii").strip(" \x00")
        numbers = np.array(text.split("\\") if text else [], dtype=np.float64)
    else:
        numbers = np.asarray(contour.ContourData, dtype=np.float64)
    return numbers.reshape(-1, 3)


def _planar_contours(ds: Dataset, path: Path) -> dict[int, list[np.ndarray]]:
    """ROI number -> its closed planar contours, (N, 3) (z, y, x) mm (fewer than 3 points dropped)."""
    planar: dict[int, list[np.ndarray]] = {}
    for k, item in enumerate(ds.get("ROIContourSequence") or []):
        number = _int(item, "ReferencedROINumber", f"{path}: ROIContourSequence[{k}]")
        for m, contour in enumerate(item.get("ContourSequence") or []):
            kind = str(contour.get("ContourGeometricType", "")).upper()
            if kind not in ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR"):
                continue
            try:
                pts = _contour_points(contour)
            except (AttributeError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{path}: ROIContourSequence[{k}].ContourSequence[{m}].ContourData is not "
                    f"a list of x, y, z triples ({exc})"
                ) from exc
            if len(pts) >= 3 and np.all(np.isfinite(pts)):
                planar.setdefault(number, []).append(pts[:, ::-1])  # LPS -> (z, y, x)
    return planar


def _rtstruct_rois(
    ds: Dataset,
    path: Path,
    grid: Grid,
    *,
    supersample: int,
    slice_thickness_mm: float | None,
    frame_of_reference_uid: str | None,
    planar: dict[int, list[np.ndarray]] | None = None,
    keep_outside: bool = False,
    frame_owner: str = "the CT's",
) -> list[Roi]:
    """The ROIs rasterised on ``grid``; one wholly outside it raises, or with ``keep_outside``
    comes back empty (``outside_share`` 1). ``planar``: the parsed contours, if already read."""
    names: dict[int, str] = {}
    frames: set[str] = {
        str(fr.get("FrameOfReferenceUID", "")) for fr in ds.get("ReferencedFrameOfReferenceSequence") or []
    }
    for i, item in enumerate(ds.get("StructureSetROISequence") or []):
        number = _int(item, "ROINumber", f"{path}: StructureSetROISequence[{i}]")
        names[number] = str(item.get("ROIName", "") or f"ROI{number}").strip()
        frames.add(str(item.get("ReferencedFrameOfReferenceUID", "")))
    if frame_of_reference_uid is not None:
        _check_frame(ds, path, frames, frame_of_reference_uid, frame_owner)
    types = {
        _int(o, "ReferencedROINumber", f"{path}: RTROIObservationsSequence[{i}]"): str(
            o.get("RTROIInterpretedType", "") or ""
        ).upper()
        for i, o in enumerate(ds.get("RTROIObservationsSequence") or [])
    }
    planar = _planar_contours(ds, path) if planar is None else planar
    axis = 0
    if planar:
        biggest = max((c for cs in planar.values() for c in cs), key=len)
        normal = _newell_normal(biggest)
        cosines = np.abs(np.asarray(grid.direction).T @ normal) / max(np.linalg.norm(normal), 1e-12)
        axis = int(np.argmax(cosines))
        if cosines[axis] < 0.999:
            raise DataError(
                f"{path}: contours are not parallel to any slice plane of the grid; "
                "read with the CT's grid (grid='ct')"
            )
    half = 0.5 * (slice_thickness_mm or grid.spacing_mm[axis])
    out = []
    for number, name in names.items():
        where = f"{path}: ROI {name!r} (ROINumber {number})"
        occ, share = None, 0.0
        if number in planar:
            occ, share = _rasterise_roi(planar[number], grid, axis, supersample, half, where)
            if not occ.any():
                if not keep_outside:
                    raise DataError(
                        f"{where}: contours lie entirely outside the {grid.shape} grid "
                        f"(z, y, x from {np.round(grid.origin_mm, 1).tolist()} mm); the structure "
                        "would be empty"
                    )
                share = 1.0
        out.append(Roi(number, name, types.get(number, ""), occ, share))
    return out


def read_rtstruct(
    path: str | Path,
    grid: Grid,
    *,
    supersample: int = 4,
    slice_thickness_mm: float | None = None,
    frame_of_reference_uid: str | None = None,
) -> list[Roi]:
    """Rasterise every ROI of an RTSTRUCT onto ``grid`` (see module docstring for the rules).

    ``slice_thickness_mm`` is the thickness of the slab each contour plane stands for
    (default: the grid's spacing across the contour planes). With ``frame_of_reference_uid``
    a structure set on another frame of reference raises ``DataError``.
    """
    p = Path(path)
    ds = _read_file(p, pixels=False)
    if str(ds.Modality).upper() != "RTSTRUCT":
        raise DataError(f"{p}: Modality is {ds.Modality!r}, expected 'RTSTRUCT'")
    return _rtstruct_rois(
        ds,
        p,
        grid,
        supersample=_supersample(supersample),
        slice_thickness_mm=slice_thickness_mm,
        frame_of_reference_uid=frame_of_reference_uid,
    )


def _supersample(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 32:
        raise DataError(f"supersample must be an integer in 1..32, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# RTPLAN
# --------------------------------------------------------------------------------------
def _plan_beams(ds: Dataset, path: Path) -> Beams | None:
    gantry: list[float] = []
    couch: list[float] = []
    isocenter = None
    arc = False
    beams = ds.get("BeamSequence") or ds.get("IonBeamSequence") or []
    for b, beam in enumerate(beams):
        delivery = str(beam.get("TreatmentDeliveryType", "") or "TREATMENT").upper()
        if delivery not in ("TREATMENT", "CONTINUATION"):
            continue  # setup and verification fields
        points = beam.get("ControlPointSequence") or beam.get("IonControlPointSequence") or []
        where = f"{path}: BeamSequence[{b}]"
        if not points:
            raise DataError(f"{where}: ControlPointSequence is empty")
        cp0 = points[0]
        if cp0.get("GantryAngle") in (None, ""):
            raise DataError(f"{where}.ControlPointSequence[0].GantryAngle is missing")
        if isocenter is None:
            if "IsocenterPosition" not in cp0:
                raise DataError(f"{where}.ControlPointSequence[0].IsocenterPosition is missing")
            isocenter = _floats(cp0, "IsocenterPosition", 3, path)[::-1]
        rotation = str(cp0.get("GantryRotationDirection", "") or "NONE").upper()
        if rotation != "NONE":
            arc = True
            angles = [float(cp.GantryAngle) for cp in points if cp.get("GantryAngle") not in (None, "")]
        else:
            angles = [float(cp0.GantryAngle)]
        gantry += angles
        couch += [float(cp0.get("PatientSupportAngle", 0.0) or 0.0)] * len(angles)
    if not gantry:
        return None
    return Beams(tuple(isocenter), tuple(gantry), "VMAT" if arc else "IMRT", tuple(couch))


def _highest_ptv(names: Sequence[str]) -> str | None:
    ptvs = [n for n in names if n.strip().upper().startswith("PTV")]
    numbered = [(float(m.group(1)), n) for n in ptvs if (m := _PTV_NUMBER.search(n))]
    if numbered:
        return max(numbered)[1]
    return ptvs[0] if len(ptvs) == 1 else None


def _plan_prescriptions(ds: Dataset, path: Path, rois: Mapping[int, str]) -> list[Prescription]:
    groups = ds.get("FractionGroupSequence") or []
    by_target: dict[str, Prescription] = {}
    for i, ref in enumerate(ds.get("DoseReferenceSequence") or []):
        if str(ref.get("DoseReferenceType", "")).upper() != "TARGET":
            continue
        dose = ref.get("TargetPrescriptionDose")
        if dose in (None, "") or not float(dose) > 0:
            continue
        target = None
        number = ref.get("ReferencedROINumber")
        if number not in (None, "") and int(number) in rois:
            target = rois[int(number)]
        description = canonical_name(str(ref.get("DoseReferenceDescription", "") or ""))
        if target is None and description:
            target = next((n for n in rois.values() if canonical_name(n) == description), None)
        target = target or _highest_ptv(list(rois.values()))
        if target is None:
            continue
        group = next(
            (
                g
                for g in groups
                if any(
                    r.get("ReferencedDoseReferenceNumber") == ref.get("DoseReferenceNumber")
                    for r in g.get("ReferencedDoseReferenceSequence") or []
                )
            ),
            groups[0] if groups else None,
        )
        planned = group.get("NumberOfFractionsPlanned") if group is not None else None
        fractions = int(planned) if planned not in (None, "") and int(planned) >= 1 else 1
        try:
            rx = Prescription(target, float(dose), fractions)
        except DataError as exc:
            raise DataError(f"{path}: DoseReferenceSequence[{i}]: {exc}") from exc
        if target not in by_target or rx.dose_gy > by_target[target].dose_gy:
            by_target[target] = rx
    return list(by_target.values())


def read_rtplan(
    path: str | Path, rois: Mapping[int, str] | None = None
) -> tuple[Beams | None, list[Prescription]]:
    """Beams and prescriptions of an RTPLAN (see module docstring).

    ``rois`` maps ROI numbers of the matching RTSTRUCT to structure names; prescriptions
    are matched to them (none without ``rois``). Isocenter in (z, y, x) patient mm.
    """
    p = Path(path)
    ds = _read_file(p, pixels=False)
    if str(ds.Modality).upper() != "RTPLAN":
        raise DataError(f"{p}: Modality is {ds.Modality!r}, expected 'RTPLAN'")
    return _plan_contents(ds, p, rois or {})


def _plan_contents(
    ds: Dataset, path: Path, rois: Mapping[int, str]
) -> tuple[Beams | None, list[Prescription]]:
    """Beams and prescriptions of an RTPLAN dataset; a value that is not a number raises ``DataError``."""
    try:
        return _plan_beams(ds, path), _plan_prescriptions(ds, path, rois)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{path}: an RTPLAN value (angle, isocenter, dose or fraction count) is not a number ({exc})"
        ) from exc


# --------------------------------------------------------------------------------------
# The case reader
# --------------------------------------------------------------------------------------
def _summation_type(ds: Dataset) -> str:
    return str(ds.get("DoseSummationType", "") or "").upper()


def _pick_doses(found: _Folder) -> list[tuple[Path, Dataset]]:
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


def _treatment_beams(plan: Dataset) -> int:
    """The number of treatment beams of an RTPLAN (setup and verification fields left out)."""
    beams = plan.get("BeamSequence") or plan.get("IonBeamSequence") or []
    kinds = [str(b.get("TreatmentDeliveryType", "") or "TREATMENT").upper() for b in beams]
    return sum(k in ("TREATMENT", "CONTINUATION") for k in kinds)


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


def _pick_plan(found: _Folder, doses: list[tuple[Path, Dataset]]) -> tuple[Path, Dataset] | None:
    if len(found.rtplan) <= 1:
        return found.rtplan[0] if found.rtplan else None
    wanted = {
        str(r.get("ReferencedSOPInstanceUID", ""))
        for _, ds in doses
        for r in ds.get("ReferencedRTPlanSequence") or []
    }
    chosen = [(p, ds) for p, ds in found.rtplan if str(ds.get("SOPInstanceUID", "")) in wanted]
    return _only(chosen if chosen else found.rtplan, "RTPLAN", found.path)


def _is_body(roi: Roi) -> bool:
    return roi.interpreted_type == "EXTERNAL"


def _is_target(roi: Roi) -> bool:
    typed = roi.interpreted_type in ("PTV", "CTV", "GTV")
    return typed or roi.name.strip().upper().startswith(TARGET_PREFIXES)


def _roi_names(ds: Dataset) -> dict[int, str]:
    """ROI number -> name, skipping malformed items (``_rtstruct_rois`` reports those)."""
    out = {}
    for item in ds.get("StructureSetROISequence") or []:
        try:
            out[int(item.get("ROINumber"))] = str(item.get("ROIName", "") or "").strip()
        except (TypeError, ValueError):
            continue
    return out


def _plane_positions(contours: list[np.ndarray], normal: np.ndarray) -> np.ndarray:
    """Positions (mm along the LPS ``normal``) of the planes of (z, y, x) mm contours."""
    return np.array([float(c.mean(axis=0)[::-1] @ normal) for c in contours])


def _ct_short(stack: _Stack, thickness_mm: float, planar: dict[int, list[np.ndarray]], names) -> str | None:
    """Why the CT's slices (slabs of one slice) do not hold every contour plane, else ``None``."""
    n = stack.normal
    half = 0.5 * (float(np.median(np.diff(stack.offsets))) if len(stack.offsets) > 1 else thickness_mm)
    lo = float(stack.position @ n) - half
    hi = float(stack.position @ n + stack.offsets[-1]) + half
    missing = []
    for number, contours in planar.items():
        w = _plane_positions(contours, n)
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
    normal = _newell_normal(max(contours, key=len))
    normal = normal / max(np.linalg.norm(normal), 1e-12)
    gaps = np.diff(np.unique(np.round(_plane_positions(contours, normal[::-1]), 2)))
    gaps = gaps[gaps > 0.01]
    return float(np.median(gaps)) if gaps.size else None


def _dose_coverage(stacks: list[_Stack], grid: Grid) -> np.ndarray:
    """Where ``grid``'s voxel centres lie within the span of some RTDOSE's voxel centres."""
    covered = np.zeros(grid.shape, dtype=bool)
    for stack in stacks:
        covered |= replace(stack, values=np.ones(stack.values.shape, np.float32)).sample(grid, 0.0) > 0.5
    return covered


def read_dicom(path: str | Path, grid: Literal["auto", "ct", "dose"] = "auto", supersample: int = 4) -> Case:
    """Read a folder of DICOM RT files (CT series + RTSTRUCT/RTDOSE/RTPLAN) into a ``Case``.

    ``path`` is the folder (a file means its folder). ``grid="ct"`` puts everything on the
    CT grid; ``grid="dose"`` on the RTDOSE grid (CT resampled trilinearly, air outside);
    ``grid="auto"`` on the CT grid when the CT series holds every contour plane, else on the
    RTDOSE grid without a CT (``ct`` ``None``): no CT, a partial CT (a slice or a few), or a
    CT with a missing slice. On the RTDOSE grid structures are cut to the grid, one wholly
    outside it is left out; a target more than 1 % outside the RTDOSE grid raises
    ``DataError`` (on either grid). ``case.meta["grid_source"]`` ("ct" or "rtdose") and
    ``case.meta["grid_reason"]`` say which grid and why; ``case.meta["notes"]`` lists what
    was cut, resampled or scaled. ``supersample``: in-plane scanlines per voxel row for the
    contours. Conventions and rules: module docstring. ``case.meta["dicom"]`` keeps the UIDs
    and patient/study attributes that ``write_rtdose`` needs.
    """
    if grid not in ("auto", "ct", "dose"):
        raise DataError(f"grid must be 'auto', 'ct' or 'dose', got {grid!r}")
    supersample = _supersample(supersample)
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    found = _scan(folder, pixels=True)
    struct = _only(found.rtstruct, "RTSTRUCT", folder)
    doses = _pick_doses(found)
    plan = _pick_plan(found, doses)
    if not found.ct and (grid == "ct" or not doses):
        seen = ", ".join(sorted(p.name for p, _ in found.rtstruct + found.rtdose + found.rtplan))
        need = "its planning CT" + ("" if grid == "ct" else ", or an RTDOSE to read the structures on")
        raise DataError(
            f"{folder}: missing CT: no CT image series (Modality CT)"
            f"{'' if grid == 'ct' else ' and no RTDOSE'} found{f' beside {seen}' if seen else ''}; "
            f"a DICOM RT case needs {need}"
        )
    planar = _planar_contours(struct[1], struct[0]) if struct else {}
    names = _roi_names(struct[1]) if struct else {}
    ct_files = _pick_ct(found, struct[1] if struct else None) if found.ct else []
    ct_stack, ct_problem = _ct_stack(ct_files) if ct_files else (None, f"{folder}: no CT image series")
    ct_ds = ct_files[0][1] if ct_files else None
    ct_thickness = _slice_thickness(ct_ds) if ct_ds is not None else None
    if ct_stack is not None and ct_problem is None and len(ct_stack.offsets) == 1 and not ct_thickness:
        ct_problem = f"{ct_files[0][0]}: a single CT slice without SliceThickness has no 3-D grid"
    if grid == "ct" and ct_problem is not None:
        raise DataError(ct_problem)
    if ct_stack is not None and ct_problem is None:
        ct_problem = _ct_short(ct_stack, ct_thickness or 0.0, planar, names)
    on_ct = grid == "ct" or (grid == "auto" and ct_problem is None)
    if not on_ct and not doses:
        raise DataError(f"{ct_problem}; and there is no RTDOSE to read the case on instead")

    frame_owner = "the CT's" if ct_ds is not None else f"the RTDOSE's ({doses[0][0].name})"
    frame_uid = str((ct_ds if ct_ds is not None else doses[0][1]).get("FrameOfReferenceUID", ""))
    for p, ds in doses + ([plan] if plan else []):
        if "FrameOfReferenceUID" in ds:
            _check_frame(ds, p, {str(ds.FrameOfReferenceUID)}, frame_uid, frame_owner)
    dose_stacks = [_dose_stack(ds, p) for p, ds in doses]
    notes: list[str] = []
    first_dose = None
    if on_ct:
        ct_native = ct_stack.native_grid(ct_thickness)
        case_grid, order, flips = _canonical(ct_native)
        ct = _reorient(ct_stack.values, order, flips)
        slab = ct_native.spacing_mm[0]
        reason = "the CT series holds every contour plane" if grid == "auto" else "asked for: grid='ct'"
    else:
        first_dose, case_grid, note = _dose_on_own_grid(dose_stacks[0], doses[0][1])
        notes += [note] if note else []
        ct = None
        if ct_problem is None:  # grid="dose" with a CT that holds the structures
            ct = ct_stack.sample(case_grid, outside=AIR_HU)
            reason = "asked for: grid='dose' (CT resampled onto it, air outside the CT)"
        else:
            reason = f"{ct_problem}; read on the grid of {doses[0][0].name} without a CT"
        if ct_stack is not None and len(ct_stack.offsets) > 1:
            slab = float(np.median(np.diff(ct_stack.offsets)))
        else:
            slab = ct_thickness or _contour_spacing(planar)
    dose = None
    for k, stack in enumerate(dose_stacks):
        part = first_dose if k == 0 and first_dose is not None else stack.sample(case_grid, outside=0.0)
        dose = part if dose is None else dose + part
    kinds = [_summation_type(ds) for _, ds in doses]
    if "BEAM" in kinds:
        names = ", ".join(p.name for p, _ in doses)
        beams_planned = _treatment_beams(plan[1]) if plan else 0
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

    structures: dict[str, np.ndarray] = {}
    occupancy: dict[str, np.ndarray] = {}
    body = None
    body_name = None
    skipped: list[str] = []
    numbers: dict[int, str] = {}
    clipped: dict[str, float] = {}
    outside_dose: dict[str, float] = {}
    dropped: list[str] = []
    if struct is not None:
        rois = _rtstruct_rois(
            struct[1],
            struct[0],
            case_grid,
            supersample=supersample,
            slice_thickness_mm=slab,
            frame_of_reference_uid=frame_uid,
            planar=planar,
            keep_outside=not on_ct,
            frame_owner=frame_owner,
        )
        covered = _dose_coverage(dose_stacks, case_grid) if on_ct and dose_stacks else None
        drawn = [r for r in rois if r.occupancy is not None]
        skipped = [r.name for r in rois if r.occupancy is None]
        for roi in drawn:
            share = roi.outside_share  # on the RTDOSE grid: the share outside the dose
            if on_ct:
                clipped.update({roi.name: round(share, 4)} if round(share, 4) > 0 else {})
                if covered is None:  # no RTDOSE
                    continue
                share = 1.0 - float(roi.occupancy[covered].sum()) / float(roi.occupancy.sum())
            if share > 0.01 and _is_target(roi):
                raise DataError(
                    f"{struct[0]}: ROI {roi.name!r} is a target and {share:.1%} of it lies outside "
                    f"the RTDOSE grid of {doses[0][0].name} (shape {dose_stacks[0].values.shape}); "
                    "its dose there is unknown; an RTDOSE must cover every target"
                )
            outside_dose.update({roi.name: round(share, 4)} if round(share, 4) > 0 else {})
        dropped = [r.name for r in drawn if not r.occupancy.any()]
        drawn = [r for r in drawn if r.occupancy.any()]
        body_roi = next((r for r in drawn if _is_body(r)), None) or next(
            (r for r in drawn if r.name.lower() in _BODY_NAMES), None
        )
        for roi in drawn:
            mask = _mask(roi.occupancy)
            if roi is body_roi:
                body, body_name = mask, roi.name
                continue
            name = roi.name if roi.name not in structures else f"{roi.name}_{roi.number}"
            structures[name], occupancy[name] = mask, roi.occupancy
            numbers[roi.number] = name
    if clipped:
        notes.append(f"structures cut at the edge of the CT grid (share of volume lost): {clipped}")
    if outside_dose:
        where = "cut to the RTDOSE grid" if not on_ct else "partly outside the RTDOSE grid (0 Gy there)"
        notes.append(f"structures {where} (share of volume): {outside_dose}")
    if dropped:
        notes.append(f"structures wholly outside the RTDOSE grid, left out: {dropped}")
    beams, prescriptions = None, []
    if plan is not None:
        beams, prescriptions = _plan_contents(plan[1], plan[0], numbers)

    source_ds = ct_ds if ct_ds is not None else (struct[1] if struct else doses[0][1])
    meta: dict[str, Any] = {
        "source": str(folder),
        "format": "dicom",
        "grid_source": "ct" if on_ct else "rtdose",
        "grid_reason": reason,
        "notes": notes,
        "dicom": {
            "grid": "ct" if on_ct else "dose",
            "supersample": supersample,
            "contour_slab_mm": slab,
            "frame_of_reference_uid": frame_uid,
            "ct_series_instance_uid": str(ct_ds.get("SeriesInstanceUID", "")) if ct_ds is not None else None,
            "rtplan_sop_instance_uid": str(plan[1].get("SOPInstanceUID", "")) if plan else None,
            "patient": _keywords(source_ds, PATIENT_KEYWORDS),
            "study": _keywords(source_ds, STUDY_KEYWORDS),
            "files": {
                "ct": len(ct_files),
                "rtstruct": struct[0].name if struct else None,
                "rtdose": [p.name for p, _ in doses],
                "rtplan": plan[0].name if plan else None,
            },
            "roi_numbers": {name: number for number, name in numbers.items()},
            "body_roi": body_name,
            "rois_without_contours": skipped,
            "rois_outside_grid": dropped,
            "clipped_to_grid": clipped,
            "outside_dose_grid": outside_dose,
            "ignored_files": found.ignored,
        },
    }
    return Case(
        case_id=folder.resolve().name,
        grid=case_grid,
        ct=ct,
        structures=structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=dose,
        body=body,
        occupancy=occupancy,
        meta=meta,
    )


def _mask(occupancy: np.ndarray) -> np.ndarray:
    """``occupancy >= 0.5``; a structure thinner than that keeps its highest-occupancy voxels."""
    mask = occupancy >= 0.5
    if not mask.any():
        mask = occupancy >= occupancy.max()
    return mask


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------
@dataclass
class _Refs:
    """What a new RT object needs to reference an existing CT (and its RTSTRUCT/RTPLAN)."""

    frame_of_reference_uid: str
    patient: dict[str, str]
    study: dict[str, str]
    ct_series_uid: str | None = None
    ct_slices: list[tuple[str, float]] = field(default_factory=list)  # (SOP UID, n·IPP)
    ct_normal: np.ndarray | None = None
    rtstruct_uid: str | None = None
    roi_numbers: dict[str, int] = field(default_factory=dict)
    rtplan_uid: str | None = None


def _references(folder: str | Path) -> _Refs:
    folder = Path(folder)
    found = _scan(folder, pixels=False)
    struct = _only(found.rtstruct, "RTSTRUCT", folder)
    files = _pick_ct(found, struct[1] if struct else None)
    ds0 = files[0][1]
    r, c = _cosines(ds0, files[0][0])
    n = np.cross(r, c)
    refs = _Refs(
        str(ds0.get("FrameOfReferenceUID", "")),
        _keywords(ds0, PATIENT_KEYWORDS),
        _keywords(ds0, STUDY_KEYWORDS),
        str(ds0.get("SeriesInstanceUID", "")),
        [(str(ds.SOPInstanceUID), float(_floats(ds, "ImagePositionPatient", 3, p) @ n)) for p, ds in files],
        n,
    )
    if struct is not None:
        refs.rtstruct_uid = str(struct[1].SOPInstanceUID)
        refs.roi_numbers = {
            str(item.get("ROIName", "")).strip(): int(item.ROINumber)
            for item in struct[1].get("StructureSetROISequence") or []
        }
    plan = _only(found.rtplan, "RTPLAN", folder)
    if plan is not None:
        refs.rtplan_uid = str(plan[1].SOPInstanceUID)
    return refs


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _new_dataset(sop_class: str, modality: str, refs: _Refs, series_description: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = modality
    ds.Manufacturer = "dosegym"
    ds.SeriesDescription = series_description
    for k, v in {**refs.patient, **refs.study}.items():
        setattr(ds, k, v)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = refs.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _geometry(ds: Dataset, grid: Grid) -> None:
    """ImageOrientationPatient and PixelSpacing of planes perpendicular to grid axis 0."""
    d = np.asarray(grid.direction)
    ds.ImageOrientationPatient = [_ds(v) for v in (*d[::-1, 2], *d[::-1, 1])]
    ds.PixelSpacing = [_ds(grid.spacing_mm[1]), _ds(grid.spacing_mm[2])]
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"


def _dose_refs(
    reference: Case | Grid,
    ct_folder: str | Path | None,
    frame_of_reference_uid: str | None,
    study_instance_uid: str | None,
    rtplan_sop_instance_uid: str | None,
    patient: Mapping[str, str] | None,
) -> _Refs:
    if ct_folder is not None:
        refs = _references(ct_folder)
    elif isinstance(reference, Case) and isinstance(reference.meta.get("dicom"), dict):
        src = reference.meta["dicom"]
        refs = _Refs(
            str(src.get("frame_of_reference_uid") or generate_uid()),
            dict(src.get("patient") or {}),
            dict(src.get("study") or {}),
            rtplan_uid=src.get("rtplan_sop_instance_uid"),
        )
    else:
        case_id = reference.case_id if isinstance(reference, Case) else "dosegym"
        refs = _Refs(generate_uid(), {"PatientName": case_id, "PatientID": case_id}, {})
    refs.frame_of_reference_uid = frame_of_reference_uid or refs.frame_of_reference_uid
    refs.rtplan_uid = rtplan_sop_instance_uid or refs.rtplan_uid
    refs.patient = {**refs.patient, **(patient or {})}
    refs.study = {
        **refs.study,
        "StudyInstanceUID": study_instance_uid or refs.study.get("StudyInstanceUID") or generate_uid(),
    }
    return refs


def write_rtdose(
    dose_gy: np.ndarray,
    reference: Case | Grid,
    path: str | Path,
    *,
    ct_folder: str | Path | None = None,
    frame_of_reference_uid: str | None = None,
    study_instance_uid: str | None = None,
    rtplan_sop_instance_uid: str | None = None,
    patient: Mapping[str, str] | None = None,
    series_description: str = "dosegym dose",
) -> Path:
    """Write a dose (Gy, (z, y, x) on ``reference``'s grid) as an RTDOSE file, atomically.

    References (FrameOfReferenceUID, StudyInstanceUID, patient attributes, the RTPLAN for
    ``ReferencedRTPlanSequence``) come from, in order: the keyword arguments, the CT series
    (and RTPLAN) in ``ct_folder``, ``reference.meta["dicom"]`` of a case read by
    ``read_dicom``; otherwise fresh UIDs. Pixels are 32-bit unsigned with ``DoseGridScaling``
    (max dose / 4e9 Gy per unit), ``DoseType`` PHYSICAL, ``DoseSummationType`` PLAN.
    """
    grid = reference.grid if isinstance(reference, Case) else reference
    if not isinstance(grid, Grid):
        raise DataError(f"write_rtdose: reference must be a Case or a Grid, got {type(reference).__name__}")
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != grid.shape:
        raise DataError(f"write_rtdose: dose_gy shape {dose.shape} does not match grid {grid.shape}")
    if not np.all(np.isfinite(dose)) or dose.min() < 0:
        raise DataError("write_rtdose: dose_gy must be finite and >= 0 Gy")
    refs = _dose_refs(
        reference,
        ct_folder,
        frame_of_reference_uid,
        study_instance_uid,
        rtplan_sop_instance_uid,
        patient,
    )
    ds = _new_dataset(RTDoseStorage, "RTDOSE", refs, series_description)
    _geometry(ds, grid)
    d = np.asarray(grid.direction)
    axis0 = d[::-1, 0]  # LPS direction of index axis 0
    normal = np.cross(d[::-1, 2], d[::-1, 1])
    sign = 1.0 if float(axis0 @ normal) > 0 else -1.0
    ds.ImagePositionPatient = [_ds(v) for v in np.asarray(grid.origin_mm)[::-1]]
    ds.SliceThickness = _ds(grid.spacing_mm[0])
    ds.NumberOfFrames = grid.shape[0]
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = [_ds(sign * k * grid.spacing_mm[0]) for k in range(grid.shape[0])]
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    peak = float(dose.max())
    scaling_text = _ds(peak / 4.0e9 if peak > 0 else 1e-6)
    scaling = float(scaling_text)
    ds.DoseGridScaling = scaling_text
    pixels = np.clip(np.rint(dose / scaling), 0, np.iinfo(np.uint32).max).astype("<u4")
    ds.PixelData = pixels.tobytes()
    if refs.rtplan_uid:
        item = Dataset()
        item.ReferencedSOPClassUID = RTPlanStorage
        item.ReferencedSOPInstanceUID = refs.rtplan_uid
        ds.ReferencedRTPlanSequence = [item]
    return _save(ds, Path(path))


def write_dicom_dose(case: Case, path: str | Path, *, reference_folder: str | Path | None = None) -> Path:
    """Write ``case.dose`` as an RTDOSE (the ``write_case(..., format="dicom")`` writer).

    ``path`` ending in ``.dcm`` is the file; otherwise a folder that gets ``RD.<case_id>.dcm``.
    References come from ``reference_folder`` (a folder with the CT) or ``case.meta["dicom"]``
    (see :func:`write_rtdose`). Returns the file written.
    """
    if case.dose is None:
        raise DataError(f"{case.source}: dose: the case has no dose to write as RTDOSE")
    out = Path(path)
    if out.suffix.lower() != ".dcm":
        out = out / f"RD.{case.case_id}.dcm"
    return write_rtdose(case.dose, case, out, ct_folder=reference_folder)


_ROI_COLOURS = (
    (255, 0, 0),
    (0, 160, 255),
    (0, 200, 0),
    (255, 200, 0),
    (200, 0, 255),
    (0, 220, 200),
)


def _roi_type(name: str) -> str:
    upper = name.strip().upper()
    for prefix, kind in (("PTV", "PTV"), ("CTV", "CTV"), ("ITV", "CTV"), ("GTV", "GTV")):
        if upper.startswith(prefix):
            return kind
    return "EXTERNAL" if upper.lower() in _BODY_NAMES else "OAR"


def write_rtstruct(
    rois: Mapping[str, Sequence[np.ndarray]],
    path: str | Path,
    *,
    ct_folder: str | Path,
    interpreted_types: Mapping[str, str] | None = None,
    label: str = "dosegym",
) -> Path:
    """Write an RTSTRUCT of planar contours that references the CT series in ``ct_folder``.

    ``rois`` maps ROI names to closed planar contours, each an ``(N, 3)`` array of (z, y, x)
    patient mm on a CT slice plane. ROI numbers follow the mapping's order (1, 2, ...).
    ``RTROIInterpretedType`` comes from ``interpreted_types`` or the name (PTV/CTV/GTV,
    Body/External -> EXTERNAL, else OAR). Written atomically.
    """
    refs = _references(ct_folder)
    ds = _new_dataset(RTStructureSetStorage, "RTSTRUCT", refs, "dosegym structures")
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    slice_pos = np.array([w for _, w in refs.ct_slices])
    series = Dataset()
    series.SeriesInstanceUID = refs.ct_series_uid
    series.ContourImageSequence = [_image_ref(uid) for uid, _ in refs.ct_slices]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
    study.ReferencedSOPInstanceUID = refs.study["StudyInstanceUID"]
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = refs.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    types = dict(interpreted_types or {})
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = refs.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        items = []
        for pts in contours:
            lps = np.asarray(pts, dtype=np.float64).reshape(-1, 3)[:, ::-1]
            item = Dataset()
            if slice_pos.size:
                k = int(np.argmin(np.abs(slice_pos - float(lps.mean(axis=0) @ refs.ct_normal))))
                item.ContourImageSequence = [_image_ref(refs.ct_slices[k][0])]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(lps)
            item[_CONTOUR_DATA] = _raw_ds(_CONTOUR_DATA, lps.ravel())
            # declare the item explicit little endian so pydicom writes the raw bytes as they are
            item.set_original_encoding(False, True, "iso8859")
            items.append(item)
        contour = Dataset()
        contour.ROIDisplayColor = list(_ROI_COLOURS[(number - 1) % len(_ROI_COLOURS)])
        contour.ReferencedROINumber = number
        contour.ContourSequence = items
        ds.ROIContourSequence.append(contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = types.get(name, _roi_type(name))
        obs.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(obs)
    return _save(ds, Path(path))


_CONTOUR_DATA = Tag("ContourData")


def _raw_ds(tag: Tag, values: np.ndarray) -> RawDataElement:
    """A multi-valued DS element (0.1 µm) as raw bytes: no per-value DSfloat objects."""
    text = "\\".join(f"{v:.4f}" for v in values).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(tag, "DS", len(text), text, 0, False, True)


def _image_ref(sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def write_rtplan(
    beams: Beams | None,
    prescriptions: Sequence[Prescription],
    path: str | Path,
    *,
    ct_folder: str | Path,
    label: str = "dosegym",
) -> Path:
    """Write an RTPLAN with ``beams`` and ``prescriptions``, referencing ``ct_folder``'s CT.

    IMRT: one static beam per gantry angle; VMAT: one arc (CW) with a control point per
    angle. Couch angles: one per gantry angle, one for all, or none (0°). Each prescription
    is a TARGET dose reference to its ROI in the folder's RTSTRUCT, in a fraction group with
    its number of fractions. Written atomically.
    """
    refs = _references(ct_folder)
    ds = _new_dataset(RTPlanStorage, "RTPLAN", refs, "dosegym plan")
    ds.RTPlanLabel = label[:16]
    ds.RTPlanDate = ds.InstanceCreationDate
    ds.RTPlanTime = ds.InstanceCreationTime
    ds.RTPlanGeometry = "PATIENT"
    if refs.rtstruct_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RTStructureSetStorage
        ref.ReferencedSOPInstanceUID = refs.rtstruct_uid
        ds.ReferencedStructureSetSequence = [ref]
    setup = Dataset()
    setup.PatientPosition = "HFS"
    setup.PatientSetupNumber = 1
    ds.PatientSetupSequence = [setup]
    ds.DoseReferenceSequence = []
    for i, rx in enumerate(prescriptions, start=1):
        if rx.target not in refs.roi_numbers:
            raise DataError(
                f"{ct_folder}: prescription target {rx.target!r} is not an ROI of the RTSTRUCT; "
                f"valid: {sorted(refs.roi_numbers)}"
            )
        ref = Dataset()
        ref.DoseReferenceNumber = i
        ref.DoseReferenceUID = generate_uid()
        ref.DoseReferenceStructureType = "VOLUME"
        ref.DoseReferenceDescription = rx.target[:64]
        ref.ReferencedROINumber = refs.roi_numbers[rx.target]
        ref.DoseReferenceType = "TARGET"
        ref.TargetPrescriptionDose = _ds(rx.dose_gy)
        ds.DoseReferenceSequence.append(ref)
    beam_items = _beam_items(beams, refs) if beams is not None else []
    if beam_items:
        ds.BeamSequence = beam_items
    groups: dict[int, list[int]] = {}
    for i, rx in enumerate(prescriptions, start=1):
        groups.setdefault(rx.fractions, []).append(i)
    ds.FractionGroupSequence = []
    for g, (fractions, dose_refs) in enumerate((groups or {1: []}).items(), start=1):
        group = Dataset()
        group.FractionGroupNumber = g
        group.NumberOfFractionsPlanned = fractions
        group.NumberOfBeams = len(beam_items) if g == 1 else 0
        group.NumberOfBrachyApplicationSetups = 0
        group.ReferencedBeamSequence = []
        for item in beam_items if g == 1 else []:
            ref = Dataset()
            ref.ReferencedBeamNumber = item.BeamNumber
            group.ReferencedBeamSequence.append(ref)
        group.ReferencedDoseReferenceSequence = []
        for number in dose_refs:
            ref = Dataset()
            ref.ReferencedDoseReferenceNumber = number
            group.ReferencedDoseReferenceSequence.append(ref)
        ds.FractionGroupSequence.append(group)
    return _save(ds, Path(path))


def _beam_items(beams: Beams, refs: _Refs) -> list[Dataset]:
    gantry = list(beams.gantry_deg)
    couch = list(beams.couch_deg or [0.0])
    if len(couch) == 1:
        couch = couch * len(gantry)
    if len(couch) != len(gantry):
        raise DataError(
            f"beams.couch_deg has {len(couch)} angles for {len(gantry)} gantry angles; give one "
            "per gantry angle, one for all, or none"
        )
    iso = [_ds(v) for v in beams.isocenter_mm[::-1]]
    arcs = [gantry] if beams.technique == "VMAT" else [[a] for a in gantry]
    items = []
    for b, angles in enumerate(arcs, start=1):
        beam = Dataset()
        beam.BeamNumber = b
        beam.BeamName = f"{'Arc' if beams.technique == 'VMAT' else 'Field'} {b}"
        beam.BeamType = "DYNAMIC" if beams.technique == "VMAT" else "STATIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.TreatmentMachineName = "dosegym"
        beam.PrimaryDosimeterUnit = "MU"
        beam.SourceAxisDistance = "1000"
        beam.ReferencedPatientSetupNumber = 1
        beam.NumberOfWedges = beam.NumberOfCompensators = 0
        beam.NumberOfBoli = beam.NumberOfBlocks = 0
        beam.FinalCumulativeMetersetWeight = "1"
        points = angles if len(angles) > 1 else angles * 2
        beam.NumberOfControlPoints = len(points)
        beam.ControlPointSequence = []
        for k, angle in enumerate(points):
            cp = Dataset()
            cp.ControlPointIndex = k
            cp.CumulativeMetersetWeight = _ds(k / (len(points) - 1))
            if k == 0 or beams.technique == "VMAT":
                cp.GantryAngle = _ds(angle)
            if k == 0:
                cp.NominalBeamEnergy = "6"
                cp.GantryRotationDirection = "CW" if beams.technique == "VMAT" else "NONE"
                cp.BeamLimitingDeviceAngle = "0"
                cp.PatientSupportAngle = _ds(couch[0 if beams.technique == "VMAT" else b - 1])
                cp.PatientSupportRotationDirection = "NONE"
                cp.IsocenterPosition = iso
            beam.ControlPointSequence.append(cp)
        items.append(beam)
    return items


def _ct_refs_for_case(case: Case) -> _Refs:
    src = case.meta.get("dicom") if isinstance(case.meta.get("dicom"), dict) else {}
    patient = dict(src.get("patient") or {}) or {
        "PatientName": case.case_id,
        "PatientID": case.case_id,
    }
    return _Refs(generate_uid(), patient, {"StudyInstanceUID": generate_uid(), "StudyID": "1"})


def _write_ct_series(case: Case, folder: Path) -> None:
    grid = case.grid
    if case.ct is not None:
        hu = case.ct
    else:  # water in the body, air around it
        hu = np.where(case.body, 0.0, AIR_HU) if case.body is not None else np.zeros(grid.shape)
    pixels = np.clip(np.rint(hu), -32768, 32767).astype("<i2")
    refs = _ct_refs_for_case(case)
    series_uid = generate_uid()
    d = np.asarray(grid.direction)
    normal = np.cross(d[::-1, 2], d[::-1, 1])
    for k in range(grid.shape[0]):
        ds = _new_dataset(CTImageStorage, "CT", refs, "dosegym CT")
        ds.SeriesInstanceUID = series_uid
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        _geometry(ds, grid)
        ipp = grid.index_to_mm([k, 0, 0])[::-1]
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.SliceLocation = _ds(ipp @ normal)
        ds.SliceThickness = _ds(grid.spacing_mm[0])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = pixels[k].tobytes()
        ds.save_as(folder / f"CT.{k + 1:04d}.dcm", enforce_file_format=True)


def mask_contours(mask: np.ndarray, grid: Grid) -> list[np.ndarray]:
    """Closed planar contours ((N, 3) (z, y, x) mm) of a mask or occupancy, slice by slice.

    Iso-line at 0.5 on each plane of index axis 0 (the CT slices ``write_dicom_case`` writes).
    """
    out = []
    arr = np.asarray(mask, dtype=np.float32)
    for k in np.flatnonzero(arr.reshape(arr.shape[0], -1).max(axis=1) >= 0.5):
        for poly in plane_contours(arr[k]):
            idx = np.column_stack([np.full(len(poly), float(k)), poly])
            out.append(grid.index_to_mm(idx))
    return out


def write_dicom_case(
    case: Case, folder: str | Path, *, contours: Mapping[str, Sequence[np.ndarray]] | None = None
) -> Path:
    """Write ``case`` as a DICOM RT set in ``folder``, atomically (a folder output, see
    :mod:`dosegym.data.atomic`: new, empty, or a set written here before, whose files it replaces).

    Files: ``CT.0001.dcm`` ... (one per slice along index axis 0, int16 HU; without a CT,
    water in the body and air around it), ``RS.dcm`` (every structure, then the body as
    ``Body``/EXTERNAL; contours from the occupancy where present, else the mask, at 0.5 on
    each slice, unless ``contours`` gives a structure's or the body's (z, y, x) mm polygons
    by name), ``RP.dcm`` (beams and prescriptions, if any) and ``RD.dcm`` (the dose, if
    any). New UIDs; patient attributes from ``case.meta["dicom"]`` when the case came from
    DICOM.
    """
    given = dict(contours or {})
    body_name = None
    if case.body is not None:
        body_name = next(n for n in ("Body", "External", "Body_dosegym") if n not in case.structures)
    extra = sorted(set(given) - set(case.structures) - {body_name})
    if extra:
        raise DataError(
            f"write_dicom_case: contours given for {extra}, which are neither structures of "
            f"case {case.case_id!r} nor its body ({body_name!r})"
        )
    rois: dict[str, Sequence[np.ndarray]] = {}
    types: dict[str, str] = {}
    for name, mask in case.structures.items():
        occ = case.occupancy.get(name, mask)
        occ = occ if occ.max() >= 0.5 else mask  # a structure thinner than half a voxel
        rois[name] = given[name] if name in given else mask_contours(occ, case.grid)
        types[name] = "OAR" if _roi_type(name) == "EXTERNAL" else _roi_type(name)
    if body_name is not None:
        rois[body_name] = given.get(body_name) or mask_contours(case.body, case.grid)
        types[body_name] = "EXTERNAL"
    with atomic_folder(folder, "dosegym DICOM case") as tmp:
        _write_ct_series(case, tmp)
        write_rtstruct(rois, tmp / "RS.dcm", ct_folder=tmp, interpreted_types=types)
        if case.beams is not None or case.prescriptions:
            write_rtplan(case.beams, case.prescriptions, tmp / "RP.dcm", ct_folder=tmp)
        if case.dose is not None:
            write_rtdose(case.dose, case.grid, tmp / "RD.dcm", ct_folder=tmp)
    return Path(folder)
