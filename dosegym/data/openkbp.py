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


_NOT_TEXT = re.compile(rb"[^\t\n\r\x20-\x7e]")


def _read_sparse(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat indices (and values) of a sparse OpenKBP CSV: a ``,data`` header, then one
    ``index,value`` row per voxel (``index,`` for a structure or mask). Every malformed
    row raises ``DataError`` with the file and line: binary bytes, a wrong number of
    fields, a value on a structure row (or none on a value row), an index that is not a
    whole number in ``[0, 128³)``, a repeated index, a value that is not a finite number."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if not data.isascii() or b"\0" in data:
        pos = _NOT_TEXT.search(data).start()  # type: ignore[union-attr]
        line = data.count(b"\n", 0, pos) + 1
        raise DataError(
            f"{path}: line {line}: byte 0x{data[pos]:02x} at offset {pos} is "
            "not text; an OpenKBP CSV is ASCII ',data' then 'index,value' rows"
        )
    text = data.decode("ascii")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    header, _, body = text.partition("\n")
    if not header.startswith(",data"):
        raise DataError(f"{path}: line 1: header must be ',data', got {header.strip()[:40]!r}")
    body = body.rstrip()
    if not body:
        return np.zeros(0, np.int64), np.zeros(0, np.float32) if with_values else None
    n_rows = body.count("\n") + 1
    try:
        if with_values:  # every row 'index,value': 2 tokens per row, all numbers
            if body.count(",") != n_rows:
                raise ValueError
            table = np.array(body.replace("\n", ",").split(","), dtype=np.float64).reshape(-1, 2)
            idx_f, values = table[:, 0], table[:, 1]
            if not np.array_equal(idx_f, np.floor(idx_f)):  # fractional, NaN or inf
                raise ValueError
            idx = idx_f.astype(np.int64)
        else:  # every row 'index,': one comma per row, each at its end
            if body.count(",") != n_rows or body.count(",\n") != n_rows - 1 or body[-1] != ",":
                raise ValueError
            idx, values = np.array(body[:-1].split(",\n"), dtype=np.int64), None
    except (ValueError, OverflowError):
        raise _malformed_row(path, body, with_values) from None
    n = int(np.prod(OPENKBP_SHAPE))
    out = (idx < 0) | (idx >= n)
    if out.any():
        row = int(np.flatnonzero(out)[0])
        raise DataError(
            f"{path}: line {row + 2}: index {idx[row]} is outside the {OPENKBP_SHAPE} grid; "
            f"valid: 0 to {n - 1}"
        )
    if not np.all(idx[1:] > idx[:-1]):  # the challenge's files are sorted; else look for repeats
        order = np.argsort(idx, kind="stable")
        same = np.flatnonzero(idx[order[1:]] == idx[order[:-1]])
        if same.size:
            k = int(np.argmin(order[same + 1]))
            first, row = int(order[same[k]]), int(order[same[k] + 1])
            raise DataError(
                f"{path}: line {row + 2}: index {idx[row]} repeats line {first + 2}; each voxel appears once"
            )
    if values is None:
        return idx, None
    bad = ~(np.abs(values) <= np.finfo(np.float32).max)  # NaN, inf or beyond float32
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {row + 2}: value {values[row]:.4g} is not a finite float32 number")
    return idx, values.astype(np.float32)


def _malformed_row(path: Path, body: str, with_values: bool) -> DataError:
    """The error for the first row of ``body`` (after the header) that is not well formed."""
    form = "'index,value'" if with_values else "'index,' (a structure row has no value)"
    for k, row in enumerate(body.split("\n")):
        fields = row.split(",")
        if len(fields) != 2:
            problem = f"{row[:40]!r} has {len(fields)} fields, not 2"
        elif not _is_whole(fields[0], as_float=with_values):
            problem = f"index {fields[0][:20]!r} is not a whole number"
        elif with_values and not _is_float(fields[1]):
            problem = f"value {fields[1][:20]!r} is not a number"
        elif not with_values and fields[1]:
            problem = f"a value {fields[1][:20]!r} on a structure row"
        else:
            continue
        return DataError(f"{path}: line {k + 2}: {problem}; expected {form} rows")
    return DataError(f"{path}: malformed rows; expected {form} rows")


def _is_whole(text: str, as_float: bool) -> bool:
    """Whether ``text`` parses as the fast path parses an index: ``int``, or (``as_float``)
    a float with no fractional part."""
    try:
        if as_float:
            return float(text).is_integer()
        int(text)
    except ValueError:
        return False
    return True


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _to_zyx(flat_idx: np.ndarray, values, dtype) -> np.ndarray:
    raw = np.zeros(int(np.prod(OPENKBP_SHAPE)), dtype=dtype)
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
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: expected three floats ({exc})") from exc
    if vox.shape != (3,) or not np.all(np.isfinite(vox) & (vox > 0)):
        raise DataError(f"{folder / 'voxel_dimensions.csv'}: expected three positive floats, got {vox}")
    spacing = (float(vox[2]), float(vox[0]), float(vox[1]))
    shape = OPENKBP_SHAPE
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(shape, spacing))
    grid = Grid(shape, spacing, origin)

    ct = dose = None
    if (folder / "ct.csv").is_file():
        idx, vals = _read_sparse(folder / "ct.csv", True)
        ct = _to_zyx(idx, vals, np.float32) - np.float32(CT_OFFSET_HU)
    if (folder / "dose.csv").is_file():
        idx, vals = _read_sparse(folder / "dose.csv", True)
        dose = _to_zyx(idx, vals, np.float32)
    body_idx, _ = _read_sparse(folder / "possible_dose_mask.csv", False)
    body = _to_zyx(body_idx, None, bool)

    structures: dict[str, np.ndarray] = {}
    for name in OPENKBP_OARS + OPENKBP_TARGETS:
        f = folder / f"{name}.csv"
        if f.is_file():
            idx, _ = _read_sparse(f, False)
            if idx.size:
                structures[name] = _to_zyx(idx, None, bool)
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
