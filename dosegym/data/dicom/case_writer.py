"""``write_dicom_case``: a whole case as a DICOM RT set (CT series, RTSTRUCT, RTPLAN, RTDOSE)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import CTImageStorage, generate_uid

from dosegym.data.atomic import atomic_folder
from dosegym.data.case import Case
from dosegym.data.dicom.ct import AIR_HU
from dosegym.data.dicom.dataset import Refs, ds_text, new_dataset, plane_geometry
from dosegym.data.dicom.dose_writer import write_rtdose
from dosegym.data.dicom.plan_writer import write_rtplan
from dosegym.data.dicom.raster import plane_contours
from dosegym.data.dicom.struct_writer import roi_type, write_rtstruct
from dosegym.data.grid import Grid
from dosegym.errors import DataError


def _ct_refs_for_case(case: Case) -> Refs:
    src = case.meta.get("dicom") if isinstance(case.meta.get("dicom"), dict) else {}
    patient = dict(src.get("patient") or {}) or {
        "PatientName": case.case_id,
        "PatientID": case.case_id,
    }
    return Refs(generate_uid(), patient, {"StudyInstanceUID": generate_uid(), "StudyID": "1"})


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
        ds = new_dataset(CTImageStorage, "CT", refs, "dosegym CT")
        ds.SeriesInstanceUID = series_uid
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        plane_geometry(ds, grid)
        ipp = grid.index_to_mm([k, 0, 0])[::-1]
        ds.ImagePositionPatient = [ds_text(v) for v in ipp]
        ds.SliceLocation = ds_text(ipp @ normal)
        ds.SliceThickness = ds_text(grid.spacing_mm[0])
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
        types[name] = "OAR" if roi_type(name) == "EXTERNAL" else roi_type(name)
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
