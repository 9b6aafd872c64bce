"""``dosegym demo`` and ``dosegym report`` end to end on a tiny model: the summary, the run
folder, the report's numbers and pictures, reproducibility, ``--force`` and bad input."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_checkpoint
from shared_data import LUNG_JSON, TRAIN_PATS, need
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import read_case
from dosegym.report.content import per_case_rows
from dosegym.report.saved import file_name, read_dose, saved_cases, write_doses

runner = CliRunner()
CONFIG = {"agent": "ppo_guided", "samples_per_iteration": 2, "sample_num_steps": 2, "guidance_scale": 1.0,
          "batch_size": 4, "n_epochs": 2}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    cases = root / "cases"
    cases.mkdir()
    phantoms = Path(str(files("dosegym") / "assets" / "phantoms" / "headneck"))
    for name in ("headneck_000.npz", "headneck_028.npz"):  # the first aligned on, the last shown
        shutil.copy(phantoms / name, cases / name)
    cfg = root / "c.yaml"
    cfg.write_text(json.dumps(CONFIG))  # JSON is YAML
    return {"root": root, "cases": cases, "config": cfg, "checkpoint": save_tiny_checkpoint(root / "tiny")}


def demo(setup, out: Path, *extra: str):
    args = ["demo", "--checkpoint", str(setup["checkpoint"]), "--config", str(setup["config"]),
            "--cases", str(setup["cases"]), "--samples", "4", "--out", str(out), "--no-progress",
            *extra]  # fmt: skip
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def first_run(setup) -> Path:
    out = setup["root"] / "run1"
    r = demo(setup, out)
    assert r.exit_code == 0, r.output
    assert "headneck_028" in r.output and "mean normalised score" in r.output and "report.html" in r.output
    return out


def test_demo_writes_a_run_folder_and_a_report(first_run):
    result = json.loads((first_run / "result.json").read_text())
    assert result["agent"] == "ppo_guided" and result["samples_trained"] == 4
    assert result["train_cases"] == [str(first_run.parent / "cases" / "headneck_000.npz")]
    assert [e["samples"] for e in result["eval_history"]] == [0, 4]  # before and after only
    report = json.loads((first_run / "report.json").read_text())
    assert report["per_case"] == per_case_rows(result)
    (case,) = report["cases"]
    assert case["case_id"] == "headneck_028" and set(case["scores"]) == {"before", "after", "reference"}
    after = result["after"]["cases"][0]
    assert case["scores"]["after"]["total"] == pytest.approx(
        after["points"]
    )  # the report scores as align did
    assert case["mae_gy"]["after"] == pytest.approx(after["mae_gy"], rel=1e-5)
    assert {"PTV70", "SpinalCord"} <= set(case["dvh"])
    ptv = case["dvh"]["PTV70"]["reference"]
    assert ptv["volume_pct"][0] == pytest.approx(100.0) and np.all(np.diff(ptv["volume_pct"]) <= 1e-9)
    html = (first_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 + 2  # run curves, fidelity; wash and DVH of the case
    assert 'class="summary"' in html and 'class="scorecard"' in html and "not for clinical use" in html


def test_same_seed_same_numbers_and_force_replaces_only_when_complete(setup, first_run, tmp_path):
    again = tmp_path / "run2"
    assert demo(setup, again).exit_code == 0
    a, b = (json.loads((p / "report.json").read_text()) for p in (first_run, again))
    assert a["per_case"] == b["per_case"] and a["cases"][0]["scores"] == b["cases"][0]["scores"]

    before = (again / "result.json").read_bytes()
    r = demo(setup, again)
    assert r.exit_code == 2 and "--force" in r.output
    assert (again / "result.json").read_bytes() == before  # nothing of the earlier run touched
    r = demo(setup, again, "--force", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert json.loads((again / "result.json").read_text())["seed"] == 1
    assert not [p for p in again.iterdir() if p.name.endswith(".partial")]


def test_report_rerenders_a_saved_run(first_run, tmp_path):
    r = runner.invoke(app, ["report", str(first_run), "--out", str(tmp_path / "r"), "--no-progress"])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "r" / "report.json").read_text())
    assert again == json.loads((first_run / "report.json").read_text())


def test_report_of_a_folder_without_a_result_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "result.json" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--agent", "nope"], "valid: ['best_of_n'"),
        (["--scorecard", "nope"], "nope"),
        (["--cases", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_demo_bad_input_names_what_is_valid(setup, tmp_path, extra, message):
    r = demo(setup, tmp_path / "o", *extra)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_demo_on_real_openkbp_patients_holds_the_last_one_out(setup, tmp_path):
    """``--cases`` an OpenKBP folder (the shared pt_108 and pt_196): aligned on the first, the
    last shown, scored with the site's card (headneck_rtog) and given the challenge scores."""
    folder = need(TRAIN_PATS)
    args = ["demo", "--checkpoint", str(setup["checkpoint"]), "--config", str(setup["config"]), "--cases",
            str(folder), "--samples", "2", "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert [Path(c).name for c in result["train_cases"]] == ["pt_108"]
    (entry,) = result["after"]["cases"]
    assert (
        entry["case_id"] == "pt_196" and entry["card"].startswith("Head and neck") and entry["dose_score"] > 0
    )
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["cases"][0]["case_id"] == "pt_196"


def test_demo_takes_a_maas_json_card(setup, tmp_path):
    """The shared Varian lung card on two lung phantoms: refused as a poor fit (it names the
    flag's setting), then run with ``--allow-card-mismatch``."""
    card = need(LUNG_JSON)
    cases = tmp_path / "lung"
    cases.mkdir()
    phantoms = Path(str(files("dosegym") / "assets" / "phantoms" / "lung"))
    for name in ("lung_000.npz", "lung_028.npz"):
        shutil.copy(phantoms / name, cases / name)
    args = ["demo", "--checkpoint", str(setup["checkpoint"]), "--config", str(setup["config"]), "--cases",
            str(cases), "--samples", "2", "--scorecard", str(card), "--no-progress"]  # fmt: skip
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "does not fit" in r.output and "allow_card_mismatch" in r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--allow-card-mismatch"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["cases"][0]["card"] == "Lung 60Gy" and report["run"]["scorecard"] == str(card)


def test_kept_doses_round_trip(tmp_path):
    case = read_case("phantoms:headneck/28")
    dose = np.random.default_rng(0).uniform(0, 70, case.grid.shape).astype(np.float32)
    write_doses(tmp_path, "after", {case.case_id: dose}, [case], ["phantoms:headneck/28"])
    (saved,) = saved_cases(tmp_path, "after")
    assert saved.ref == "phantoms:headneck/28" and saved.file.name == "headneck_028.nii.gz"
    np.testing.assert_array_equal(read_dose(saved, case), dose)
    assert saved_cases(tmp_path, "before") == []
    assert file_name("a/b c") == "a_b_c.nii.gz"


CHECK_SCRIPT = """<script>window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var r = {images: imgs.length,
           decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
           summary: document.querySelectorAll("table.summary tbody tr").length,
           scorecards: document.querySelectorAll("table.scorecard").length};
  var p = document.createElement("pre"); p.id = "dosegym-check"; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});</script>"""


def chromium() -> str:
    """Debian's chromium (``.ci/run`` installs it); missing: skipped, but a failure under ``CI=true``."""
    import os

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (CI=true needs it: apt-get install chromium)", pytrace=False)
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def test_report_opens_in_a_headless_browser(first_run, tmp_path):
    import subprocess

    browser = chromium()
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'p'}",
    ]
    page = tmp_path / "check.html"
    page.write_text((first_run / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    found = dom.split('<pre id="dosegym-check">', 1)[1].split("</pre>", 1)[0]
    check = json.loads(found)
    assert check == {"images": 4, "decoded": 4, "summary": 1, "scorecards": 1}, check
    shot = tmp_path / "shot.png"
    uri = (first_run / "report.html").as_uri()
    subprocess.run([*flags, "--window-size=1280,1600", f"--screenshot={shot}", uri],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1280) and pixels.std() > 10  # a page, not a blank screen
