"""`dosegym pretrain` and `dosegym predict` end to end on two real OpenKBP patients (16^3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import tiny_pretrain_config
from safetensors.torch import load_file
from shared_data import PT_108
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.diffusion.config import PretrainConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.sample import sample
from dosegym.diffusion.slots import collate, to_model
from dosegym.diffusion.train import pretrain

runner = CliRunner()


def _yaml(cfg: PretrainConfig, path) -> str:
    path.write_text(cfg.to_yaml())
    return str(path)


def _run(*args: str):
    result = runner.invoke(app, list(args))
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result, " ".join(text.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A 4-step run straight through, and the same run stopped at step 2 then resumed."""
    root = tmp_path_factory.mktemp("pretrain")
    cfg = _yaml(tiny_pretrain_config(cache_dir), root / "tiny.yaml")
    straight, out = _run("pretrain", "--config", cfg, "--out", str(root / "a"), "--no-progress")
    assert straight.exit_code == 0, out
    first, out = _run("pretrain", "--config", cfg, "--out", str(root / "b"), "--until", "2", "--no-progress")
    assert first.exit_code == 0, out
    return root, cfg


def test_resume_continues_exactly(trained):
    root, cfg = trained
    b = root / "b" / "checkpoint"
    assert json.loads((b / "config.json").read_text())["step"] == 2
    again, out = _run("pretrain", "--config", cfg, "--out", str(root / "b"), "--no-progress")
    assert again.exit_code == 2 and "--resume" in out
    resumed, out = _run("pretrain", "--config", cfg, "--out", str(root / "b"), "--resume", "--no-progress")
    assert resumed.exit_code == 0, out
    assert "step 4/4" in out
    a = root / "a" / "checkpoint"
    assert json.loads((b / "config.json").read_text())["step"] == 4
    for file in ("model.safetensors", "train/raw.safetensors"):
        wa, wb = load_file(str(a / file)), load_file(str(b / file))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), file
    # and the run did train: EMA differs from the raw weights, both finite
    raw = load_file(str(a / "train/raw.safetensors"))
    ema = load_file(str(a / "model.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert list((root / "a" / "tb").glob("events.out.tfevents.*"))
    assert PretrainConfig.from_yaml(root / "a" / "config.yaml") == PretrainConfig.from_yaml(cfg)
    # the exact training cases are recorded, in the form data.cases_file reads back
    seen = json.loads((root / "a" / "data.json").read_text())
    assert seen["count"] == len(seen["cases"]) > 0
    assert all(c.startswith("openkbp:train-pats/pt_") for c in seen["cases"])


def test_resume_errors(trained, tmp_path):
    root, cfg = trained
    res, out = _run("pretrain", "--config", cfg, "--out", str(tmp_path / "new"), "--resume")
    assert res.exit_code == 2 and "no training checkpoint to resume" in out
    other = PretrainConfig.from_yaml(cfg)
    other = other.model_copy(update={"model": other.model.model_copy(update={"objective": "regression"})})
    res, out = _run(
        "pretrain", "--config", _yaml(other, tmp_path / "o.yaml"), "--out", str(root / "a"), "--resume"
    )
    assert res.exit_code == 2 and "objective: checkpoint 'diffusion' vs expected 'regression'" in out


def test_predict_writes_nifti_on_the_case_grid(trained, case, tmp_path):
    root, _ = trained
    out_dir = tmp_path / "pred"
    res, out = _run(
        "predict",
        "--case",
        str(PT_108),
        "--checkpoint",
        str(root / "a" / "checkpoint"),
        "--steps",
        "2",
        "--samples",
        "2",
        "--seed",
        "3",
        "--out",
        str(out_dir),
    )
    assert res.exit_code == 0, out
    img = sitk.ReadImage(str(out_dir / "dose.nii.gz"))
    assert img.GetSize() == tuple(reversed(case.grid.shape))
    assert np.allclose(img.GetSpacing(), tuple(reversed(case.grid.spacing_mm)), atol=1e-4)
    assert np.allclose(img.GetOrigin(), tuple(reversed(case.grid.origin_mm)), atol=1e-3)
    dose = sitk.GetArrayFromImage(img)
    assert dose.shape == case.grid.shape and dose.min() >= 0 and np.all(dose[~case.body] == 0)
    samples = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"dose_sample_{k:02d}.nii.gz"))) for k in (0, 1)
    ]
    std = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / "dose_std.nii.gz")))
    np.testing.assert_allclose(std, np.std(samples, axis=0), atol=1e-4)
    np.testing.assert_allclose(dose, np.mean(samples, axis=0), atol=1e-4)
    meta = json.loads((out_dir / "prediction.json").read_text())
    assert meta["samples"] == 2 and "dose_std.nii.gz" in meta["files"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache_dir, tmp_path, monkeypatch):
    cfg = _yaml(tiny_pretrain_config(cache_dir, steps=6, checkpoint_every=2), tmp_path / "c.yaml")
    calls = {"n": 0}
    forward = Any2Any.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = forward(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(Any2Any, "forward", poisoned)
    res, out = _run("pretrain", "--config", cfg, "--out", str(tmp_path / "run"), "--no-progress")
    assert res.exit_code == 2
    assert "training stopped at step 3" in out and "last good checkpoint (step 2)" in out
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["step"] == 2


def test_regression_objective_then_predict(cache_dir, tmp_path, case):
    cfg = _yaml(tiny_pretrain_config(cache_dir, steps=2), tmp_path / "r.yaml")
    res, out = _run(
        "pretrain",
        "--config",
        cfg,
        "--out",
        str(tmp_path / "reg"),
        "--objective",
        "regression",
        "--no-progress",
    )
    assert res.exit_code == 0, out
    doc = json.loads((tmp_path / "reg" / "checkpoint" / "config.json").read_text())
    assert doc["model"]["objective"] == "regression"
    res, out = _run(
        "predict",
        "--case",
        str(PT_108),
        "--checkpoint",
        str(tmp_path / "reg" / "checkpoint"),
        "--out",
        str(tmp_path / "p"),
    )
    assert res.exit_code == 0, out
    assert sitk.ReadImage(str(tmp_path / "p" / "dose.nii.gz")).GetSize() == tuple(reversed(case.grid.shape))


def test_generating_another_slot(cache_dir, tmp_path, case):
    """Train a few steps generating the beam plate from structures + dose, then sample it."""
    cfg = tiny_pretrain_config(cache_dir, steps=3)
    spec = cfg.model.spec.model_copy(update={"generate": "beam_plate"})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"spec": spec})})
    result = pretrain(cfg, tmp_path / "plate", progress=False)
    assert result.step == 3 and np.isfinite(result.loss)
    from dosegym.diffusion.checkpoint import load_model

    model = load_model(result.checkpoint)
    assert model.config.spec.generate == "beam_plate"
    mi, res = to_model(case, spec, absent=("angle_plate",))
    assert mi.roles["beam_plate"] == "generate" and mi.roles["dose"] == "condition"
    x0 = sample(model, collate([mi]), "ddim", 3, torch.Generator().manual_seed(0))
    plate = res.slot_to_case(x0[0, 0], "beam_plate")
    assert plate.shape == case.grid.shape and torch.isfinite(plate).all()
    oars = res.slot_to_case(mi.tensors["oars"], "oars")
    assert oars.shape == (8, *case.grid.shape) and set(torch.unique(oars).tolist()) <= {0.0, 1.0}


def test_predict_dicom_input_also_writes_rtdose(trained, tmp_path):
    import pydicom

    from dosegym.data import Beams, Case, Grid, Prescription, equispaced_gantry_deg, read_case
    from dosegym.data.dicom import write_dicom_case

    grid = Grid((20, 24, 28), (3.0, 2.5, 2.5), (-30.0, -30.0, -35.0))
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    body = ((yy - 12) / 10) ** 2 + ((xx - 14) / 12) ** 2 <= 1
    ptv = body & ((zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 14) ** 2 <= 16)
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    iso = tuple(grid.index_to_mm((10, 12, 14)))
    case = Case(
        "dicom_box",
        grid,
        ct=ct,
        structures={"PTV_60": ptv},
        body=body,
        prescriptions=[Prescription("PTV_60", 60.0, 30)],
        beams=Beams(iso, equispaced_gantry_deg(5)),
    )
    folder = write_dicom_case(case, tmp_path / "dcm")
    root, _ = trained
    res, out = _run(
        "predict",
        "--case",
        str(folder),
        "--checkpoint",
        str(root / "a" / "checkpoint"),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "pred"),
    )
    assert res.exit_code == 0, out
    rd = pydicom.dcmread(tmp_path / "pred" / "rtdose.dcm")
    assert (
        rd.Modality == "RTDOSE"
        and (int(rd.NumberOfFrames), rd.Rows, rd.Columns) == read_case(folder).grid.shape
    )
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "dose.nii.gz")))
    assert nifti.shape == grid.shape and np.all(nifti[~body] == 0)


def test_pretrain_takes_its_data_as_sources(cache_dir, tmp_path, case, case2):
    """``sources`` replaces the data the config names: ``Case`` objects in memory, or ready
    (cached) cases, which train exactly like the configured sources they came from."""
    from dosegym.diffusion.train_data import build_cache, training_sources
    from dosegym.errors import ModelError

    cfg = tiny_pretrain_config(cache_dir, steps=2)
    nowhere = cfg.data.model_copy(update={"openkbp_dir": str(tmp_path / "no_such_data")})
    no_data = cfg.model_copy(update={"data": nowhere})  # reading the configured data would fail

    res = pretrain(no_data, tmp_path / "cases", progress=False, sources=[case, case2])
    assert res.num_cases == 2 and np.isfinite(res.loss)
    record = json.loads((tmp_path / "cases" / "data.json").read_text())
    assert record["cases"] == [case.case_id, case2.case_id]

    cached = build_cache(cfg, training_sources(cfg), progress=False)
    a = pretrain(cfg, tmp_path / "default", progress=False)
    b = pretrain(no_data, tmp_path / "cached", progress=False, sources=cached)
    wa, wb = (
        load_file(str(a.checkpoint / "model.safetensors")),
        load_file(str(b.checkpoint / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    with pytest.raises(ModelError, match="cannot be mixed"):
        pretrain(cfg, tmp_path / "mixed", progress=False, sources=[*training_sources(cfg), case])
    with pytest.raises(ModelError, match="no training case"):
        pretrain(cfg, tmp_path / "empty", progress=False, sources=[])
    with pytest.raises(ModelError, match="int is not a training source"):
        pretrain(cfg, tmp_path / "bad", progress=False, sources=[3])
