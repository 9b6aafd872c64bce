"""GDP-HMM plan files: fixtures in exactly the challenge layout, trust, prescriptions, bad keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dosegym.data import Beams, Case, Grid, Prescription, detect_format, read_case, write_case
from dosegym.data.gdphmm import patient_id, read_gdphmm, write_gdphmm
from dosegym.errors import DataError

SHAPE = (10, 14, 12)
NAME = "HNC_001+A4Ac+MOS_25934.npz"
PTV_DICT = {
    "HNC_001": {
        "PTV_High": {"OPTName": "PTV70OPT", "PDose": 70, "RingName": "RingPTV70"},
        "PTV_Low": {"OPTName": "PTV56OPT", "PDose": 54, "StructName": "PTV56", "MinusName": "x"},
    }
}


def box(z, y, x) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[z, y, x] = True
    return m


def organisers_plan(**changes) -> dict:
    """A plan dict as DICOM2NPZ.py and its crop write it: sitk (x, y, z) geometry, (z, y, x)."""
    rng = np.random.default_rng(1)
    plan = {
        "img": rng.integers(-1000, 1500, SHAPE).astype(np.int16),
        "dose": rng.integers(0, 7_000_000, SHAPE).astype(np.uint32),
        "dose_scale": 1e-5,
        "PTV70OPT": box(slice(3, 6), slice(5, 9), slice(4, 8)).astype(np.uint8),
        "PTV56": box(slice(2, 7), slice(4, 10), slice(3, 9)).astype(np.uint8),
        "SpinalCord": box(slice(None), slice(11, 12), slice(6, 7)).astype(np.uint8),
        "Lens_L": np.zeros(SHAPE, np.uint8),  # outside the crop: empty
        "Body": box(slice(None), slice(1, 13), slice(1, 11)).astype(np.uint8),
        "all_mask": ["PTV70OPT", "PTV56", "SpinalCord", "Lens_L", "Body", "Chiasm"],
        "isVMAT": True,
        "isocenter": np.array([4, 7, 6], np.float32),
        "angle_list": np.array([181.0, 179.0, 183.0], np.float32),
        "beam_plate": rng.random(SHAPE).astype(np.float32),
        "angle_plate": rng.random(SHAPE[1:]).astype(np.float32),
        "origin": (-100.0, -150.0, -20.0),
        "spacing": (2.5, 2.5, 2.0),
        "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        "size": SHAPE,
    }
    plan.update(changes)
    return {k: v for k, v in plan.items() if v is not None}


def save(folder: Path, plan, name: str = NAME) -> Path:
    path = folder / name
    np.savez(path, arr_0=plan)
    return path


@pytest.fixture
def ptv_json(tmp_path: Path) -> Path:
    path = tmp_path / "PTV_DICT.json"
    path.write_text(json.dumps(PTV_DICT))
    return path


def test_reads_the_organisers_layout(tmp_path: Path, ptv_json: Path) -> None:
    path = save(tmp_path, organisers_plan())
    assert detect_format(path) == "gdphmm"
    case = read_case(path, trusted=True, prescriptions_json=ptv_json)
    assert case.case_id == NAME[:-4] and case.meta["patient_id"] == "HNC_001"
    assert case.grid == Grid(SHAPE, (2.0, 2.5, 2.5), (-20.0, -150.0, -100.0))
    assert case.ct.dtype == np.float32 and case.ct[0, 0, 0] == organisers_plan()["img"][0, 0, 0]
    raw = organisers_plan()
    assert np.allclose(case.dose, raw["dose"] * 1e-5, rtol=1e-6)
    assert sorted(case.structures) == ["PTV56", "PTV70OPT", "SpinalCord"]
    assert case.meta["empty_structures"] == ["Lens_L", "Chiasm"]
    assert np.array_equal(case.body, raw["Body"].astype(bool))
    # isocenter voxel indices are array-axis order (z, y, x)
    assert case.beams.isocenter_mm == pytest.approx((-20.0 + 4 * 2.0, -150.0 + 7 * 2.5, -100.0 + 6 * 2.5))
    assert case.beams.technique == "VMAT" and case.beams.gantry_deg == (181.0, 179.0, 183.0)
    assert case.prescriptions == [
        Prescription("PTV70OPT", 70.0, 35),
        Prescription("PTV56", 54.0, 35),
    ]
    assert np.array_equal(case.meta["beam_plate"], raw["beam_plate"])
    assert case.meta["angle_plate"].shape == SHAPE[1:]
    assert case.meta["site"] == "headneck" and case.meta["plan"] == "A4Ac"


def test_untrusted_file_is_refused_with_instructions(tmp_path: Path) -> None:
    path = save(tmp_path, organisers_plan())
    with pytest.raises(DataError) as err:
        read_case(path)
    text = str(err.value)
    assert NAME in text and "pickle" in text and "arbitrary code" in text and "trusted=True" in text


def test_without_prescription_json_there_are_no_prescriptions(tmp_path: Path) -> None:
    case = read_gdphmm(save(tmp_path, organisers_plan()), trusted=True)
    assert case.prescriptions == []
    assert "PTV_DICT.json" in case.meta["prescriptions_missing"]


def test_prescription_json_problems(tmp_path: Path, ptv_json: Path) -> None:
    other = save(tmp_path, organisers_plan(), "HNC_999+9Ag+MOS_1.npz")
    with pytest.raises(DataError, match="HNC_999"):
        read_gdphmm(other, trusted=True, prescriptions_json=ptv_json)
    no_ptv56 = save(tmp_path, organisers_plan(PTV56=None))
    with pytest.raises(DataError, match=r"PTV_Low.*'PTV56'"):
        read_gdphmm(no_ptv56, trusted=True, prescriptions_json=ptv_json)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DataError, match="broken.json"):
        read_gdphmm(no_ptv56, trusted=True, prescriptions_json=broken)


def test_patient_id_zero_padding_and_structname(tmp_path: Path) -> None:
    assert patient_id("7+imrt+MOS_1.npz") == "007"
    assert patient_id("/data/0522c0003+15Ag+MOS_23629.npz") == "0522c0003"
    table = {
        "007": {
            "PTV_High": {"OPTName": "PTV70OPT", "PDose": 70},
            "PTV_Mid": {"OPTName": "PTV56", "PDose": 60},
        }
    }
    (tmp_path / "p.json").write_text(json.dumps(table))
    case = read_gdphmm(
        save(tmp_path, organisers_plan(), "7+imrt+MOS_1.npz"),
        trusted=True,
        prescriptions_json=tmp_path / "p.json",
        fractions=30,
    )
    assert case.prescriptions == [
        Prescription("PTV70OPT", 70.0, 30),
        Prescription("PTV56", 60.0, 30),
    ]


def test_lung_fractions_by_folder_or_id(tmp_path: Path) -> None:
    table = {"LUNG1-001": {"PTV_High": {"OPTName": "PTV70OPT", "PDose": 60}}}
    (tmp_path / "p.json").write_text(json.dumps(table))
    by_id = read_gdphmm(
        save(tmp_path, organisers_plan(), "LUNG1-001+2Ac+MOS_1216.npz"),
        trusted=True,
        prescriptions_json=tmp_path / "p.json",
    )
    assert by_id.meta["site"] == "lung" and by_id.prescriptions[0].fractions == 30
    (tmp_path / "Lung").mkdir()
    by_folder = read_gdphmm(save(tmp_path / "Lung", organisers_plan()), trusted=True)
    assert by_folder.meta["site"] == "lung" and by_folder.meta["site_from"] == "folder"
    with pytest.raises(DataError, match="site"):
        read_gdphmm(save(tmp_path, organisers_plan()), trusted=True, site="prostate")


def test_missing_spacing_uses_the_challenge_default(tmp_path: Path) -> None:
    case = read_gdphmm(
        save(tmp_path, organisers_plan(spacing=None, origin=None, direction=None)), trusted=True
    )
    assert case.grid.spacing_mm == (2.0, 2.5, 2.5)
    assert case.grid.origin_mm == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"img": None}, "no 'img'"),
        ({"dose_scale": None}, "dose_scale"),
        ({"SpinalCord": np.ones((3, 3, 3), np.uint8)}, r"'SpinalCord' has shape"),
        ({"isocenter": np.array([1.0, 2.0])}, "isocenter"),
        ({"angle_list": np.array([])}, "angle_list"),
        ({"spacing": (2.5, 2.5)}, "spacing"),
        ({"size": (1, 2, 3)}, "size"),
        ({"dose_scale": -1.0}, "dose_scale"),
    ],
)
def test_bad_keys(tmp_path: Path, changes: dict, message: str) -> None:
    plan = organisers_plan()
    for k, v in changes.items():
        if v is None:
            plan.pop(k)
        else:
            plan[k] = v
    with pytest.raises(DataError, match=message):
        read_gdphmm(save(tmp_path, plan), trusted=True)


def test_not_a_plan_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dict"):
        read_gdphmm(save(tmp_path, np.arange(3)), trusted=True)
    two = tmp_path / "two.npz"
    np.savez(two, arr_0=organisers_plan(), arr_1=np.zeros(2))
    with pytest.raises(DataError, match="arr_0"):
        read_gdphmm(two, trusted=True)
    with pytest.raises(DataError, match="no such file"):
        read_gdphmm(tmp_path / "absent.npz", trusted=True)


def test_non_mask_arrays_are_kept_in_meta(tmp_path: Path) -> None:
    weights = np.linspace(0, 2, np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)
    case = read_gdphmm(save(tmp_path, organisers_plan(obj_weight=weights, note="x")), trusted=True)
    assert "obj_weight" not in case.structures
    assert np.array_equal(case.meta["extra_obj_weight"], weights) and case.meta["extra_note"] == "x"


def small_case() -> Case:
    grid = Grid(SHAPE, (2.0, 2.5, 2.5), (-20.0, -150.0, -100.0))
    rng = np.random.default_rng(2)
    ptv = box(slice(3, 6), slice(5, 9), slice(4, 8))
    return Case(
        "HNC_001+9Ag+MOS_1",
        grid,
        ct=rng.integers(-1000, 1500, SHAPE).astype(np.float32),
        structures={"PTV70OPT": ptv, "SpinalCord": box(slice(None), slice(11, 12), slice(6, 7))},
        prescriptions=[Prescription("PTV70OPT", 70.0, 35)],
        beams=Beams(tuple(grid.index_to_mm((4.5, 7.0, 6.0))), (0.0, 40.0, 80.0, 120.0), "IMRT"),
        dose=np.round(rng.uniform(0, 75, SHAPE), 3).astype(np.float32),
        body=box(slice(None), slice(1, 13), slice(1, 11)),
    )


def test_writer_produces_exactly_the_challenge_layout(tmp_path: Path) -> None:
    case = small_case()
    path = write_gdphmm(case, tmp_path / NAME)
    with np.load(path, allow_pickle=False) as z:
        assert z.files == ["arr_0"]
    plan = np.load(path, allow_pickle=True)["arr_0"].item()
    assert set(plan) == {
        "img",
        "dose",
        "dose_scale",
        "PTV70OPT",
        "SpinalCord",
        "Body",
        "isVMAT",
        "isocenter",
        "angle_list",
        "beam_plate",
        "angle_plate",
        "origin",
        "spacing",
        "direction",
        "size",
        "all_mask",
    }
    assert plan["img"].dtype == np.int16 and plan["dose"].dtype == np.uint32
    assert plan["PTV70OPT"].dtype == np.uint8 and plan["Body"].dtype == np.uint8
    assert plan["spacing"] == (2.5, 2.5, 2.0) and plan["origin"] == (-100.0, -150.0, -20.0)
    assert plan["size"] == SHAPE and plan["isVMAT"] is False
    assert np.allclose(plan["isocenter"], (4.5, 7.0, 6.0))
    assert plan["beam_plate"].shape == SHAPE and plan["angle_plate"].shape == SHAPE[1:]
    assert plan["all_mask"] == ["PTV70OPT", "SpinalCord", "Body"]
    assert np.allclose(plan["dose"] * plan["dose_scale"], case.dose, atol=plan["dose_scale"] / 2)


def test_round_trip(tmp_path: Path, ptv_json: Path) -> None:
    case = small_case()
    back = read_gdphmm(write_gdphmm(case, tmp_path / NAME), trusted=True)
    assert back.grid == case.grid
    assert np.array_equal(back.ct, case.ct)
    assert np.abs(back.dose - case.dose).max() <= back.meta["dose_scale"]
    assert np.array_equal(back.body, case.body)
    assert all(np.array_equal(back.structures[k], v) for k, v in case.structures.items())
    assert back.beams.isocenter_mm == pytest.approx(case.beams.isocenter_mm, abs=1e-4)
    assert back.beams.gantry_deg == case.beams.gantry_deg
    again = read_gdphmm(write_gdphmm(back, tmp_path / "again" / NAME), trusted=True)
    assert np.array_equal(again.dose, back.dose) and np.array_equal(again.ct, back.ct)


def test_writer_refuses_what_the_layout_cannot_hold(tmp_path: Path) -> None:
    case = small_case()
    with pytest.raises(DataError, match=r"\.npz"):
        write_gdphmm(case, tmp_path / "plan.zip")
    case.ct = None
    with pytest.raises(DataError, match="CT"):
        write_gdphmm(case, tmp_path / NAME)
    assert not (tmp_path / NAME).exists()


def test_case_errors_name_the_file(tmp_path: Path) -> None:
    img = organisers_plan()["img"].astype(np.float32)
    img[0, 0, 0] = np.nan
    path = save(tmp_path, organisers_plan(img=img))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: ct: contains 1 non-finite"):
        read_gdphmm(path, trusted=True)


def test_converts_to_a_nifti_folder_with_the_organisers_plates(tmp_path: Path) -> None:
    case = read_gdphmm(save(tmp_path, organisers_plan()), trusted=True)
    back = read_case(write_case(case, tmp_path / "nifti"))
    assert back.meta["source_format"] == "gdphmm" and back.meta["patient_id"] == "HNC_001"
    assert np.array_equal(back.meta["beam_plate"], case.meta["beam_plate"])
    assert np.array_equal(back.meta["angle_plate"], case.meta["angle_plate"])
    assert np.array_equal(back.dose, case.dose) and back.beams == case.beams


@pytest.mark.parametrize(
    "changes",
    [{"spacing": ("x", "y", "z")}, {"dose_scale": np.array([])}, {"size": ("x", 1, 2)}, {"isVMAT": []}],
)
def test_values_of_the_wrong_type_name_the_file(tmp_path: Path, changes) -> None:
    """Found by the fuzz test: a plan value of the wrong type or size raised ValueError."""
    path = save(tmp_path, organisers_plan(**changes))
    with pytest.raises(DataError, match=re.escape(f"{path}: damaged GDP-HMM plan")):
        read_gdphmm(path, trusted=True)
