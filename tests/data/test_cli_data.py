"""``dosegym data info`` / ``convert`` through the real CLI app, on real and fixture cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shared_data import PT_201, needs
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import read_case
from dosegym.data.gdphmm import write_gdphmm
from dosegym.data.nifti import write_nifti_folder

PATIENT = PT_201
needs_patient = needs(PATIENT)
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def words(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def patient():
    return read_case(PATIENT)


@needs_patient
def test_info_openkbp(patient) -> None:
    result = run("data", "info", str(PATIENT))
    assert result.exit_code == 0, result.output
    assert "pt_201" in result.output and "(128, 128, 128)" in result.output
    assert "PTV70" in result.output and "70 / 35" in result.output
    summary = json.loads(run("data", "info", str(PATIENT), "--json").output)
    assert summary["format"] == "openkbp"
    assert summary["structures"]["PTV70"] == pytest.approx(patient.volume_cc("PTV70"), abs=1e-3)
    assert len(summary["beams"]["gantry_deg"]) == 9


@needs_patient
def test_info_gdphmm_needs_trust_and_reads_prescriptions(tmp_path: Path, patient) -> None:
    plan = write_gdphmm(patient, tmp_path / "HNC_201+9Ag+MOS_1.npz")
    table = {
        "HNC_201": {
            "PTV_High": {"OPTName": "PTV70", "PDose": 70},
            "PTV_Low": {"OPTName": "PTV56OPT", "StructName": "PTV56", "PDose": 56},
        }
    }
    (tmp_path / "PTV_DICT.json").write_text(json.dumps(table))
    refused = run("data", "info", str(plan))
    assert refused.exit_code == 2
    assert "pickled Python dict" in words(refused) and "--trusted" in words(refused)
    result = run(
        "data",
        "info",
        str(plan),
        "--trusted",
        "--prescriptions",
        str(tmp_path / "PTV_DICT.json"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "gdphmm"
    assert summary["prescriptions"] == [
        {"target": "PTV70", "dose_gy": 70.0, "fractions": 35},
        {"target": "PTV56", "dose_gy": 56.0, "fractions": 35},
    ]
    assert summary["dose_gy"]["max"] == pytest.approx(float(patient.dose.max()), abs=1e-4)


@needs_patient
def test_info_nifti_folder(tmp_path: Path, patient) -> None:
    folder = write_nifti_folder(patient, tmp_path / "pt_201", ext=".nrrd")
    result = run("data", "info", str(folder), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "nifti" and summary["case_id"] == "pt_201"
    assert summary["grid"] == patient.grid.to_dict()


@needs_patient
@pytest.mark.parametrize("ext", [".nii.gz", ".mha"])
def test_convert_to_nifti(tmp_path: Path, patient, ext: str) -> None:
    out = tmp_path / "converted"
    result = run("data", "convert", str(PATIENT), str(out), "--ext", ext)
    assert result.exit_code == 0, result.output
    assert (out / f"ct{ext}").is_file() and (out / "structures" / f"PTV70{ext}").is_file()
    back = read_case(out)
    assert np.array_equal(back.dose, patient.dose) and np.array_equal(back.ct, patient.ct)
    assert back.prescriptions == patient.prescriptions


def test_convert_bad_extension_and_missing_input(tmp_path: Path) -> None:
    result = run("data", "info", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "no such file or folder" in words(result)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "case.json").write_text("{}")
    result = run("data", "convert", str(folder), str(tmp_path / "out"), "--ext", ".png")
    assert result.exit_code == 2 and "'.png' is not supported" in words(result)


@pytest.mark.parametrize("command", [[], ["info"], ["convert"], ["phantoms"]])
def test_help(command: list[str]) -> None:
    result = run("data", *command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
