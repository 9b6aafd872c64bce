"""``read_case`` and ``write_case``: one entry point for every supported format.

Formats and how a path is recognised:

* ``openkbp``: a folder with ``voxel_dimensions.csv`` and ``possible_dose_mask.csv``;
* ``nifti``: a folder with ``case.json`` and ``ct.*`` / ``dose.*`` / ``structures/*``
  (NIfTI ``.nii.gz``, MetaImage ``.mha`` or NRRD ``.nrrd``);
* ``gdphmm``: a GDP-HMM challenge ``.npz`` (pickled dict; needs ``trusted=True``);
* ``dicom``: a folder of DICOM files (CT series, RTSTRUCT, RTDOSE, RTPLAN);
* ``phantom``: a dosegym phantom ``.npz`` (plain arrays, no pickle), or ``phantoms:SITE[/N]``
  for the shipped set.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dosegym.data.case import Case
from dosegym.data.probe import is_dicom_file
from dosegym.data.sites import PHANTOM_PREFIX
from dosegym.errors import DataError

# format -> (module, reader function, writer function or None)
_FORMATS: dict[str, tuple[str, str, str | None]] = {
    "openkbp": ("dosegym.data.openkbp", "read_openkbp", None),
    "nifti": ("dosegym.data.nifti", "read_nifti_folder", "write_nifti_folder"),
    "gdphmm": ("dosegym.data.gdphmm", "read_gdphmm", "write_gdphmm"),
    "dicom": ("dosegym.data.dicom", "read_dicom", "write_dicom_dose"),
    "phantom": ("dosegym.data.phantoms", "read_phantom", "write_phantom"),  # ids or files
}


def _function(fmt: str, which: int) -> Callable[..., Any]:
    module, *names = _FORMATS[fmt]
    name = names[which - 1]
    if name is None:
        raise DataError(
            f"format {fmt!r} has no writer; writable formats: "
            f"{sorted(f for f, v in _FORMATS.items() if v[2])}"
        )
    return getattr(importlib.import_module(module), name)


def detect_format(path: str | Path) -> str:
    """Name the format of ``path`` (see module docstring) or raise ``DataError``."""
    text = str(path)
    if text.startswith(PHANTOM_PREFIX + ":"):
        return "phantom"
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        names = {c.name for c in p.iterdir()}
        if {"voxel_dimensions.csv", "possible_dose_mask.csv"} <= names:
            return "openkbp"
        if "case.json" in names:
            return "nifti"
        if any(c.suffix.lower() == ".dcm" for c in p.iterdir()) or _has_dicom(p):
            return "dicom"
        openkbp = sorted(names & _OPENKBP_FILES)
        if openkbp:
            missing = sorted({"voxel_dimensions.csv", "possible_dose_mask.csv"} - names)
            raise DataError(
                f"{p}: looks like an OpenKBP patient folder (it has {', '.join(openkbp[:4])}) but lacks "
                f"{' and '.join(missing)}; an OpenKBP folder needs voxel_dimensions.csv and "
                "possible_dose_mask.csv"
            )
        raise DataError(
            f"{p}: folder of no known format; expected an OpenKBP patient folder, a NIfTI case "
            "folder (case.json + ct/dose/structures) or a folder of DICOM RT files"
        )
    if p.suffix == ".npz":
        import numpy as np

        try:
            with np.load(p, allow_pickle=False) as z:
                files = set(z.files)
        except Exception as exc:  # noqa: BLE001 - any failure means unreadable npz
            raise DataError(f"{p}: not a readable .npz file ({exc})") from exc
        if files == {"arr_0"}:
            return "gdphmm"
        if "dosegym_phantom" in files:
            return "phantom"
        raise DataError(f"{p}: .npz of no known layout (keys {sorted(files)[:8]})")
    if p.suffix.lower() == ".dcm" or is_dicom_file(p):
        return "dicom"
    raise DataError(f"{p}: unknown file type; supported: {sorted(_FORMATS)}")


#: Files of an OpenKBP patient folder (besides its structure CSVs).
_OPENKBP_FILES = {"voxel_dimensions.csv", "possible_dose_mask.csv", "ct.csv", "dose.csv"}


def _has_dicom(folder: Path) -> bool:
    return any(is_dicom_file(c) for c in list(folder.iterdir())[:50] if c.is_file())


def read_case(path: str | Path, format: str | None = None, **kwargs: Any) -> Case:
    """Read any supported input into a :class:`Case` (format detected unless given).

    Extra keyword arguments go to the format's reader (e.g. ``trusted=True`` and
    ``prescriptions_json=`` for GDP-HMM).
    """
    fmt = format or detect_format(path)
    if fmt not in _FORMATS:
        raise DataError(f"unknown format {fmt!r}; valid: {sorted(_FORMATS)}")
    return _function(fmt, 1)(path, **kwargs)


def write_case(case: Case, path: str | Path, format: str = "nifti", **kwargs: Any) -> Path:
    """Write ``case`` in ``format`` (default the NIfTI folder layout), atomically."""
    if format not in _FORMATS:
        raise DataError(f"unknown format {format!r}; valid: {sorted(_FORMATS)}")
    return _function(format, 2)(case, path, **kwargs)
