"""``read_dicom``: a folder of DICOM RT files (CT series, RTSTRUCT, RTDOSE, RTPLAN) as a ``Case``.

The steps: scan the folder (``files``), pick the CT series (``ct``), the RTDOSE files that
make the total (``rtdose``) and the RTPLAN (``rtplan``); choose the grid (``case_grid``);
total the dose on it; rasterise the structures (``rtstruct``); read beams and prescriptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dosegym.data.case import Case
from dosegym.data.dicom.case_grid import CaseGrid, GridMode, case_grid, fits_ct
from dosegym.data.dicom.ct import CtSeries, read_ct_series
from dosegym.data.dicom.files import (
    PATIENT_KEYWORDS,
    STUDY_KEYWORDS,
    Folder,
    check_frame,
    header_keywords,
    only_one,
    reading,
    scan,
)
from dosegym.data.dicom.rtdose import dose_coverage, dose_stack, pick_doses, total_dose
from dosegym.data.dicom.rtplan import pick_plan, plan_contents
from dosegym.data.dicom.rtstruct import (
    BODY_ROI_NAMES,
    check_supersample,
    is_body,
    is_target,
    occupancy_mask,
    planar_contours,
    roi_names,
    rtstruct_rois,
)
from dosegym.data.dicom.stack import Stack
from dosegym.errors import DataError

_File = tuple[Path, Dataset]


def read_dicom(path: str | Path, grid: GridMode = "auto", supersample: int = 4) -> Case:
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
    contours. Conventions and rules: the docstrings of :mod:`dosegym.data.dicom` and its
    modules. ``case.meta["dicom"]`` keeps the UIDs and patient/study attributes that
    ``write_rtdose`` needs.
    """
    with reading(Path(path)):
        return _read_dicom(path, grid, supersample)


def _read_dicom(path: str | Path, grid: GridMode, supersample: int) -> Case:
    if grid not in ("auto", "ct", "dose"):
        raise DataError(f"grid must be 'auto', 'ct' or 'dose', got {grid!r}")
    supersample = check_supersample(supersample)
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    found = scan(folder, pixels=True)
    struct = only_one(found.rtstruct, "RTSTRUCT", folder)
    doses = pick_doses(found)
    plan = pick_plan(found, doses)
    _check_ct_or_dose(found, grid, doses)
    with reading(struct[0] if struct else folder):
        planar = planar_contours(struct[1], struct[0]) if struct else {}
        names = roi_names(struct[1]) if struct else {}
    with reading(folder):
        ct = read_ct_series(found, struct[1] if struct else None)
    on_ct, problem = fits_ct(grid, ct, planar, names, bool(doses))

    frame_owner = "the CT's" if ct.first is not None else f"the RTDOSE's ({doses[0][0].name})"
    frame_uid = str((ct.first if ct.first is not None else doses[0][1]).get("FrameOfReferenceUID", ""))
    for p, ds in doses + ([plan] if plan else []):
        if "FrameOfReferenceUID" in ds:
            check_frame(p, {str(ds.FrameOfReferenceUID)}, frame_uid, frame_owner)
    dose_stacks = []
    for p, ds in doses:
        with reading(p):
            dose_stacks.append(dose_stack(ds, p))
    chosen = case_grid(grid, on_ct, problem, ct, doses, dose_stacks, planar)
    dose, dose_notes = total_dose(folder, doses, dose_stacks, plan, chosen.grid, chosen.first_dose)
    rois = _Structures()
    if struct is not None:
        rois = _structures(struct, chosen, planar, doses, dose_stacks, supersample, frame_uid, frame_owner)
    beams, prescriptions = None, []
    if plan:
        with reading(plan[0]):
            beams, prescriptions = plan_contents(plan[1], plan[0], rois.numbers)
    notes = ([chosen.note] if chosen.note else []) + dose_notes + rois.notes(chosen.on_ct)
    meta = {
        "source": str(folder),
        "format": "dicom",
        "grid_source": "ct" if chosen.on_ct else "rtdose",
        "grid_reason": chosen.reason,
        "notes": notes,
        "dicom": _dicom_meta(found, ct, struct, doses, plan, chosen, rois, supersample, frame_uid),
    }
    return Case(
        case_id=folder.resolve().name,
        grid=chosen.grid,
        ct=chosen.ct,
        structures=rois.structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=dose,
        body=rois.body,
        occupancy=rois.occupancy,
        meta=meta,
    )


def _check_ct_or_dose(found: Folder, grid: GridMode, doses: list[_File]) -> None:
    """A case needs its CT series, or (except with ``grid="ct"``) an RTDOSE to be read on."""
    if found.ct or (grid != "ct" and doses):
        return
    seen = ", ".join(sorted(p.name for p, _ in found.rtstruct + found.rtdose + found.rtplan))
    need = "its planning CT" + ("" if grid == "ct" else ", or an RTDOSE to read the structures on")
    raise DataError(
        f"{found.path}: missing CT: no CT image series (Modality CT)"
        f"{'' if grid == 'ct' else ' and no RTDOSE'} found{f' beside {seen}' if seen else ''}; "
        f"a DICOM RT case needs {need}"
    )


@dataclass
class _Structures:
    """The case's structures from the RTSTRUCT's ROIs, and what was left out or cut."""

    structures: dict[str, np.ndarray] = field(default_factory=dict)
    occupancy: dict[str, np.ndarray] = field(default_factory=dict)
    body: np.ndarray | None = None
    body_name: str | None = None
    numbers: dict[int, str] = field(default_factory=dict)  # ROI number -> structure name
    skipped: list[str] = field(default_factory=list)  # ROIs without contours
    clipped: dict[str, float] = field(default_factory=dict)  # share cut at the CT grid's edge
    outside_dose: dict[str, float] = field(default_factory=dict)  # share outside the RTDOSE grid
    dropped: list[str] = field(default_factory=list)  # wholly outside the RTDOSE grid

    def notes(self, on_ct: bool) -> list[str]:
        out = []
        if self.clipped:
            out.append(f"structures cut at the edge of the CT grid (share of volume lost): {self.clipped}")
        if self.outside_dose:
            where = "cut to the RTDOSE grid" if not on_ct else "partly outside the RTDOSE grid (0 Gy there)"
            out.append(f"structures {where} (share of volume): {self.outside_dose}")
        if self.dropped:
            out.append(f"structures wholly outside the RTDOSE grid, left out: {self.dropped}")
        return out


def _structures(
    struct: _File,
    chosen: CaseGrid,
    planar: dict[int, list[np.ndarray]],
    doses: list[_File],
    dose_stacks: list[Stack],
    supersample: int,
    frame_uid: str,
    frame_owner: str,
) -> _Structures:
    """Rasterise the RTSTRUCT on the case grid; the body ROI becomes ``body``.

    A target more than 1 % outside the RTDOSE grid raises ``DataError``.
    """
    on_ct, grid = chosen.on_ct, chosen.grid
    rois = rtstruct_rois(
        struct[1],
        struct[0],
        grid,
        supersample=supersample,
        slice_thickness_mm=chosen.slab_mm,
        frame_of_reference_uid=frame_uid,
        planar=planar,
        keep_outside=not on_ct,
        frame_owner=frame_owner,
    )
    out = _Structures(skipped=[r.name for r in rois if r.occupancy is None])
    covered = dose_coverage(dose_stacks, grid) if on_ct and dose_stacks else None
    drawn = [r for r in rois if r.occupancy is not None]
    for roi in drawn:
        share = roi.outside_share  # on the RTDOSE grid: the share outside the dose
        if on_ct:
            out.clipped.update({roi.name: round(share, 4)} if round(share, 4) > 0 else {})
            if covered is None:  # no RTDOSE
                continue
            share = 1.0 - float(roi.occupancy[covered].sum()) / float(roi.occupancy.sum())
        if share > 0.01 and is_target(roi):
            raise DataError(
                f"{struct[0]}: ROI {roi.name!r} is a target and {share:.1%} of it lies outside "
                f"the RTDOSE grid of {doses[0][0].name} (shape {dose_stacks[0].values.shape}); "
                "its dose there is unknown; an RTDOSE must cover every target"
            )
        out.outside_dose.update({roi.name: round(share, 4)} if round(share, 4) > 0 else {})
    out.dropped = [r.name for r in drawn if not r.occupancy.any()]
    drawn = [r for r in drawn if r.occupancy.any()]
    body_roi = next((r for r in drawn if is_body(r)), None) or next(
        (r for r in drawn if r.name.lower() in BODY_ROI_NAMES), None
    )
    for roi in drawn:
        mask = occupancy_mask(roi.occupancy)
        if roi is body_roi:
            out.body, out.body_name = mask, roi.name
            continue
        name = roi.name if roi.name not in out.structures else f"{roi.name}_{roi.number}"
        out.structures[name], out.occupancy[name] = mask, roi.occupancy
        out.numbers[roi.number] = name
    return out


def _dicom_meta(
    found: Folder,
    ct: CtSeries,
    struct: _File | None,
    doses: list[_File],
    plan: _File | None,
    chosen: CaseGrid,
    rois: _Structures,
    supersample: int,
    frame_uid: str,
) -> dict[str, Any]:
    """``case.meta["dicom"]``: the UIDs, patient/study attributes and what was read or left out."""
    source = ct.first if ct.first is not None else (struct[1] if struct else doses[0][1])
    series_uid = str(ct.first.get("SeriesInstanceUID", "")) if ct.first is not None else None
    return {
        "grid": "ct" if chosen.on_ct else "dose",
        "supersample": supersample,
        "contour_slab_mm": chosen.slab_mm,
        "frame_of_reference_uid": frame_uid,
        "ct_series_instance_uid": series_uid,
        "rtplan_sop_instance_uid": str(plan[1].get("SOPInstanceUID", "")) if plan else None,
        "patient": header_keywords(source, PATIENT_KEYWORDS),
        "study": header_keywords(source, STUDY_KEYWORDS),
        "files": {
            "ct": len(ct.files),
            "rtstruct": struct[0].name if struct else None,
            "rtdose": [p.name for p, _ in doses],
            "rtplan": plan[0].name if plan else None,
        },
        "roi_numbers": {name: number for number, name in rois.numbers.items()},
        "body_roi": rois.body_name,
        "rois_without_contours": rois.skipped,
        "rois_outside_grid": rois.dropped,
        "clipped_to_grid": rois.clipped,
        "outside_dose_grid": rois.outside_dose,
        "ignored_files": found.ignored,
    }
