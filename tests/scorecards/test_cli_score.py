"""``dosegym score`` through the real CLI app."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from shared_data import PROSTATE_JSON, PT_108, needs
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data.phantoms import generate_anatomy, write_phantom
from dosegym.scorecards import ScoreReport

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def words(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def lung(tmp_path_factory):
    """A lung phantom with a crude plan, written as a phantom .npz; and its dose."""
    case = generate_anatomy("lung", index=0)
    ptv = case.structures["PTV60"]
    dist = ndimage.distance_transform_edt(~ptv, sampling=case.grid.spacing_mm)
    dose = (61.0 * np.exp(-dist / 10.0) * case.body).astype(np.float32)
    path = tmp_path_factory.mktemp("lung") / "lung.npz"
    write_phantom(dataclasses.replace(case, dose=dose), path)
    return path, case, dose


def test_help_lists_the_options():
    result = run("score", "--help")
    assert result.exit_code == 0
    for opt in ("--case", "--card", "--dose", "--out", "--validate"):
        assert opt in result.output


def test_score_writes_the_report_next_to_the_working_dir(lung, tmp_path, monkeypatch):
    path, case, _ = lung
    monkeypatch.chdir(tmp_path)
    result = run("score", "--case", path, "--card", "phantom_lung")
    assert result.exit_code == 0, result.output
    out = tmp_path / f"score_{case.case_id}.json"
    assert f"report written to {out}" in words(result)
    report = ScoreReport.from_json(out)
    assert report.card.startswith("Phantom lung") and len(report.items) == 8
    assert "PTV60" in result.output and "V20Gy [%]" in result.output and "total" in result.output


def test_dose_files_npy_and_images(lung, tmp_path):
    path, case, dose = lung
    ref = run("score", "--case", path, "--card", "phantom_lung", "--out", tmp_path / "a.json")
    assert ref.exit_code == 0, ref.output
    base = ScoreReport.from_json(tmp_path / "a.json")
    np.save(tmp_path / "half.npy", dose * 0.5)
    half = run(
        "score",
        "--case",
        path,
        "--card",
        "phantom_lung",
        "--dose",
        tmp_path / "half.npy",
        "--out",
        tmp_path / "b.json",
    )
    assert half.exit_code == 0, half.output
    assert ScoreReport.from_json(tmp_path / "b.json").total < base.total
    # an image on the case grid scores like the array it holds
    g = case.grid
    img = sitk.GetImageFromArray(dose)
    img.SetSpacing(tuple(reversed(g.spacing_mm)))
    img.SetOrigin(tuple(reversed(g.origin_mm)))
    sitk.WriteImage(img, str(tmp_path / "dose.nii.gz"))
    same = run(
        "score",
        "--case",
        path,
        "--card",
        "phantom_lung",
        "--dose",
        tmp_path / "dose.nii.gz",
        "--out",
        tmp_path / "c.json",
    )
    assert same.exit_code == 0, same.output
    assert ScoreReport.from_json(tmp_path / "c.json").total == pytest.approx(base.total, abs=1e-3)
    # an image on another grid is resampled onto the case grid
    img.SetOrigin(tuple(v + 0.5 for v in reversed(g.origin_mm)))
    sitk.WriteImage(img, str(tmp_path / "shifted.mha"))
    moved = run(
        "score",
        "--case",
        path,
        "--card",
        "phantom_lung",
        "--dose",
        tmp_path / "shifted.mha",
        "--out",
        tmp_path / "d.json",
    )
    assert moved.exit_code == 0, moved.output
    assert "resampled" in moved.output
    np.save(tmp_path / "wrong.npy", np.zeros((4, 4, 4), np.float32))
    wrong = run("score", "--case", path, "--card", "phantom_lung", "--dose", tmp_path / "wrong.npy")
    assert wrong.exit_code == 2 and "does not match the case grid" in words(wrong)


@needs(PT_108)
def test_score_a_real_openkbp_case(tmp_path):
    result = run("score", "--case", PT_108, "--card", "headneck_rtog", "--out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = ScoreReport.from_json(tmp_path / "r.json")
    assert report.normalised > 0.9 and [r.structure for r in report.unmatched] == ["Mandible"]


def test_errors_are_friendly(lung, tmp_path):
    path, _, _ = lung
    result = run("score", "--case", path, "--card", "no_such_card")
    assert result.exit_code == 2 and "unknown scorecard 'no_such_card'" in words(result)
    result = run("score", "--case", path, "--card", "prostate", "--out", tmp_path / "x.json")
    assert result.exit_code == 2 and "matches nothing" in words(result)
    result = run(
        "score", "--case", path, "--card", "prostate", "--allow-unmatched", "--out", tmp_path / "x.json"
    )
    assert result.exit_code == 0 and "unmatched" in result.output
    result = run("score")
    assert result.exit_code == 2 and "give --case and --card" in words(result)


def test_validate_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nprescription_gy: 70\nfractions: 35\nitems:\n"
        "  - {structure: PTV70, metric: D95, points: [[1, 0], [2, 1]]}\n"
        "  - {structure: PTV70, metric: DoseAtVolume, value: 120, input_unit: '%',"
        " output_unit: Gy, points: [[66, 0], [70, 10]]}\n"
        "  - {structure: Cord, metric: VolumeAtDose, value: -5, input_unit: Gy,"
        " output_unit: '%', points: [[1, 0], [2, 5], [3, 0]]}\n"
        "  - {structure: Cord, metric: MeanDose, points: [[1, 0], [1, 5]]}\n"
    )
    result = run("score", "--validate", bad)
    assert result.exit_code == 1
    text = words(result)
    assert "6 problem(s)" in text
    for needle in (
        "item 0 ('PTV70', D95): metric: unknown metric 'D95'",
        "item 1 ('PTV70', DoseAtVolume): metric: DoseAtVolume: volume 120 %",
        "item 2 ('Cord', VolumeAtDose): points: scores must be monotone",
        "item 2 ('Cord', VolumeAtDose): metric: VolumeAtDose: dose -5 Gy",
        "item 3 ('Cord', MeanDose): points: x must be strictly increasing",
        "item 3 ('Cord', MeanDose): metric: MeanDose: output_unit is missing",
    ):
        assert needle in text
    good = run("score", "--validate", "headneck_rtog")
    assert good.exit_code == 0 and "OK" in good.output


@needs(PROSTATE_JSON)
def test_validate_maas_json_and_unsupported_recipes(tmp_path):
    result = run("score", "--validate", PROSTATE_JSON)
    assert result.exit_code == 0 and "36 items, maximum 246 points" in words(result)
    text = PROSTATE_JSON.read_text().replace("{<PTV>|20} SUB {<PTV>|5}", "{<PTV>|5^5^5^5^5^20}")
    (tmp_path / "asym.json").write_text(text)
    result = run("score", "--validate", tmp_path / "asym.json")
    assert result.exit_code == 1
    assert "item 33 ('PTV Ring'" in words(result) and "not supported" in words(result)
