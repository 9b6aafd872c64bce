"""``Case`` validation and helpers: every bad input raises a DataError naming field and source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dosegym.data import Beams, Case, Grid, Prescription, canonical_name, read_case, write_case
from dosegym.errors import DataError

SHAPE = (4, 5, 6)
GRID = Grid(SHAPE, (2.0, 1.0, 1.0))
SOURCE = "/data/case_7"


def mask(*index) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[index] = True
    return m


def make(**changes) -> Case:
    fields = dict(
        case_id="c7",
        grid=GRID,
        ct=np.zeros(SHAPE, np.float32),
        structures={
            "PTV60": mask(slice(1, 3), 2, 2),
            "SpinalCord": mask(slice(None), 4, 3),
            "Parotid_L": mask(1, 1, 5),
        },
        prescriptions=[Prescription("PTV60", 60.0, 30)],
        dose=np.full(SHAPE, 1.5, np.float32),
        body=np.ones(SHAPE, bool),
        meta={"source": SOURCE},
    )
    fields.update(changes)
    return Case(**fields)


def test_valid_case_converts_dtypes_and_reports_volumes() -> None:
    case = make(ct=np.zeros(SHAPE, np.int16), structures={"PTV60": mask(1, 2, 2).astype(np.uint8)})
    assert case.ct.dtype == np.float32 and case.structures["PTV60"].dtype == bool
    assert case.voxel_volume_cc == pytest.approx(0.002)
    assert case.volume_cc("PTV60") == pytest.approx(0.002)
    assert case.summary()["prescriptions"] == [{"target": "PTV60", "dose_gy": 60.0, "fractions": 30}]


@pytest.mark.parametrize(
    ("changes", "field", "detail"),
    [
        ({"ct": np.zeros((4, 5, 5), np.float32)}, "ct", "shape (4, 5, 5)"),
        ({"dose": np.zeros((6, 5, 4), np.float32)}, "dose", "does not match grid shape"),
        ({"body": np.ones((4, 5), bool)}, "body", "shape (4, 5)"),
        (
            {"structures": {"PTV60": mask(1, 2, 2), "Cord": np.ones((2, 2, 2), bool)}},
            "structures['Cord']",
            "shape",
        ),
        ({"dose": np.where(mask(0, 0, 0), np.nan, 1.0).astype(np.float32)}, "dose", "1 non-finite"),
        ({"ct": np.full(SHAPE, np.inf, np.float32)}, "ct", "non-finite"),
        ({"dose": np.where(mask(0, 0, 0), -0.5, 1.0).astype(np.float32)}, "dose", "negative dose"),
        (
            {"structures": {"PTV60": mask(1, 2, 2), "Lens": np.zeros(SHAPE, bool)}},
            "structures['Lens']",
            "empty",
        ),
        (
            {"prescriptions": [Prescription("PTV70", 70.0, 35)]},
            "prescriptions[0].target",
            "'PTV70'",
        ),
        ({"occupancy": {"PTV60": np.full(SHAPE, 1.5, np.float32)}}, "occupancy['PTV60']", "[0, 1]"),
        (
            {"occupancy": {"GTV": np.zeros(SHAPE, np.float32)}},
            "occupancy['GTV']",
            "no boolean structure",
        ),
        ({"grid": (4, 5, 6)}, "grid", "Grid"),
        ({"beams": {"gantry_deg": [0]}}, "beams", "Beams"),
    ],
)
def test_validation_errors_name_source_and_field(changes: dict, field: str, detail: str) -> None:
    with pytest.raises(DataError) as err:
        make(**changes)
    text = str(err.value)
    assert text.startswith(f"{SOURCE}: {field}:"), text
    assert detail in text


def test_unknown_target_lists_valid_structures() -> None:
    with pytest.raises(DataError, match=r"valid: \['PTV60', 'Parotid_L', 'SpinalCord'\]"):
        make(prescriptions=[Prescription("PTV70", 70.0, 35)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "PTV", "dose_gy": 0.0, "fractions": 1}, "dose_gy must be > 0"),
        ({"target": "PTV", "dose_gy": float("nan"), "fractions": 1}, "dose_gy"),
        ({"target": "PTV", "dose_gy": 60.0, "fractions": 0}, "fractions must be >= 1"),
    ],
)
def test_prescription_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Prescription(**kwargs)


def test_beams_and_grid_errors() -> None:
    with pytest.raises(DataError, match="isocenter_mm"):
        Beams((0.0, 0.0), (0.0,))
    with pytest.raises(DataError, match="at least one angle"):
        Beams((0.0, 0.0, 0.0), ())
    with pytest.raises(DataError, match="technique"):
        Beams((0.0, 0.0, 0.0), (0.0,), "3DCRT")  # type: ignore[arg-type]
    assert Beams((0, 0, 0), (-40.0, 400.0)).gantry_deg == (320.0, 40.0)
    with pytest.raises(DataError, match="spacing_mm"):
        Grid(SHAPE, (0.0, 1.0, 1.0))
    with pytest.raises(DataError, match="orthonormal"):
        Grid(SHAPE, (1.0, 1.0, 1.0), direction=((1, 0, 0), (0, 2, 0), (0, 0, 1)))
    with pytest.raises(DataError, match="shape"):
        Grid((4, 0, 6), (1.0, 1.0, 1.0))


def test_structure_lookup_by_alias() -> None:
    case = make()
    assert case.find_structure("cord") == "SpinalCord"
    assert case.find_structure("spinal cord") == "SpinalCord"
    assert case.find_structure("parotid-l") == "Parotid_L"
    assert case.find_structure("ptv60") == "PTV60"
    assert case.structure("Body") is case.body
    assert np.array_equal(case.structure("Spinal_Cord"), case.structures["SpinalCord"])
    assert canonical_name("Spinal Cord") == canonical_name("cord") == "spinalcord"
    assert case.find_structure("Brainstem") is None
    with pytest.raises(DataError, match=r"'Brainstem' not found; valid: \['PTV60'"):
        case.structure("Brainstem")


def test_roles() -> None:
    case = make(structures={**make().structures, "PTV54": mask(0, 0, 0), "External": np.ones(SHAPE, bool)})
    assert case.targets == ["PTV60", "PTV54"]
    assert case.oars == ["SpinalCord", "Parotid_L"]
    assert case.max_prescription_gy == 60.0
    assert case.prescription_for("PTV60").dose_per_fraction_gy == 2.0


def test_read_case_missing_and_unknown_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: no such file or folder"):
        read_case(missing)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unknown file type"):
        read_case(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="folder of no known format"):
        read_case(empty)
    with pytest.raises(DataError, match="unknown format 'csv'"):
        read_case(empty, format="csv")
    with pytest.raises(DataError, match="has no writer"):
        write_case(make(), tmp_path / "out", format="openkbp")


def test_read_case_missing_file_inside_a_case_folder(tmp_path: Path) -> None:
    out = write_case(make(), tmp_path / "c7")
    (out / "ct.nii.gz").unlink()
    with pytest.raises(DataError, match=r"ct\.nii\.gz: missing"):
        read_case(out)
