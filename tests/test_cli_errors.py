"""Issue 15 through the real CLI: output paths never destroy what is there (rule 1), no
traceback reaches the user (rule 5) and ``predict`` takes ``--trusted`` (rule 7)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import snapshot, user_folder
from typer.testing import CliRunner

from dosegym.cli.main import app

CASE = "phantoms:headneck/28"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: str):
    """The result and its stdout + stderr with rich's line wrapping undone."""
    result = runner.invoke(app, list(args))
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result, " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained 16^3 model (1000 training timesteps): fast to load and to sample."""
    from dosegym.diffusion.checkpoint import save_checkpoint
    from dosegym.diffusion.config import ModelConfig, UNetConfig
    from dosegym.diffusion.model import Any2Any
    from dosegym.diffusion.slots import ModelSpec

    cfg = ModelConfig(
        spec=ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0)),
        unet=UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4, attention_heads=2),
    )
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", cfg, Any2Any(cfg).state_dict())


def predict(ck: Path, out: Path, *more: str):
    return run("predict", "--case", CASE, "--checkpoint", str(ck), "--steps", "1", "--out", str(out), *more)


# -- rule 1: output paths ---------------------------------------------------------------------
def test_score_into_a_users_folder_keeps_every_file(tmp_path):
    folder = user_folder(tmp_path / "results")
    before = snapshot(folder)
    res, out = run("score", "--case", CASE, "--card", "phantom_headneck", "--out", str(folder))
    assert res.exit_code == 0, out
    report = folder / "score_headneck_028.json"
    assert json.loads(report.read_text())["case_id"] == "headneck_028"
    assert {k: v for k, v in snapshot(folder).items() if k != report.name} == before


@pytest.mark.skipif(not Path("/dev/full").exists() or os.geteuid() != 0, reason="needs /dev/full and root")
def test_score_out_dev_full_is_refused_and_stays_a_device():
    res, out = run("score", "--case", CASE, "--card", "phantom_headneck", "--out", "/dev/full")
    assert res.exit_code == 2 and "/dev/full: exists and is a character device" in out
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_score_out_a_fifo_or_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    import dosegym.data

    def no_work(*args, **kwargs):
        raise AssertionError("the case was read before --out was checked")

    monkeypatch.setattr(dosegym.data, "read_case", no_work)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "afile").write_text("x")
    for bad, says in ((fifo, "exists and is a FIFO"), (tmp_path / "afile" / "x.json", "afile is a file")):
        res, out = run("score", "--case", CASE, "--card", "phantom_headneck", "--out", str(bad))
        assert res.exit_code == 2 and says in out and "Traceback" not in out, out
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    real = Path.write_text

    def full(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "s.json"
    res, out = run("score", "--case", CASE, "--card", "phantom_headneck", "--out", str(target))
    assert res.exit_code == 2, out
    assert f"{target}: could not be written: No space left on device" in out
    assert list(tmp_path.iterdir()) == []


def test_predict_checks_out_before_sampling(tiny_checkpoint, tmp_path, monkeypatch):
    from dosegym.diffusion.policy import DosePolicy

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before --out was checked")

    monkeypatch.setattr(DosePolicy, "predict", no_sampling)
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    res, out = predict(tiny_checkpoint, folder)
    assert res.exit_code == 2 and "mine: exists, is not empty and is not an earlier dosegym predict" in out
    assert snapshot(folder) == before
    (tmp_path / "afile").write_text("x")
    res, out = predict(tiny_checkpoint, tmp_path / "afile" / "x")
    assert res.exit_code == 2 and "afile is a file, not a folder" in out


def test_predict_again_replaces_only_its_own_files(tiny_checkpoint, tmp_path):
    pred = tmp_path / "pred"
    res, out = predict(tiny_checkpoint, pred, "--samples", "2")
    assert res.exit_code == 0, out
    assert (pred / "dose_sample_01.nii.gz").is_file()
    res, out = run("score", "--case", CASE, "--card", "phantom_headneck", "--out", str(pred / "score.json"))
    assert res.exit_code == 0, out
    res, out = predict(tiny_checkpoint, pred)
    assert res.exit_code == 0, out
    names = sorted(p.name for p in pred.iterdir())
    assert names == [".dosegym-output.json", "dose.nii.gz", "prediction.json", "score.json"]
    assert json.loads((pred / "prediction.json").read_text())["samples"] == 1


def test_data_commands_and_pretrain_check_out_first(tmp_path):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    for args, says in (
        (("data", "convert", CASE, str(folder)), "not an earlier dosegym case folder output"),
        (("data", "phantoms", "--out", str(folder), "--n", "1", "--dose", "none"), "phantom set"),
        (
            ("pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"), "--out", str(folder)),
            "not an earlier dosegym pretrain run output",
        ),
    ):
        res, out = run(*args)
        assert res.exit_code == 2 and says in out, out
    assert snapshot(folder) == before


# -- rule 5: no traceback ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--steps", "5000", "--steps must be an integer in [1, 1000]"),
        ("--sampler", "bogus", "--sampler 'bogus' is unknown; valid: ddpm, ddim, dpm_solver"),
        ("--samples", "0", "--samples"),
        ("--seed", "1e23", "--seed"),
        ("--seed", str(2**70), "--seed must be an integer in [0, 2**64 - 1]"),
        ("--seed", "-1", "--seed must be an integer in [0, 2**64 - 1]"),
        ("--device", "tpu9", "--device 'tpu9' is not a torch device; valid here: cpu"),
        ("--device", "cuda", "--device 'cuda' is not available on this machine; valid here: cpu"),
    ],
)
def test_predict_options_are_one_line_errors(tiny_checkpoint, tmp_path, monkeypatch, option, value, says):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "a CPU machine", on any machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    res, out = predict(tiny_checkpoint, tmp_path / "p", option, value)
    assert res.exit_code == 2 and says in out and "Traceback" not in out, out
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_shipped_weights_name_the_file(tmp_path, damage):
    from dosegym.diffusion.policy import shipped_checkpoint_dir

    ck = Path(shutil.copytree(shipped_checkpoint_dir(), tmp_path / "model"))
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    res, out = run("predict", "--case", CASE, "--checkpoint", str(ck), "--out", str(tmp_path / "p"))
    assert res.exit_code == 2 and f"{weights}: cannot read weights" in out and "Traceback" not in out, out


def test_the_last_resort_is_one_line_exit_3_and_debug_shows_it(tmp_path, monkeypatch):
    import dosegym.data

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nin two lines")

    monkeypatch.setattr(dosegym.data, "read_case", boom)
    args = ("score", "--case", CASE, "--card", "phantom_headneck", "--out", str(tmp_path / "s.json"))
    res = runner.invoke(app, list(args))
    assert res.exit_code == 3
    assert res.stderr.strip().splitlines() == [
        "error: RuntimeError: something broke in two lines (run with --debug for the traceback)"
    ]
    debug = runner.invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, RuntimeError) and debug.exit_code == 1

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dosegym.data, "read_case", interrupted)
    res = runner.invoke(app, list(args))
    assert res.exit_code == 130 and res.stderr.strip() == "error: interrupted"


# -- rule 7: predict --trusted ----------------------------------------------------------------
def test_predict_reads_gdphmm_with_trusted(tiny_checkpoint, tmp_path):
    from dosegym.data import read_case
    from dosegym.data.gdphmm import write_gdphmm

    plan = write_gdphmm(read_case(CASE), tmp_path / "HNC_001+A4Ac+MOS_1.npz")
    args = ("predict", "--case", str(plan), "--checkpoint", str(tiny_checkpoint), "--steps", "1")
    res, out = run(*args, "--out", str(tmp_path / "p"))
    assert res.exit_code == 2 and "--trusted" in out and "predict" in out, out
    table = {
        "HNC_001": {
            "PTV_High": {"OPTName": "PTV70", "PDose": 70},
            "PTV_Low": {"OPTName": "PTV56", "PDose": 56},
        }
    }
    (tmp_path / "PTV_DICT.json").write_text(json.dumps(table))
    more = ("--trusted", "--prescriptions", str(tmp_path / "PTV_DICT.json"))
    res, out = run(*args, "--out", str(tmp_path / "p"), *more)
    assert res.exit_code == 0, out
    assert json.loads((tmp_path / "p" / "prediction.json").read_text())["case_id"] == "HNC_001+A4Ac+MOS_1"
