"""DICOM RT plans without their full CT (issue 15, rule 8): read and scored on the RTDOSE grid.

The analytic set of ``dicom_fixtures`` gets an RTDOSE on ``FINE``: the CT's 2.5 mm slice
planes, 2 x 2 mm pixels (the CT's are 2 x 1.8 mm), covering every structure but the body.
Read with its CT, then without it (or with one slice), the structures come from the same
contours on the same planes; only the in-plane pixels differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import CT_GRID, SPHERE_RADIUS, dose_gy, patient_mm, write_test_set
from shared_data import PT_108, need
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import Case, Grid, read_case
from dosegym.data.dicom import read_dicom, write_dicom_case, write_rtdose, write_rtstruct
from dosegym.errors import DataError
from dosegym.scorecards import Scorecard, load_card

FINE = Grid((20, 30, 30), (2.5, 2.0, 2.0), (-25.0, -31.0, -30.0))
CARD = """\
name: analytic test card
prescription_gy: 60
fractions: 30
items:
  - structure: PTV_60
    metric: DoseAtVolume
    value: 95
    input_unit: "%"
    output_unit: Gy
    points: [{x: 30, score: 0}, {x: 50, score: 10}]
  - structure: Ring
    metric: MeanDose
    output_unit: Gy
    points: [{x: 45, score: 0}, {x: 30, score: 5}]
"""
runner = CliRunner()


def _write_dose(folder: Path, grid: Grid, ct_folder: Path | None = None, scale: float = 1.0) -> None:
    """The linear test dose (times ``scale``) on ``grid`` as ``folder/RD.dcm``, referencing the CT
    in ``ct_folder`` (default ``folder``)."""
    dose = scale * dose_gy(*patient_mm(grid))
    write_rtdose(dose, grid, folder / "RD.dcm", ct_folder=ct_folder or folder)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The analytic set with its full CT and the RTDOSE on ``FINE``."""
    folder = write_test_set(tmp_path_factory.mktemp("noct") / "full")
    _write_dose(folder, FINE)
    return folder


def _variant(full: Path, dest: Path, keep_ct: int | None = None) -> Path:
    """A copy of ``full`` with no CT slices, or only CT slice number ``keep_ct``."""
    folder = Path(shutil.copytree(full, dest))
    for p in folder.glob("CT.*.dcm"):
        if keep_ct is None or p.name != f"CT.{keep_ct:04d}.dcm":
            p.unlink()
    return folder


@pytest.fixture(scope="module")
def no_ct(full, tmp_path_factory) -> Path:
    return _variant(full, tmp_path_factory.mktemp("noct") / "plan")


@pytest.fixture(scope="module")
def with_ct(full) -> Case:
    return read_dicom(full)


@pytest.fixture(scope="module")
def on_dose(no_ct) -> Case:
    return read_dicom(no_ct)


def occupied_cc(case: Case, name: str) -> float:
    return float(case.occupancy[name].sum()) * case.voxel_volume_cc


def test_without_ct_the_case_is_read_on_the_dose_grid(with_ct, on_dose):
    assert with_ct.meta["grid_source"] == "ct" and with_ct.grid == CT_GRID
    assert on_dose.ct is None and on_dose.grid == FINE
    assert on_dose.meta["grid_source"] == "rtdose"
    assert on_dose.meta["grid_reason"].startswith(f"{on_dose.source}: no CT image series;")
    assert on_dose.meta["dicom"]["contour_slab_mm"] == pytest.approx(2.5)  # the contours' plane gap
    assert set(on_dose.structures) == set(with_ct.structures) == {"PTV_60", "Ring", "Box"}
    assert on_dose.prescriptions == with_ct.prescriptions and on_dose.beams == with_ct.beams
    # The same planes and the same fill rule: occupancy volumes differ only by the in-plane
    # supersampling (4 scanlines per row, exact along them) on 2 vs 1.8 mm pixels: < 1 %.
    # Masks (occupancy >= 0.5) move whole boundary voxels: within 4 % for these small shapes.
    for name in with_ct.structures:
        assert occupied_cc(on_dose, name) == pytest.approx(occupied_cc(with_ct, name), rel=0.01), name
        assert on_dose.volume_cc(name) == pytest.approx(with_ct.volume_cc(name), rel=0.04), name
    sphere_cc = 4.0 / 3.0 * np.pi * SPHERE_RADIUS**3 / 1000.0  # end-capped 2.5 mm slabs: within 2 %
    assert on_dose.volume_cc("PTV_60") == pytest.approx(sphere_cc, rel=0.02)
    # the dose is the RTDOSE itself, not resampled (only the 32-bit quantisation is left)
    assert np.abs(on_dose.dose - dose_gy(*patient_mm(FINE))).max() < 1e-5
    mean_ct = with_ct.dose[with_ct.structures["PTV_60"]].mean()
    assert on_dose.dose[on_dose.structures["PTV_60"]].mean() == pytest.approx(mean_ct, abs=0.05)
    # the body runs beyond the dose grid: cut to it, with a note; the UIDs come from the RTSTRUCT
    assert 0.0 < on_dose.meta["dicom"]["outside_dose_grid"]["Body"] < 0.5
    assert any("cut to the RTDOSE grid" in n for n in on_dose.meta["notes"])
    assert on_dose.meta["dicom"]["patient"] == with_ct.meta["dicom"]["patient"]
    assert on_dose.meta["dicom"]["frame_of_reference_uid"] == with_ct.meta["dicom"]["frame_of_reference_uid"]


def test_a_single_ct_slice_gives_the_dose_grid(full, on_dose, tmp_path):
    folder = _variant(full, tmp_path / "one", keep_ct=12)
    case = read_dicom(folder)
    assert case.ct is None and case.grid == FINE and case.meta["grid_source"] == "rtdose"
    assert "(CT series): 1 slice (" in case.meta["grid_reason"] and "do not hold" in case.meta["grid_reason"]
    for name in on_dose.structures:
        assert np.array_equal(case.structures[name], on_dose.structures[name]), name
    with pytest.raises(DataError, match=r"ROI 'Box' .*entirely outside"):  # grid="ct": the slice only
        read_dicom(folder, grid="ct")


def test_a_few_ct_slices_give_the_dose_grid_and_a_full_ct_its_own(full, on_dose, tmp_path):
    folder = Path(shutil.copytree(full, tmp_path / "few"))
    for p in sorted(folder.glob("CT.*.dcm"))[8:]:
        p.unlink()
    case = read_dicom(folder)
    assert case.ct is None and case.meta["grid_source"] == "rtdose"
    assert "(CT series): 8 slices (" in case.meta["grid_reason"]
    assert case.volume_cc("PTV_60") == pytest.approx(on_dose.volume_cc("PTV_60"))
    dose_grid = read_dicom(full, grid="dose")  # explicit: the full CT resampled onto the dose grid
    assert dose_grid.grid == FINE and dose_grid.ct is not None and dose_grid.meta["grid_source"] == "rtdose"


def test_a_ct_with_a_missing_slice_falls_back_to_the_dose_grid(full, tmp_path):
    folder = Path(shutil.copytree(full, tmp_path / "gap"))
    (folder / "CT.0010.dcm").unlink()
    case = read_dicom(folder)
    assert case.ct is None and "CT.0011.dcm" in case.meta["grid_reason"]
    with pytest.raises(DataError, match=r"CT\.0011\.dcm: .*not equally spaced.*slice may be missing"):
        read_dicom(folder, grid="ct")


def test_non_uniform_frame_offsets_are_resampled(no_ct):
    ds = pydicom.dcmread(no_ct / "RD.dcm")
    keep = [k for k in range(FINE.shape[0]) if k not in (5, 6, 12)]  # gaps of 7.5 and 5 mm
    pixels = ds.pixel_array[keep]
    ds.PixelData, ds.NumberOfFrames = pixels.tobytes(), len(keep)
    ds.GridFrameOffsetVector = [float(ds.GridFrameOffsetVector[k]) for k in keep]
    folder = no_ct.parent / "uneven"
    shutil.copytree(no_ct, folder)
    ds.save_as(folder / "RD.dcm")
    case = read_dicom(folder)
    assert case.grid.shape[0] == FINE.shape[0] and case.grid.spacing_mm[0] == pytest.approx(2.5)
    assert any("GridFrameOffsetVector is not uniform" in n for n in case.meta["notes"])
    assert np.abs(case.dose - dose_gy(*patient_mm(case.grid))).max() < 1e-4  # linear: exact


def test_dose_grid_that_misses_structures(full, no_ct, tmp_path):
    folder = Path(shutil.copytree(no_ct, tmp_path / "narrow"))
    _write_dose(folder, Grid((20, 30, 16), (2.5, 2.0, 2.0), (-25.0, -31.0, -4.0)), full)  # x >= -5 mm
    case = read_dicom(folder)  # Ring and Box lie at x < -5 mm: left out, said so
    assert set(case.structures) == {"PTV_60"} and case.meta["dicom"]["rois_outside_grid"] == ["Ring", "Box"]
    assert any("wholly outside the RTDOSE grid" in n for n in case.meta["notes"])
    _write_dose(folder, Grid((20, 30, 30), (2.5, 2.0, 2.0), (-2.5, -31.0, -30.0)), full)  # z >= -3.75 mm
    with pytest.raises(DataError, match=r"ROI 'PTV_60' is a target and .* outside the RTDOSE grid"):
        read_dicom(folder)


def test_a_target_outside_the_dose_grid_is_refused_on_the_ct_grid_too(full, tmp_path):
    folder = Path(shutil.copytree(full, tmp_path / "cut"))
    _write_dose(folder, Grid((20, 30, 30), (2.5, 2.0, 2.0), (-2.5, -31.0, -30.0)))
    with pytest.raises(DataError, match=r"ROI 'PTV_60' is a target and .* outside the RTDOSE grid"):
        read_dicom(folder)


def test_a_structure_cut_at_the_ct_edge_is_noted(full, tmp_path):
    folder = Path(shutil.copytree(full, tmp_path / "edge"))
    square = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 40.0], [0.0, 40.0, 40.0], [0.0, 40.0, 0.0]])
    write_rtstruct({"Edge": [square + [0.0, -20.0, 10.0]]}, folder / "RS.dcm", ct_folder=folder)
    case = read_dicom(folder)  # x from 10 to 50 mm; the CT's last voxel ends at x = 27.7 mm
    assert case.meta["grid_source"] == "ct" and "Edge" not in case.meta["dicom"]["outside_dose_grid"]
    assert case.meta["dicom"]["clipped_to_grid"]["Edge"] == pytest.approx(1 - 17.7 / 40, abs=0.01)
    assert any("cut at the edge of the CT grid" in n for n in case.meta["notes"])


def test_dose_summation_types(full, no_ct, tmp_path):
    folder = Path(shutil.copytree(no_ct, tmp_path / "fraction"))
    _write_dose(folder, FINE, full, scale=1 / 30)
    ds = pydicom.dcmread(folder / "RD.dcm")
    ds.DoseSummationType = "FRACTION"
    ds.save_as(folder / "RD.dcm")
    case = read_dicom(folder)  # one fraction of the RTPLAN's 30
    assert np.abs(case.dose - dose_gy(*patient_mm(FINE))).max() < 1e-4
    assert any("FRACTION" in n for n in case.meta["notes"])
    (folder / "RP.dcm").unlink()
    with pytest.raises(DataError, match=r"RD\.dcm: DoseSummationType FRACTION .*no RTPLAN"):
        read_dicom(folder)
    ds.DoseSummationType = "BEAM"  # one beam's dose: the total only when the plan has one beam
    ds.save_as(folder / "RD.dcm")
    assert any("sum of 1 BEAM dose" in n for n in read_dicom(folder).meta["notes"])
    shutil.copy(no_ct / "RP.dcm", folder)
    with pytest.raises(DataError, match=r"1 BEAM dose\(s\) \(RD\.dcm\) for the 5 treatment beams of RP\.dcm"):
        read_dicom(folder)
    ds.DoseSummationType = "CONTROL_POINT"
    ds.save_as(folder / "RD.dcm")
    with pytest.raises(DataError, match=r"RD\.dcm: DoseSummationType 'CONTROL_POINT' .*valid: PLAN"):
        read_dicom(folder)


def test_rtstruct_alone_is_refused(no_ct, tmp_path):
    folder = Path(shutil.copytree(no_ct, tmp_path / "rs"))
    (folder / "RD.dcm").unlink()
    with pytest.raises(DataError, match=r"missing CT: no CT .* and no RTDOSE found beside RP\.dcm, RS\.dcm"):
        read_dicom(folder)
    (folder / "RP.dcm").unlink()
    with pytest.raises(DataError, match=r"missing CT.*RS\.dcm.*or an RTDOSE"):
        read_case(folder)


def test_data_info_names_the_grid(no_ct):
    result = runner.invoke(app, ["data", "info", str(no_ct)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"grid source: rtdose ({no_ct}: no CT image series; read on the grid of RD.dcm" in text
    assert "CT none" in text
    assert "PTV_60" in text and "60 / 30" in text
    summary = json.loads(runner.invoke(app, ["data", "info", str(no_ct), "--json"]).output)
    assert summary["grid_source"] == "rtdose" and summary["ct_hu"] is None
    assert summary["grid"]["shape"] == list(FINE.shape) and summary["notes"]


def test_score_scores_it(no_ct, on_dose, with_ct, tmp_path):
    card_path = tmp_path / "card.yaml"
    card_path.write_text(CARD)
    out = tmp_path / "score.json"
    result = runner.invoke(app, ["score", "--case", str(no_ct), "--card", str(card_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    expected = Scorecard.from_yaml(card_path).score(on_dose, on_dose.dose)
    assert report["total"] == pytest.approx(expected.total)
    # and on the CT grid (the same RTDOSE resampled trilinearly): the same points within 2 %
    on_ct = Scorecard.from_yaml(card_path).score(with_ct, with_ct.dose)
    assert expected.total == pytest.approx(on_ct.total, rel=0.02)


def test_a_real_plan_without_ct_scores_as_with_it(tmp_path):
    """pt_108 as DICOM (its RTDOSE on the CT grid): without the CT, the same case and score."""
    full = write_dicom_case(read_case(need(PT_108)), tmp_path / "full")
    with_ct = read_dicom(full)
    plan = _variant(full, tmp_path / "plan")
    case = read_dicom(plan)
    assert case.ct is None and case.meta["grid_source"] == "rtdose" and case.grid == with_ct.grid
    assert set(case.structures) == set(with_ct.structures) and np.array_equal(case.body, with_ct.body)
    for name in case.structures:
        assert np.array_equal(case.occupancy[name], with_ct.occupancy[name]), name
    assert np.array_equal(case.dose, with_ct.dose) and case.prescriptions == with_ct.prescriptions
    card = load_card("headneck_rtog")
    assert card.score(case).total == pytest.approx(card.score(with_ct).total, abs=1e-9)
