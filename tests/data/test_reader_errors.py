"""Issue 15, reader items of rules 5 and 7: damaged inputs are a ``DataError`` naming the
file (and field), never a ``ValueError``, ``MemoryError`` or ``UnpicklingError``."""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dosegym.data import read_case
from dosegym.data.gdphmm import read_gdphmm
from dosegym.data.nifti import write_nifti_folder
from dosegym.data.phantoms import MAX_PHANTOM_VOXELS, read_phantom, shipped_phantom_dir
from dosegym.errors import DataError

PHANTOM = "phantoms:headneck/28"


@pytest.fixture(scope="module")
def phantom_file() -> Path:
    return shipped_phantom_dir() / "headneck" / "headneck_028.npz"


def rebuild_npz(src: Path, dest: Path, replace=None, claim=None) -> Path:
    """A copy of ``src`` with some members replaced (``replace``: key -> array) and some npy
    headers lying about their shape (``claim``: key -> shape; the data stays as it was)."""
    replace, claim = replace or {}, claim or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            key = info.filename.removesuffix(".npy")
            data = zin.read(info)
            if key in replace:
                buf = io.BytesIO()
                np.save(buf, replace[key])
                data = buf.getvalue()
            if key in claim:
                arr = np.load(io.BytesIO(data))
                buf = io.BytesIO()
                header = {"descr": arr.dtype.str, "fortran_order": False, "shape": claim[key]}
                np.lib.format.write_array_header_1_0(buf, header)
                data = buf.getvalue() + arr.tobytes()
            zout.writestr(info.filename, data)
    return dest


@pytest.mark.parametrize(
    "claim",
    [{"masks_packed": (10**12,)}, {"ct_hu": (10**5, 10**5, 10**5)}, {"meta_json": (10**9,)}],
)
def test_phantom_header_claiming_a_huge_array(phantom_file: Path, tmp_path: Path, claim) -> None:
    path = rebuild_npz(phantom_file, tmp_path / "huge.npz", claim=claim)
    key = next(iter(claim))
    with pytest.raises(DataError, match=re.escape(f"{path}: array {key!r} claims shape")):
        read_phantom(path)


def test_phantom_with_a_huge_grid(phantom_file: Path, tmp_path: Path) -> None:
    n = 4096
    path = rebuild_npz(
        phantom_file,
        tmp_path / "grid.npz",
        replace={"grid_shape": np.array([n, n, n], np.int32)},
        claim={"masks_packed": (n**3 * 9 // 8,)},
    )
    with pytest.raises(
        DataError, match=re.escape(f"{path}: grid_shape ({n}, {n}, {n})") + f".*{MAX_PHANTOM_VOXELS}"
    ):
        read_phantom(path)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("rx_dose_gy", [np.nan, 60.0], "dose_gy must be > 0, got nan"),
        ("spacing_mm", [0.0, 2.0, 2.0], "spacing_mm must be finite and > 0 mm"),
        ("origin_mm", [np.inf, 0.0, 0.0], "origin_mm must be finite"),
        ("rx_fractions", ["x", "y"], "damaged phantom file"),
    ],
)
def test_phantom_field_errors_name_the_file(phantom_file: Path, tmp_path: Path, key, value, says) -> None:
    with np.load(phantom_file) as z:
        value = np.asarray(value, dtype=z[key].dtype if key != "rx_fractions" else None)
    path = rebuild_npz(phantom_file, tmp_path / "bad.npz", replace={key: value})
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: ") + ".*" + re.escape(says)):
        read_phantom(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("spacing_mm", [4, -4, "x"]), ("spacing_mm", [4, -4, 4]), ("shape", [0, 2]), ("origin_mm", "abc")],
)
def test_case_json_grid_errors_name_file_and_field(tmp_path: Path, field, value) -> None:
    folder = write_nifti_folder(read_case(PHANTOM), tmp_path / "case")
    cj = folder / "case.json"
    doc = json.loads(cj.read_text())
    doc["grid"][field] = value
    cj.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="^" + re.escape(f"{cj}: field 'grid': ")):
        read_case(folder)


def test_case_json_prescription_errors_name_the_file(tmp_path: Path) -> None:
    folder = write_nifti_folder(read_case(PHANTOM), tmp_path / "case")
    cj = folder / "case.json"
    doc = json.loads(cj.read_text())
    doc["prescriptions"][0]["fractions"] = "x"
    cj.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="^" + re.escape(f"{cj}: prescriptions[0]")):
        read_case(folder)


def _npz_with_pickle(path: Path, payload: bytes) -> Path:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + payload)
    return path


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x04garbage bytes",  # UnpicklingError
        b"\x80\x04h\x05.",  # memo index missing: UnpicklingError
        pickle.dumps(np.array({"img": np.zeros(3)}, dtype=object), protocol=4)[:-40],
    ],
)
def test_garbled_gdphmm_pickle_with_trusted(tmp_path: Path, payload: bytes) -> None:
    path = _npz_with_pickle(tmp_path / "HNC_001+A+B.npz", payload)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot unpickle 'arr_0'")):
        read_gdphmm(path, trusted=True)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot unpickle")):
        read_case(path, trusted=True)


# -- what the fuzz test (tests/test_fuzz.py) found, one reproducer each -------------------------
@pytest.mark.parametrize(
    ("field", "token"),
    [
        ("NDims", "1e30"),
        ("NDims", "-1"),
        ("NDims", "99999999999"),
        ("DimSize", "64 x 48"),
        ("ElementType", ""),
    ],
)
def test_a_damaged_metaimage_header_is_refused_before_itk_reads_it(tmp_path: Path, field, token) -> None:
    """ITK's MetaImage reader crashed the process (SIGSEGV) on ``NDims = 1e30``."""
    folder = tmp_path / "case"
    write_nifti_folder(read_case(PHANTOM), folder, ext=".mha")
    ct = folder / "ct.mha"
    data = ct.read_bytes()
    head, sep, rest = data.partition(b"ElementDataFile")
    lines = [
        (f"{field} = {token}".encode() if line.split(b"=")[0].strip() == field.encode() else line)
        for line in head.split(b"\n")
    ]
    ct.write_bytes(b"\n".join(lines) + sep + rest)
    with pytest.raises(DataError, match=re.escape(f"{ct}: header field {field}")):
        read_case(folder)


def test_phantom_members_of_the_wrong_kind(phantom_file: Path, tmp_path: Path) -> None:
    inf = rebuild_npz(phantom_file, tmp_path / "inf.npz", replace={"dosegym_phantom": np.array(np.inf)})
    with pytest.raises(DataError, match=re.escape(f"{inf}: damaged phantom file (OverflowError")):
        read_phantom(inf)
    listed = rebuild_npz(phantom_file, tmp_path / "meta.npz", replace={"meta_json": np.array("[1, 2]")})
    with pytest.raises(DataError, match=re.escape(f"{listed}: meta_json holds a list")):
        read_phantom(listed)


@pytest.mark.parametrize("target", [{}, 7, ""])
def test_a_prescription_target_must_be_a_name(target) -> None:
    from dosegym.data import Prescription

    with pytest.raises(DataError, match="target must be a structure name"):
        Prescription(target, 70.0, 35)


def test_a_garbled_dose_npy_header_is_a_data_error(tmp_path: Path) -> None:
    from dosegym.cli.score import _read_dose

    path = tmp_path / "dose.npy"
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2, 2), np.float32))
    data = bytearray(buf.getvalue())
    data[data.index(b"{") + 1 : data.index(b"{") + 2] = b"("  # an unclosed bracket in the header dict
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable .npy array")):
        _read_dose(path, read_case(PHANTOM))
