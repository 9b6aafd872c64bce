"""The OpenKBP reader on real patients: orientation proven from anatomy and dose, round trips."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from shared_data import OPENKBP, OPENKBP_PATIENTS, needs

from dosegym.data import Case, Prescription, read_case
from dosegym.data.nifti import read_nifti_folder, write_nifti_folder
from dosegym.data.openkbp import OPENKBP_OARS, from_zyx, read_openkbp
from dosegym.errors import DataError

PATIENTS = list(OPENKBP_PATIENTS)

pytestmark = needs(*(OPENKBP / p for p in PATIENTS))


@pytest.fixture(scope="module", params=PATIENTS)
def case(request) -> Case:
    return read_case(OPENKBP / request.param)


def centroid_mm(case: Case, name: str) -> np.ndarray:
    """Centroid of a structure in patient mm (z, y, x): LPS, z superior."""
    return case.grid.index_to_mm(np.argwhere(case.structures[name]).mean(axis=0))


def test_grid_and_format(case: Case) -> None:
    assert case.meta["format"] == "openkbp"
    assert case.grid.shape == (128, 128, 128)
    a, b, c = np.loadtxt(Path(case.meta["source"]) / "voxel_dimensions.csv")
    assert case.grid.spacing_mm == (c, a, b)  # raw (a, b, c) = (y, x, -z)
    assert a == b and c < a  # square axial pixels, slices thinner than the pixels are wide
    assert case.ct.dtype == np.float32 and case.dose.dtype == np.float32


def test_target_dose_exceeds_every_oar(case: Case) -> None:
    ptv70 = case.dose[case.structures["PTV70"]].mean()
    assert ptv70 > 65.0
    for oar in case.oars:
        assert case.dose[case.structures[oar]].mean() < ptv70, oar


def test_dose_falls_off_away_from_the_targets(case: Case) -> None:
    targets = np.logical_or.reduce([case.structures[t] for t in case.targets])
    distance = ndimage.distance_transform_edt(~targets, sampling=case.grid.spacing_mm)
    shells = [case.dose[(distance > r) & (distance <= r + 10) & case.body].mean() for r in range(0, 70, 10)]
    assert np.all(np.diff(shells) < 0), shells


def test_anatomy_is_where_lps_puts_it(case: Case) -> None:
    """Cord posterior (larger y) to the mandible; left parotid at larger x; brainstem superior."""
    s = case.structures
    if "Mandible" in s:
        assert centroid_mm(case, "SpinalCord")[1] > centroid_mm(case, "Mandible")[1] + 20
    assert centroid_mm(case, "LeftParotid")[2] > centroid_mm(case, "RightParotid")[2] + 40
    for lower in ("Esophagus", "Larynx"):
        if lower in s:
            assert centroid_mm(case, "Brainstem")[0] > centroid_mm(case, lower)[0] + 30, lower


def test_prescriptions_beams_body_and_ct(case: Case) -> None:
    assert sorted(case.prescriptions, key=lambda p: p.dose_gy) == [
        Prescription("PTV56", 56.0, 35),
        Prescription("PTV63", 63.0, 35),
        Prescription("PTV70", 70.0, 35),
    ]
    assert case.targets == ["PTV70", "PTV63", "PTV56"]
    assert set(case.oars) <= set(OPENKBP_OARS)
    assert case.beams.gantry_deg == tuple(float(a) for a in range(0, 360, 40))
    assert case.beams.technique == "IMRT"
    iso_idx = np.rint(case.grid.mm_to_index(case.beams.isocenter_mm)).astype(int)
    targets = np.logical_or.reduce([case.structures[t] for t in case.targets])
    assert targets[tuple(iso_idx)]
    assert 0.01 < case.body.mean() < 0.6
    assert case.dose[~case.body].max() == 0.0
    assert case.ct.min() == -1000.0
    assert -100 < np.median(case.ct[case.body]) < 100  # soft tissue
    assert np.median(case.ct[~case.body]) == -1000.0  # air
    if "Mandible" in case.structures:
        assert case.ct[case.structures["Mandible"]].mean() > 300  # bone


def test_raw_order_inverse() -> None:
    raw = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    zyx = np.ascontiguousarray(raw.transpose(2, 0, 1)[::-1])
    assert np.array_equal(from_zyx(zyx), raw)


def test_round_trip_through_nifti_is_exact(tmp_path: Path) -> None:
    case = read_openkbp(OPENKBP / PATIENTS[2])
    back = read_nifti_folder(write_nifti_folder(case, tmp_path / "pt_201"))
    assert back.grid == case.grid
    for name in ("ct", "dose", "body"):
        assert getattr(back, name).dtype == getattr(case, name).dtype
        assert np.array_equal(getattr(back, name), getattr(case, name)), name
    assert back.structures.keys() == case.structures.keys()
    assert all(np.array_equal(back.structures[k], v) for k, v in case.structures.items())
    assert back.prescriptions == case.prescriptions and back.beams == case.beams
    assert back.meta["source_format"] == "openkbp" and back.meta["site"] == "headneck"


def test_not_an_openkbp_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an OpenKBP patient folder"):
        read_openkbp(tmp_path)
    (tmp_path / "voxel_dimensions.csv").write_text("3.9\n3.9\n")
    (tmp_path / "possible_dose_mask.csv").write_text(",data\n5,\n")
    with pytest.raises(DataError, match="voxel_dimensions.csv"):
        read_openkbp(tmp_path)


# -- malformed CSVs (issue 15, rule 6): each is refused with its file and line -------------
@pytest.fixture
def patient(tmp_path: Path) -> Path:
    """A copy of real patient pt_108 to damage."""
    return Path(shutil.copytree(OPENKBP / PATIENTS[0], tmp_path / "pt_108"))


def _edit(path: Path, line: int, text: str) -> None:
    """Replace line ``line`` (1-based; the header is line 1) of a CSV by ``text``, or append
    ``text`` as a new last line when ``line`` is 0."""
    lines = path.read_text().splitlines()
    if line:
        lines[line - 1] = text
    else:
        lines.append(text)
    path.write_text("\n".join(lines) + "\n")


def _index_on(path: Path, line: int) -> int:
    return int(path.read_text().splitlines()[line - 1].split(",")[0])


@pytest.mark.parametrize(
    ("file", "line", "text", "says"),
    [
        ("PTV70.csv", 3, "{i3},1", "line 3: a value '1' on a structure row"),
        ("possible_dose_mask.csv", 4, "{i4},1.0", "line 4: a value '1.0' on a structure row"),
        ("dose.csv", 0, "{i2},999", "line {n}: index {i2} repeats line 2; each voxel appears once"),
        ("PTV70.csv", 0, "{i2},", "line {n}: index {i2} repeats line 2"),
        ("dose.csv", 4, "{i4}.5,3.0", "line 4: index '{i4}.5' is not a whole number"),
        ("PTV70.csv", 4, "{i4}.5,", "line 4: index '{i4}.5' is not a whole number"),
        ("PTV70.csv", 2, "-5,", "line 2: index -5 is outside the (128, 128, 128) grid"),
        ("dose.csv", 2, "-5,1.0", "line 2: index -5 is outside"),
        (
            "possible_dose_mask.csv",
            0,
            "2097152,",
            "line {n}: index 2097152 is outside the (128, 128, 128) grid",
        ),
        ("dose.csv", 5, "{i5},abc", "line 5: value 'abc' is not a number"),
        ("dose.csv", 5, "{i5},nan", "line 5: value nan is not a finite float32 number"),
        ("ct.csv", 5, "{i5},1e40", "line 5: value 1e+40 is not a finite float32 number"),
        ("dose.csv", 3, "{i3}", "line 3: '{i3}' has 1 fields, not 2"),
        ("dose.csv", 3, "{i3},1,2", "line 3: '{i3},1,2' has 3 fields, not 2"),
        ("dose.csv", 3, "{i3},", "line 3: value '' is not a number"),
        ("PTV70.csv", 3, "", "line 3: '' has 1 fields, not 2"),
    ],
)
def test_malformed_rows_name_file_and_line(patient: Path, file: str, line: int, text: str, says: str) -> None:
    path = patient / file
    n = len(path.read_text().splitlines()) + 1
    idx = {f"i{k}": _index_on(path, k) for k in (2, 3, 4, 5)}
    _edit(path, line, text.format(**idx))
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {says.format(n=n, **idx)}")):
        read_openkbp(patient)


def test_binary_bytes_name_file_and_line(patient: Path) -> None:
    path = patient / "ct.csv"
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at : at + 4] = b"\xff\x00\xfe\x01"
    path.write_bytes(bytes(data))
    line = data.count(b"\n", 0, at) + 1
    with pytest.raises(
        DataError, match=re.escape(f"{path}: line {line}: byte 0xff at offset {at} is not text")
    ):
        read_openkbp(patient)
    path.write_bytes(b",data\n12\x00,1.0\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: byte 0x00")):
        read_openkbp(patient)
    (patient / "voxel_dimensions.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(DataError, match="voxel_dimensions.csv: expected three"):
        read_openkbp(patient)


def test_nan_voxel_size_and_missing_voxel_dimensions(patient: Path) -> None:
    (patient / "voxel_dimensions.csv").write_text("nan\n3.9\n2.5\n")
    with pytest.raises(DataError, match="voxel_dimensions.csv: expected three positive floats"):
        read_openkbp(patient)
    (patient / "voxel_dimensions.csv").unlink()
    with pytest.raises(
        DataError,
        match=re.escape(f"{patient}: looks like an OpenKBP patient folder") + ".*lacks voxel_dimensions.csv",
    ):
        read_case(patient)


def test_crlf_and_unsorted_rows_still_read(patient: Path) -> None:
    """Line endings and row order are not errors: the same case comes back."""
    ref = read_openkbp(OPENKBP / PATIENTS[0])
    dose = patient / "dose.csv"
    lines = dose.read_text().splitlines()
    dose.write_text("\r\n".join(lines[:1] + lines[1:][::-1]) + "\r\n")
    back = read_openkbp(patient)
    assert np.array_equal(back.dose, ref.dose) and np.array_equal(back.ct, ref.ct)
