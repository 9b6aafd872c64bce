"""RTDOSE writing: a dose in Gy on a grid as a 32-bit RTDOSE that references its CT and plan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import RTDoseStorage, RTPlanStorage, generate_uid

from dosegym.data.case import Case
from dosegym.data.dicom.dataset import (
    Refs,
    ds_text,
    new_dataset,
    plane_geometry,
    read_references,
    save_dataset,
)
from dosegym.data.grid import Grid
from dosegym.errors import DataError


def _dose_refs(
    reference: Case | Grid,
    ct_folder: str | Path | None,
    frame_of_reference_uid: str | None,
    study_instance_uid: str | None,
    rtplan_sop_instance_uid: str | None,
    patient: Mapping[str, str] | None,
) -> Refs:
    if ct_folder is not None:
        refs = read_references(ct_folder)
    elif isinstance(reference, Case) and isinstance(reference.meta.get("dicom"), dict):
        src = reference.meta["dicom"]
        refs = Refs(
            str(src.get("frame_of_reference_uid") or generate_uid()),
            dict(src.get("patient") or {}),
            dict(src.get("study") or {}),
            rtplan_uid=src.get("rtplan_sop_instance_uid"),
        )
    else:
        case_id = reference.case_id if isinstance(reference, Case) else "dosegym"
        refs = Refs(generate_uid(), {"PatientName": case_id, "PatientID": case_id}, {})
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
    ds = new_dataset(RTDoseStorage, "RTDOSE", refs, series_description)
    plane_geometry(ds, grid)
    d = np.asarray(grid.direction)
    axis0 = d[::-1, 0]  # LPS direction of index axis 0
    normal = np.cross(d[::-1, 2], d[::-1, 1])
    sign = 1.0 if float(axis0 @ normal) > 0 else -1.0
    ds.ImagePositionPatient = [ds_text(v) for v in np.asarray(grid.origin_mm)[::-1]]
    ds.SliceThickness = ds_text(grid.spacing_mm[0])
    ds.NumberOfFrames = grid.shape[0]
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = [ds_text(sign * k * grid.spacing_mm[0]) for k in range(grid.shape[0])]
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    peak = float(dose.max())
    scaling_text = ds_text(peak / 4.0e9 if peak > 0 else 1e-6)
    scaling = float(scaling_text)
    ds.DoseGridScaling = scaling_text
    pixels = np.clip(np.rint(dose / scaling), 0, np.iinfo(np.uint32).max).astype("<u4")
    ds.PixelData = pixels.tobytes()
    if refs.rtplan_uid:
        item = Dataset()
        item.ReferencedSOPClassUID = RTPlanStorage
        item.ReferencedSOPInstanceUID = refs.rtplan_uid
        ds.ReferencedRTPlanSequence = [item]
    return save_dataset(ds, Path(path))


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
