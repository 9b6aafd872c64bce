"""The OpenKBP reader on real patients: orientation proven from anatomy and dose, round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dosegym.data import Case, Prescription, read_case
from dosegym.data.nifti import read_nifti_folder, write_nifti_folder
from dosegym.data.openkbp import OPENKBP_OARS, from_zyx, read_openkbp
from dosegym.errors import DataError

OPENKBP = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "openkbp"
PATIENTS = ["train-pats/pt_108", "train-pats/pt_196", "validation-pats/pt_201"]

pytestmark = pytest.mark.skipif(
    not (OPENKBP / PATIENTS[0]).is_dir(), reason=f"OpenKBP sample patients not found at {OPENKBP}"
)


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
