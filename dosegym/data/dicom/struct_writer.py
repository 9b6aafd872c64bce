"""RTSTRUCT writing: named ROIs of closed planar contours that reference a CT series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, RTStructureSetStorage

from dosegym.data.dicom.dataset import new_dataset, read_references, save_dataset
from dosegym.data.dicom.rtstruct import BODY_ROI_NAMES

_ROI_COLOURS = (
    (255, 0, 0),
    (0, 160, 255),
    (0, 200, 0),
    (255, 200, 0),
    (200, 0, 255),
    (0, 220, 200),
)


def roi_type(name: str) -> str:
    """``RTROIInterpretedType`` from a structure name: PTV/CTV/GTV, EXTERNAL for the body, else OAR."""
    upper = name.strip().upper()
    for prefix, kind in (("PTV", "PTV"), ("CTV", "CTV"), ("ITV", "CTV"), ("GTV", "GTV")):
        if upper.startswith(prefix):
            return kind
    return "EXTERNAL" if upper.lower() in BODY_ROI_NAMES else "OAR"


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
    refs = read_references(ct_folder)
    ds = new_dataset(RTStructureSetStorage, "RTSTRUCT", refs, "dosegym structures")
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
        obs.RTROIInterpretedType = types.get(name, roi_type(name))
        obs.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(obs)
    return save_dataset(ds, Path(path))


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
