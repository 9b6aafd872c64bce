"""The doses a run keeps for its report: ``RUN/doses/PHASE/`` (``PHASE`` ``before`` or ``after``).

Each phase folder (one atomic folder output of :data:`DOSES_WRITER`) holds one compressed
NIfTI per kept case, ``CASE_ID.nii.gz`` (Gy, the case grid, first evaluation seed), and
``cases.json``: ``{"cases": [{"case_id", "ref", "file"}]}`` in evaluation order, ``ref``
being what reads the case again (a path or a ``phantoms:SITE/N`` id).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dosegym.data.atomic import atomic_folder, json_text
from dosegym.data.case import Case
from dosegym.data.nifti import read_image_on_grid, write_image
from dosegym.errors import DataError

DOSES_DIR = "doses"
DOSES_WRITER = "dosegym doses"
INDEX_FILE = "cases.json"
PHASES = ("before", "after")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SavedCase:
    """One kept case of a phase: its id, the reference that reads it, its dose file."""

    case_id: str
    ref: str
    file: Path


def file_name(case_id: str) -> str:
    """The dose file of ``case_id`` (characters other than letters, digits, ``._-`` as ``_``)."""
    return (_UNSAFE.sub("_", case_id).strip(".") or "case") + ".nii.gz"


def write_doses(
    run_dir: Path, phase: str, doses: Mapping[str, np.ndarray], cases: Sequence[Case], refs: Sequence[str]
) -> Path | None:
    """Write ``doses`` (case id -> Gy on the case grid) of ``phase`` under ``run_dir/doses/``;
    ``cases`` / ``refs``: every evaluated case and the reference that reads it (same order).
    Nothing is written for no doses (None returned)."""
    if phase not in PHASES:
        raise DataError(f"dose phase {phase!r}: valid phases are {list(PHASES)}")
    if not doses:
        return None
    entries = []
    dest = Path(run_dir) / DOSES_DIR / phase
    with atomic_folder(dest, DOSES_WRITER) as tmp:
        for case, ref in zip(cases, refs, strict=True):
            if case.case_id not in doses:
                continue
            name = file_name(case.case_id)
            write_image(np.asarray(doses[case.case_id], dtype=np.float32), case.grid, tmp / name)
            entries.append({"case_id": case.case_id, "ref": str(ref), "file": name})
        (tmp / INDEX_FILE).write_text(json_text({"cases": entries}), encoding="utf-8")
    return dest


def saved_cases(run_dir: Path, phase: str) -> list[SavedCase]:
    """The kept cases of ``phase`` in ``run_dir`` (empty where the run kept none)."""
    index = Path(run_dir) / DOSES_DIR / phase / INDEX_FILE
    if not index.is_file():
        return []
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        rows = doc["cases"]
        return [SavedCase(str(r["case_id"]), str(r["ref"]), index.parent / str(r["file"])) for r in rows]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{index}: not a doses index ({exc}); expected {{'cases': [{{case_id, ref, file}}]}}"
        ) from None


def read_dose(saved: SavedCase, case: Case) -> np.ndarray:
    """The kept dose of ``saved`` on ``case``'s grid (Gy, ``float32``)."""
    if not saved.file.is_file():
        raise DataError(f"{saved.file}: the kept dose of case {saved.case_id!r} is missing")
    dose, _ = read_image_on_grid(saved.file, case.grid, dose=True)
    return dose
