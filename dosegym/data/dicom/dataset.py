"""New DICOM datasets for the writers: references to an existing CT series (and its
RTSTRUCT/RTPLAN), a fresh dataset with UIDs and patient/study attributes, plane geometry,
DS values and the atomic save."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from dosegym.data.atomic import atomic_path
from dosegym.data.dicom.files import (
    PATIENT_KEYWORDS,
    STUDY_KEYWORDS,
    header_cosines,
    header_floats,
    header_keywords,
    only_one,
    pick_ct,
    scan,
)
from dosegym.data.grid import Grid


@dataclass
class Refs:
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


def read_references(folder: str | Path) -> Refs:
    """The references of a new RT object to the CT series (and RTSTRUCT/RTPLAN) in ``folder``."""
    folder = Path(folder)
    found = scan(folder, pixels=False)
    struct = only_one(found.rtstruct, "RTSTRUCT", folder)
    files = pick_ct(found, struct[1] if struct else None)
    ds0 = files[0][1]
    r, c = header_cosines(ds0, files[0][0])
    n = np.cross(r, c)
    refs = Refs(
        str(ds0.get("FrameOfReferenceUID", "")),
        header_keywords(ds0, PATIENT_KEYWORDS),
        header_keywords(ds0, STUDY_KEYWORDS),
        str(ds0.get("SeriesInstanceUID", "")),
        [
            (str(ds.SOPInstanceUID), float(header_floats(ds, "ImagePositionPatient", 3, p) @ n))
            for p, ds in files
        ],
        n,
    )
    if struct is not None:
        refs.rtstruct_uid = str(struct[1].SOPInstanceUID)
        refs.roi_numbers = {
            str(item.get("ROIName", "")).strip(): int(item.ROINumber)
            for item in struct[1].get("StructureSetROISequence") or []
        }
    plan = only_one(found.rtplan, "RTPLAN", folder)
    if plan is not None:
        refs.rtplan_uid = str(plan[1].SOPInstanceUID)
    return refs


def ds_text(value: float) -> str:
    """``value`` as a DICOM decimal string (DS, at most 16 characters)."""
    return format_number_as_ds(float(value))


def new_dataset(sop_class: str, modality: str, refs: Refs, series_description: str) -> Dataset:
    """A new dataset of ``sop_class`` with fresh UIDs and the patient, study and frame of ``refs``."""
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


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` to ``path`` atomically (DICOM file format); returns ``path``."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def plane_geometry(ds: Dataset, grid: Grid) -> None:
    """ImageOrientationPatient and PixelSpacing of planes perpendicular to grid axis 0."""
    d = np.asarray(grid.direction)
    ds.ImageOrientationPatient = [ds_text(v) for v in (*d[::-1, 2], *d[::-1, 1])]
    ds.PixelSpacing = [ds_text(grid.spacing_mm[1]), ds_text(grid.spacing_mm[2])]
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
