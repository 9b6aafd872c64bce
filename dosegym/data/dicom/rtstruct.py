"""RTSTRUCT: closed planar contours rasterised onto a grid as fractional occupancy.

Rules (even-odd fill, slabs, end-capping, the body ROI): the "Structures" paragraph of
:mod:`dosegym.data.dicom`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dosegym.data.case import TARGET_PREFIXES
from dosegym.data.dicom.files import check_frame, read_one
from dosegym.data.dicom.raster import fill_polygons, select_planes
from dosegym.data.grid import Grid
from dosegym.errors import DataError

#: ROI names taken as the body when no ROI is typed ``EXTERNAL`` (lower case); the writer
#: types ROIs of these names ``EXTERNAL``.
BODY_ROI_NAMES = ("body", "external")


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


def newell_normal(points: np.ndarray) -> np.ndarray:
    """The (unnormalised) normal of a planar polygon ``(N, 3)`` by Newell's method."""
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


def planar_contours(ds: Dataset, path: Path) -> dict[int, list[np.ndarray]]:
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


def rtstruct_rois(
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
        check_frame(path, frames, frame_of_reference_uid, frame_owner)
    types = {
        _int(o, "ReferencedROINumber", f"{path}: RTROIObservationsSequence[{i}]"): str(
            o.get("RTROIInterpretedType", "") or ""
        ).upper()
        for i, o in enumerate(ds.get("RTROIObservationsSequence") or [])
    }
    planar = planar_contours(ds, path) if planar is None else planar
    axis = 0
    if planar:
        biggest = max((c for cs in planar.values() for c in cs), key=len)
        normal = newell_normal(biggest)
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
    p, ds = read_one(path, "RTSTRUCT", pixels=False)
    return rtstruct_rois(
        ds,
        p,
        grid,
        supersample=check_supersample(supersample),
        slice_thickness_mm=slice_thickness_mm,
        frame_of_reference_uid=frame_of_reference_uid,
    )


def check_supersample(value: int) -> int:
    """``value`` if it is an integer in 1..32 (scanlines per voxel row), else ``DataError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 32:
        raise DataError(f"supersample must be an integer in 1..32, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# RTPLAN


def is_body(roi: Roi) -> bool:
    """Whether the ROI is typed ``EXTERNAL``."""
    return roi.interpreted_type == "EXTERNAL"


def is_target(roi: Roi) -> bool:
    """Whether the ROI is a target: typed PTV/CTV/GTV or named with a target prefix."""
    typed = roi.interpreted_type in ("PTV", "CTV", "GTV")
    return typed or roi.name.strip().upper().startswith(TARGET_PREFIXES)


def roi_names(ds: Dataset) -> dict[int, str]:
    """ROI number -> name, skipping malformed items (``rtstruct_rois`` reports those)."""
    out = {}
    for item in ds.get("StructureSetROISequence") or []:
        try:
            out[int(item.get("ROINumber"))] = str(item.get("ROIName", "") or "").strip()
        except (TypeError, ValueError):
            continue
    return out


def plane_positions(contours: list[np.ndarray], normal: np.ndarray) -> np.ndarray:
    """Positions (mm along the LPS ``normal``) of the planes of (z, y, x) mm contours."""
    return np.array([float(c.mean(axis=0)[::-1] @ normal) for c in contours])


def occupancy_mask(occupancy: np.ndarray) -> np.ndarray:
    """``occupancy >= 0.5``; a structure thinner than that keeps its highest-occupancy voxels."""
    mask = occupancy >= 0.5
    if not mask.any():
        mask = occupancy >= occupancy.max()
    return mask
