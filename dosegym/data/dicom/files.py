"""DICOM files of one folder: reading a file, sorting files by kind, picking one of each.

Also the header checks shared by the readers: patient/study keywords, numeric triples and
direction cosines (``ImageOrientationPatient``), frames of reference.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage

from dosegym.data.probe import is_dicom_file
from dosegym.errors import DataError

PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass
class Folder:
    """The DICOM files of one folder, by kind (path, dataset)."""

    path: Path
    ct: dict[str, list[tuple[Path, Dataset]]] = field(default_factory=dict)
    rtstruct: list[tuple[Path, Dataset]] = field(default_factory=list)
    rtdose: list[tuple[Path, Dataset]] = field(default_factory=list)
    rtplan: list[tuple[Path, Dataset]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


#: What pydicom and our value conversions raise on damaged data (a bad value, VR or length).
_DAMAGED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    OSError,
    NotImplementedError,
    struct.error,
)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an error that damaged DICOM data raises while ``path`` is read into ``DataError``
    naming the file (``DataError`` itself passes through)."""
    try:
        yield
    except DataError:
        raise
    except _DAMAGED as exc:
        raise DataError(f"{path}: damaged DICOM data ({type(exc).__name__}: {str(exc)[:200]})") from exc


def read_file(path: Path, *, pixels: bool) -> Dataset:
    """Read one DICOM file (also without the 128-byte preamble) or raise ``DataError``."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
        header = [str(ds.get(k, "") or "") for k in ("SOPClassUID", "Modality")]
        for _ in ds.iterall():  # pydicom decodes values lazily: decode every one here, once
            pass
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if not all(header):
        raise DataError(f"{path}: not a readable DICOM file (no DICOM header, SOPClassUID or Modality)")
    return ds


def scan(folder: Path, *, pixels: bool) -> Folder:
    """Read every DICOM file directly in ``folder`` (hidden files are skipped).

    A file counts as DICOM if it ends in ``.dcm`` or has the ``DICM`` marker; one that then
    cannot be read raises ``DataError``. Other files and non-RT modalities are ignored.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of DICOM files")
    found = Folder(folder)
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() != ".dcm" and not is_dicom_file(p):
            found.ignored.append(p.name)
            continue
        ds = read_file(p, pixels=pixels)
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


def only_one(items: list[tuple[Path, Dataset]], kind: str, folder: Path) -> tuple[Path, Dataset] | None:
    """The one file of ``kind`` (``None`` if there is none); several raise ``DataError``."""
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


def pick_ct(found: Folder, rtstruct: Dataset | None) -> list[tuple[Path, Dataset]]:
    """The CT series of the folder: the only one, else the one ``rtstruct`` references."""
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


def read_one(path: str | Path, modality: str, *, pixels: bool) -> tuple[Path, Dataset]:
    """Read one DICOM file that must be of ``modality`` (e.g. ``"RTDOSE"``), else ``DataError``."""
    p = Path(path)
    ds = read_file(p, pixels=pixels)
    if str(ds.Modality).upper() != modality:
        raise DataError(f"{p}: Modality is {ds.Modality!r}, expected {modality!r}")
    return p, ds


def header_keywords(ds: Dataset, keywords: Sequence[str]) -> dict[str, str]:
    """The values of ``keywords`` in ``ds`` as strings (``""`` where missing)."""
    return {k: str(ds.get(k, "") or "") for k in keywords}


def header_floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    """``n`` finite numbers from ``ds.<keyword>`` (float64), else ``DataError`` naming ``path``."""
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {keyword}: missing or not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: {keyword}: expected {n} finite numbers, got {value!r}")
    return arr


def header_cosines(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines (LPS unit vectors, made orthogonal) of ``ImageOrientationPatient``."""
    iop = header_floats(ds, "ImageOrientationPatient", 6, path)
    r, c = iop[:3], iop[3:]
    if min(np.linalg.norm(r), np.linalg.norm(c)) < 0.5 or abs(np.dot(r, c)) > 1e-3:
        raise DataError(f"{path}: ImageOrientationPatient {iop.tolist()} is not two unit vectors at 90°")
    r = r / np.linalg.norm(r)
    c = c - np.dot(c, r) * r
    return r, c / np.linalg.norm(c)


def check_frame(path: Path, uids: set[str], frame_of_reference_uid: str, owner: str = "the CT's") -> None:
    """Raise ``DataError`` when ``uids`` name a frame of reference other than ``frame_of_reference_uid``."""
    others = sorted(u for u in uids if u and u != frame_of_reference_uid)
    if others:
        raise DataError(
            f"{path}: FrameOfReferenceUID {others[0]} differs from {owner} "
            f"{frame_of_reference_uid} (mismatched frames of reference); the file belongs to "
            "another image set"
        )
