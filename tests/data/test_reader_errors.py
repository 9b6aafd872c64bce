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
