"""OpenKBP reader: a patient folder of sparse CSVs, as the challenge ships them.

Axis order and orientation (worked out from the data; checked on pt_108, pt_196, pt_201):
the flat index addresses a C-order array ``raw[a, b, c]`` of 128³ voxels with
``voxel_dimensions.csv`` = (3.906, 3.906, 2.5) mm for (a, b, c). In the raw array

* ``a`` runs anterior -> posterior (mandible at a≈50, spinal cord at a≈72): LPS +y;
* ``b`` runs patient right -> left (RightParotid b≈47, LeftParotid b≈77): LPS +x;
* ``c`` runs superior -> inferior (Brainstem c≈45, Esophagus c≈113): LPS −z, 2.5 mm slices.

We store ``raw.transpose(2, 0, 1)[::-1]`` so that arrays are (z, y, x) with z increasing
superiorly and the identity direction. The challenge publishes no origin: the grid's
origin is put so that the centre of the volume is at (0, 0, 0) mm.

CT: stored values are HU + 1000 (air ≈ 0, soft tissue ≈ 1025); we subtract 1000.
Prescriptions come from the PTV names (``PTV70`` -> 70 Gy in 35 fractions).
Beams: 9 equispaced coplanar IMRT beams 0..320°, isocenter at the centroid of the union
of targets (the challenge does not publish plan geometry).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dosegym.data.case import Beams, Case, Prescription, equispaced_gantry_deg
from dosegym.data.grid import Grid
from dosegym.errors import DataError

OPENKBP_SHAPE = (128, 128, 128)
OPENKBP_FRACTIONS = 35
OPENKBP_OARS = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
)
OPENKBP_TARGETS = ("PTV56", "PTV63", "PTV70")
CT_OFFSET_HU = 1000.0
_PTV_RE = re.compile(r"^PTV(\d+(?:\.\d+)?)$", re.IGNORECASE)


def is_openkbp_folder(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "voxel_dimensions.csv").is_file()
        and (path / "possible_dose_mask.csv").is_file()
    )


def _read_sparse(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with open(path) as fh:
            header = fh.readline()
            if not header.startswith(",data"):
                raise DataError(f"{path}: header must be ',data', got {header.strip()!r}")
            text = fh.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if not text.strip():
        return np.zeros(0, np.int64), np.zeros(0, np.float32) if with_values else None
    try:
        if with_values:
            tokens = text.replace("\n", ",").split(",")
            if tokens and tokens[-1] == "":
                tokens.pop()
            table = np.array(tokens, dtype=np.float64).reshape(-1, 2)
            return table[:, 0].astype(np.int64), table[:, 1].astype(np.float32)
        return np.array(text.replace(",", " ").split(), dtype=np.int64), None
    except ValueError as exc:
        raise DataError(f"{path}: malformed sparse CSV rows ({exc}); expected 'flat_index,value'") from exc


def _to_zyx(flat_idx: np.ndarray, values, path: Path, dtype) -> np.ndarray:
    n = int(np.prod(OPENKBP_SHAPE))
    if flat_idx.size and (flat_idx.min() < 0 or flat_idx.max() >= n):
        raise DataError(f"{path}: flat index out of range [0, {n}); the structure lies outside the grid")
    raw = np.zeros(n, dtype=dtype)
    raw[flat_idx] = True if values is None else values
    return np.ascontiguousarray(raw.reshape(OPENKBP_SHAPE).transpose(2, 0, 1)[::-1])


def from_zyx(array: np.ndarray) -> np.ndarray:
    """Inverse of the reader's reorientation: a (z, y, x) array back to the raw OpenKBP order."""
    return np.ascontiguousarray(np.asarray(array)[::-1].transpose(1, 2, 0))


def read_openkbp(path: str | Path, fractions: int = OPENKBP_FRACTIONS) -> Case:
    """Read one OpenKBP patient folder (``pt_N/``) into a :class:`Case`."""
    folder = Path(path)
    if not is_openkbp_folder(folder):
        raise DataError(
            f"{folder}: not an OpenKBP patient folder (needs voxel_dimensions.csv and possible_dose_mask.csv)"
        )
    try:
        vox = np.loadtxt(folder / "voxel_dimensions.csv", dtype=float).reshape(-1)
    except ValueError as exc:
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: expected three floats ({exc})") from exc
    if vox.shape != (3,) or np.any(vox <= 0):
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: expected three positive floats, got {vox}")
    spacing = (float(vox[2]), float(vox[0]), float(vox[1]))
    shape = OPENKBP_SHAPE
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(shape, spacing))
    grid = Grid(shape, spacing, origin)

    ct = dose = None
    if (folder / "ct.csv").is_file():
        idx, vals = _read_sparse(folder / "ct.csv", True)
        ct = _to_zyx(idx, vals, folder / "ct.csv", np.float32) - np.float32(CT_OFFSET_HU)
    if (folder / "dose.csv").is_file():
        idx, vals = _read_sparse(folder / "dose.csv", True)
        dose = _to_zyx(idx, vals, folder / "dose.csv", np.float32)
    body_idx, _ = _read_sparse(folder / "possible_dose_mask.csv", False)
    body = _to_zyx(body_idx, None, folder / "possible_dose_mask.csv", bool)

    structures: dict[str, np.ndarray] = {}
    for name in OPENKBP_OARS + OPENKBP_TARGETS:
        f = folder / f"{name}.csv"
        if f.is_file():
            idx, _ = _read_sparse(f, False)
            if idx.size:
                structures[name] = _to_zyx(idx, None, f, bool)
    prescriptions = []
    for name in structures:
        m = _PTV_RE.match(name)
        if m:
            prescriptions.append(Prescription(name, float(m.group(1)), fractions))
    beams = None
    targets = [structures[p.target] for p in prescriptions]
    if targets:
        centroid = np.argwhere(np.logical_or.reduce(targets)).mean(axis=0)
        beams = Beams(tuple(grid.index_to_mm(centroid)), equispaced_gantry_deg(9), "IMRT")
    return Case(
        case_id=folder.name,
        grid=grid,
        ct=ct,
        structures=structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=dose,
        body=body,
        meta={"source": str(folder), "format": "openkbp", "site": "headneck"},
    )
