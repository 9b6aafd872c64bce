"""The NIfTI/MHA/NRRD case folder: exact round trips, SimpleITK geometry, errors, atomicity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dosegym.data import Beams, Case, Grid, Prescription, nifti, read_case, write_case
from dosegym.data.nifti import read_nifti_folder, write_nifti_folder
from dosegym.errors import DataError

EXTS = [".nii.gz", ".mha", ".nrrd"]
SHAPE = (6, 8, 10)
# Index axes (columns): z along +z; y and x rotated by 30 degrees in the axial plane.
_C, _S = float(np.cos(np.pi / 6)), float(np.sin(np.pi / 6))
DIRECTION = ((1.0, 0.0, 0.0), (0.0, _C, -_S), (0.0, _S, _C))
UNSAFE = ["PTV 70/boost", "Lung_L", "lung_l", "..", "Parotid (L)", "Œsophagus"]


def tiny_case() -> Case:
    rng = np.random.default_rng(0)
    grid = Grid(SHAPE, (2.5, 1.171875, 0.977), (-31.25, 12.3456789, -4.2), DIRECTION)
    structures = {}
    for i, name in enumerate(["PTV70", "SpinalCord", *UNSAFE]):
        m = np.zeros(SHAPE, bool)
        m[1 + i % 4 : 3 + i % 4, 2:5, i : i + 3] = True
        structures[name] = m
    occ = structures["PTV70"] * np.float32(0.25) + np.float32(0.5) * structures["PTV70"]
    return Case(
        case_id="tiny",
        grid=grid,
        ct=rng.normal(0, 300, SHAPE).astype(np.float32),
        structures=structures,
        prescriptions=[Prescription("PTV70", 70.0, 35), Prescription("PTV 70/boost", 66.0, 33)],
        beams=Beams((1.5, 2.25, -3.125), (181.0, 0.5, 359.0), "VMAT", (0.0, 0.0, 0.0)),
        dose=rng.uniform(0, 75, SHAPE).astype(np.float32),
        body=np.ones(SHAPE, bool),
        occupancy={"PTV70": occ},
        meta={
            "source": "memory",
            "format": "phantom",
            "site": "headneck",
            "seed": np.int64(7),
            "plate": rng.random((3, 4)).astype(np.float32),
        },
    )


def assert_same_case(a: Case, b: Case) -> None:
    assert b.case_id == a.case_id
    assert b.grid == a.grid
    for name in ("ct", "dose"):
        assert getattr(b, name).dtype == np.float32
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert np.array_equal(a.body, b.body)
    assert list(b.structures) == list(a.structures)
    for name, mask in a.structures.items():
        assert b.structures[name].dtype == bool
        assert np.array_equal(mask, b.structures[name]), name
    assert b.occupancy.keys() == a.occupancy.keys()
    for name, occ in a.occupancy.items():
        assert np.array_equal(occ, b.occupancy[name])
    assert b.prescriptions == a.prescriptions
    assert b.beams == a.beams


@pytest.mark.parametrize("ext", EXTS)
def test_round_trip_is_exact(tmp_path: Path, ext: str) -> None:
    case = tiny_case()
    out = write_case(case, tmp_path / "case", format="nifti", ext=ext)
    first = read_case(out)
    assert first.meta["format"] == "nifti" and first.meta["source"] == str(out)
    assert_same_case(case, first)
    assert first.meta["site"] == "headneck" and first.meta["seed"] == 7
    assert first.meta["source_format"] == "phantom"
    assert np.array_equal(first.meta["plate"], case.meta["plate"])
    second = read_nifti_folder(write_nifti_folder(first, tmp_path / "again", ext=ext))
    assert_same_case(case, second)
    assert {k: v for k, v in second.meta.items() if k not in ("source", "plate")} == {
        k: v for k, v in first.meta.items() if k not in ("source", "plate")
    }


def test_unsafe_names_get_safe_unique_files(tmp_path: Path) -> None:
    out = write_nifti_folder(tiny_case(), tmp_path / "case")
    doc = json.loads((out / "case.json").read_text())
    files = [e["file"] for e in doc["structures"]]
    assert [e["name"] for e in doc["structures"]] == ["PTV70", "SpinalCord", *UNSAFE]
    assert all(re.fullmatch(r"[A-Za-z0-9_\-~]+", f) for f in files)
    assert len({f.lower() for f in files}) == len(files)
    assert files[:2] == ["PTV70", "SpinalCord"]  # safe names are kept as they are
    on_disk = sorted(p.name for p in (out / "structures").iterdir())
    assert on_disk == sorted(f + ".nii.gz" for f in files)
    assert doc["format_version"] == nifti.FORMAT_VERSION and doc["image_ext"] == ".nii.gz"


@pytest.mark.parametrize("ext", EXTS)
def test_images_carry_the_grid_in_simpleitk_order(tmp_path: Path, ext: str) -> None:
    case = tiny_case()
    out = write_nifti_folder(case, tmp_path / "case", ext=ext)
    img = sitk.ReadImage(str(out / f"ct{ext}"))
    assert img.GetSize() == SHAPE[::-1]
    assert np.allclose(img.GetSpacing(), case.grid.spacing_mm[::-1], atol=1e-5)
    assert np.allclose(img.GetOrigin(), case.grid.origin_mm[::-1], atol=1e-4)
    for zyx in [(0, 0, 0), (5, 7, 9), (2, 3, 1)]:
        itk_point = img.TransformIndexToPhysicalPoint(tuple(int(v) for v in zyx[::-1]))
        assert np.allclose(itk_point[::-1], case.grid.index_to_mm(zyx), atol=1e-4)
        assert sitk.GetArrayViewFromImage(img)[zyx] == case.ct[zyx]
    assert sitk.ReadImage(str(out / f"body{ext}")).GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(out / "structures" / f"PTV70{ext}")).GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(out / "occupancy" / f"PTV70{ext}")).GetPixelID() == sitk.sitkFloat32


def test_hand_made_folder_takes_grid_from_ct(tmp_path: Path) -> None:
    folder = tmp_path / "hand"
    (folder / "structures").mkdir(parents=True)
    ct = np.full(SHAPE, -1000, np.float32)
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((0.977, 1.171875, 2.5))
    img.SetOrigin((-4.0, 10.0, -30.0))
    sitk.WriteImage(img, str(folder / "ct.mha"))
    gtv = np.zeros(SHAPE, np.uint8)
    gtv[2:4, 2:4, 2:4] = 1
    mask = sitk.GetImageFromArray(gtv)
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(folder / "structures" / "GTV.mha"))
    (folder / "case.json").write_text(json.dumps({"case_id": "hand"}))
    case = read_case(folder)
    assert case.grid.spacing_mm == pytest.approx((2.5, 1.171875, 0.977))
    assert case.grid.origin_mm == pytest.approx((-30.0, 10.0, -4.0))
    assert list(case.structures) == ["GTV"] and case.structures["GTV"].sum() == 8
    assert case.dose is None and case.body is None and case.beams is None


def test_missing_case_json_and_missing_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="case.json"):
        read_nifti_folder(tmp_path)
    out = write_nifti_folder(tiny_case(), tmp_path / "case")
    doc = json.loads((out / "case.json").read_text())
    stem = next(e["file"] for e in doc["structures"] if e["name"] == "Parotid (L)")
    (out / "structures" / f"{stem}.nii.gz").unlink()
    with pytest.raises(DataError, match=re.escape(f"{stem}.nii.gz")) as err:
        read_nifti_folder(out)
    assert "missing" in str(err.value) and "Parotid (L)" in str(err.value)
    (out / "dose.nii.gz").unlink()
    with pytest.raises(DataError, match="dose.nii.gz"):
        read_nifti_folder(out)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda img: img.SetSpacing((1.0, 1.171875, 2.5)), "spacing_mm"),
        (lambda img: img.SetOrigin((0.0, 0.0, 0.0)), "origin_mm"),
        (lambda img: img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
    ],
)
def test_structure_geometry_must_match_ct(tmp_path: Path, change, field: str) -> None:
    out = write_nifti_folder(tiny_case(), tmp_path / "case")
    file = out / "structures" / "SpinalCord.nii.gz"
    img = sitk.ReadImage(str(file))
    change(img)
    sitk.WriteImage(img, str(file))
    with pytest.raises(DataError, match=field) as err:
        read_nifti_folder(out)
    assert "SpinalCord.nii.gz" in str(err.value)


def test_structure_size_must_match_ct(tmp_path: Path) -> None:
    out = write_nifti_folder(tiny_case(), tmp_path / "case")
    file = out / "structures" / "PTV70.nii.gz"
    small = sitk.ReadImage(str(file))[:, :, :4]
    sitk.WriteImage(small, str(file))
    with pytest.raises(DataError, match=r"PTV70\.nii\.gz.*size"):
        read_nifti_folder(out)


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\.png.*valid"):
        write_case(tiny_case(), tmp_path / "case", ext=".png")
    assert not (tmp_path / "case").exists()
    out = write_nifti_folder(tiny_case(), tmp_path / "ok")
    doc = json.loads((out / "case.json").read_text())
    doc["image_ext"] = ".tif"
    (out / "case.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"\.tif"):
        read_nifti_folder(out)


def test_bad_case_json_fields(tmp_path: Path) -> None:
    out = write_nifti_folder(tiny_case(), tmp_path / "case")
    doc = json.loads((out / "case.json").read_text())
    (out / "case.json").write_text(json.dumps({**doc, "prescriptions": [{"target": "PTV70"}]}))
    with pytest.raises(DataError, match=r"prescriptions\[0\]"):
        read_nifti_folder(out)
    (out / "case.json").write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(DataError, match="format_version"):
        read_nifti_folder(out)
    (out / "case.json").write_text("{not json")
    with pytest.raises(DataError, match="JSON"):
        read_nifti_folder(out)


def test_replaces_a_case_folder_but_refuses_other_folders(tmp_path: Path) -> None:
    case = tiny_case()
    out = write_nifti_folder(case, tmp_path / "case")
    case.case_id = "renamed"
    assert read_nifti_folder(write_nifti_folder(case, out)).case_id == "renamed"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        write_nifti_folder(case, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    original, calls = sitk.WriteImage, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(nifti.sitk, "WriteImage", failing)
    with pytest.raises(DataError, match=r"case: could not be written \(disk full\)"):
        write_nifti_folder(tiny_case(), tmp_path / "case")
    assert list(tmp_path.iterdir()) == []


def test_unstorable_meta_is_refused(tmp_path: Path) -> None:
    case = tiny_case()
    case.meta["callback"] = object()
    with pytest.raises(DataError, match=r"meta\.callback"):
        write_nifti_folder(case, tmp_path / "case")
    assert not (tmp_path / "case").exists()


def test_write_image_and_read_it_back_on_the_grid_or_resampled(tmp_path):
    from dosegym.data.nifti import read_image_on_grid, write_image

    grid = Grid((6, 8, 10), (2.5, 2.0, 2.0), (-5.0, 3.0, 7.0))
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    dose = (1.0 * z + 0.5 * y + 0.25 * x).astype(np.float32)
    for ext in (".nii.gz", ".mha", ".nrrd"):
        path = write_image(dose, grid, tmp_path / f"dose{ext}")
        back, resampled = read_image_on_grid(path, grid)
        assert not resampled and np.array_equal(back, dose)
    # a grid shifted by one voxel along x: linear resampling reproduces the linear field inside
    shifted = Grid(grid.shape, grid.spacing_mm, (-5.0, 3.0, 9.0))
    back, resampled = read_image_on_grid(tmp_path / "dose.nii.gz", shifted)
    assert resampled and np.allclose(back[:, :, :-1], dose[:, :, 1:], atol=1e-5)
    assert not list(tmp_path.glob("*.partial*"))
    with pytest.raises(DataError, match="unknown image extension"):
        write_image(dose, grid, tmp_path / "dose.png")
    with pytest.raises(DataError, match="does not match the grid"):
        write_image(dose[:-1], grid, tmp_path / "bad.nii.gz")
