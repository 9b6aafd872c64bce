"""Issue 15, rules 2 and 3: a damaged, non-finite or misplaced image is an error, never a
smaller dose. Real OpenKBP patient pt_108, written as images and then damaged here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import PT_108, need
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import Grid, read_case
from dosegym.data.nifti import (
    COVER_BODY,
    COVER_TARGET,
    read_checked_image,
    read_image_on_grid,
    read_nifti_voxels,
    write_nifti_folder,
)
from dosegym.errors import DataError

EXTS = (".nii.gz", ".nii", ".mha", ".nrrd")


@pytest.fixture(scope="module")
def case():
    return read_case(need(PT_108))


def write(array: np.ndarray, grid: Grid, path: Path, compress: bool = True) -> Path:
    """``array`` (z, y, x) on ``grid`` as an image file, by SimpleITK directly."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(reversed(grid.spacing_mm)))
    img.SetOrigin(tuple(reversed(grid.origin_mm)))
    sitk.WriteImage(img, str(path), compress)
    return path


def cover(case) -> list[tuple[str, np.ndarray, float]]:
    return [(t, case.structures[t], COVER_TARGET) for t in case.targets] + [
        ("the body", case.body, COVER_BODY)
    ]


def score(case, dose: Path, tmp_path: Path):
    out = tmp_path / "score.json"
    args = ["score", "--case", PT_108, "--card", "headneck_rtog", "--dose", dose, "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split()), out


def test_truncated_images_are_refused(case, tmp_path: Path) -> None:
    for ext in EXTS:
        full = write(case.dose, case.grid, tmp_path / f"dose{ext}", compress=ext != ".nii")
        data = full.read_bytes()
        cut = tmp_path / f"cut{ext}"
        cut.write_bytes(data[: int(len(data) * 0.6)])
        with pytest.raises(DataError, match=re.escape(str(cut))):
            read_image_on_grid(cut, case.grid)
    # NIfTI: SimpleITK reads a short file as zeros; we say how many bytes are missing
    for ext in (".nii.gz", ".nii"):
        cut = tmp_path / f"cut{ext}"
        with pytest.raises(
            DataError, match=r"truncated: the header declares \(128, 128, 128\).* = 8388608 bytes"
        ):
            read_nifti_voxels(cut)
        result, text, out = score(case, cut, tmp_path)
        assert result.exit_code == 2 and "truncated" in text and str(cut) in text, text
        assert not out.exists()


def test_truncated_image_in_a_case_folder(case, tmp_path: Path) -> None:
    folder = write_nifti_folder(dataclasses.replace(case, ct=None), tmp_path / "case")
    dose = folder / "dose.nii.gz"
    dose.write_bytes(dose.read_bytes()[:-5000])
    with pytest.raises(DataError, match=re.escape(f"{dose}: truncated")):
        read_case(folder)


def test_flipped_bytes_in_compressed_images_are_refused(case, tmp_path: Path) -> None:
    """ITK reads damaged deflate data without an error (NIfTI, MetaImage) and returns garbage."""
    for ext in (".nii.gz", ".mha", ".nrrd"):
        path = write(case.dose, case.grid, tmp_path / f"dose{ext}")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(DataError, match=re.escape(f"{path}: damaged")):
            read_image_on_grid(path, case.grid)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_in_every_format(case, tmp_path: Path, bad: float) -> None:
    dose = case.dose.copy()
    dose[60, 61, 62] = bad
    for ext in EXTS:
        path = write(dose, case.grid, tmp_path / f"dose{ext}", compress=ext != ".nii")
        with pytest.raises(
            DataError, match=re.escape(f"{path}: 1 voxels are NaN or infinite, the first at index")
        ):
            read_image_on_grid(path, case.grid)
    # SimpleITK's NIfTI reader gives 0 Gy there: `score --dose` must refuse, not score it
    result, text, out = score(case, tmp_path / "dose.nii.gz", tmp_path)
    assert result.exit_code == 2 and "(60, 61, 62)" in text and not out.exists(), text


def test_non_finite_mask_in_a_case_folder(case, tmp_path: Path) -> None:
    folder = write_nifti_folder(dataclasses.replace(case, ct=None), tmp_path / "case")
    mask = case.structures["PTV70"].astype(np.float32)
    mask[0, 0, 0] = np.nan  # astype(bool) would make it a PTV voxel
    path = write(mask, case.grid, folder / "structures" / "PTV70.nii.gz")
    with pytest.raises(DataError, match=re.escape(f"{path}: 1 voxels are NaN")):
        read_case(folder)


def test_misplaced_dose_images_are_refused(case, tmp_path: Path) -> None:
    g = case.grid
    far = Grid(g.shape, g.spacing_mm, tuple(o + 10_000.0 for o in g.origin_mm))  # 10 m away
    coarse = Grid(g.shape, tuple(10 * s for s in g.spacing_mm), g.origin_mm)  # spacing x 10
    for name, grid in (("far", far), ("coarse", coarse)):
        path = write(case.dose, grid, tmp_path / f"{name}.nii.gz")
        with pytest.raises(DataError, match=r"cover only 0\.0 % of PTV70 \(needs 99 %\).* lies at z \["):
            read_image_on_grid(path, g, dose=True, cover=cover(case))
        result, text, out = score(case, path, tmp_path)
        assert result.exit_code == 2 and "cover only" in text and not out.exists(), text
    # a dose 2 mm off the case grid is resampled and scored
    near = Grid(g.shape, g.spacing_mm, tuple(o + 2.0 for o in g.origin_mm))
    path = write(case.dose, near, tmp_path / "near.nii.gz")
    dose, resampled = read_image_on_grid(path, g, dose=True, cover=cover(case))
    assert resampled and dose[case.structures["PTV70"]].mean() > 65
    result, text, out = score(case, path, tmp_path)
    assert result.exit_code == 0 and "resampled" in text and out.is_file(), text


def test_integer_dose_image_is_refused(case, tmp_path: Path) -> None:
    path = write(np.round(case.dose * 100).astype(np.int32), case.grid, tmp_path / "dose_cgy.nii.gz")
    result, text, out = score(case, path, tmp_path)
    assert result.exit_code == 2 and "integer dtype int32" in text and "looks like cGy" in text, text


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.int32])
def test_nifti_read_with_numpy_equals_simpleitk_on_sound_files(tmp_path: Path, dtype) -> None:
    """Where nothing is wrong, our NIfTI voxels and geometry are SimpleITK's own."""
    rng = np.random.default_rng(0)
    arr = (rng.random((5, 6, 7)) * 100).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 2.0, 3.0))
    img.SetOrigin((-10.0, 5.0, 7.5))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0))  # flipped and swapped axes
    for ext in (".nii.gz", ".nii"):
        path = tmp_path / f"img{ext}"
        sitk.WriteImage(img, str(path), ext != ".nii")
        ours, arr_ours = read_checked_image(path)
        theirs = sitk.ReadImage(str(path))
        assert np.array_equal(arr_ours, sitk.GetArrayFromImage(theirs)) and arr_ours.dtype == arr.dtype
        for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection", "GetPixelID"):
            assert getattr(ours, get)() == getattr(theirs, get)(), get


def test_nifti_scaling_is_applied_like_simpleitk(tmp_path: Path) -> None:
    path = tmp_path / "scaled.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)), str(path), False)
    data = bytearray(path.read_bytes())
    data[112:120] = np.array([0.5, 10.0], "<f4").tobytes()  # scl_slope, scl_inter
    path.write_bytes(bytes(data))
    img, arr = read_checked_image(path)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert arr.dtype == theirs.dtype and np.allclose(arr, theirs) and arr[0, 0, 1] == 10.5
