"""Output paths never destroy what is there (issue 15, rule 1): every writer on a real case."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from helpers import snapshot, user_folder

from dosegym.data import read_case, write_case
from dosegym.data.atomic import MARKER, atomic_folder, atomic_path, check_output_path, json_text
from dosegym.data.gdphmm import write_gdphmm
from dosegym.data.nifti import write_image
from dosegym.data.phantoms import generate_phantom_set, write_phantom
from dosegym.errors import DataError

CASE = "phantoms:headneck/28"


@pytest.fixture(scope="module")
def case():
    return read_case(CASE)


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial" in p.name]


# -- file writers -----------------------------------------------------------------------------
def file_writers(case):
    from dosegym.scorecards import load_card
    from dosegym.scorecards.maas import write_maas

    card = load_card("phantom_headneck")
    report = card.score(case)
    return {
        "write_image": lambda p: write_image(case.dose, case.grid, p),
        "write_phantom": lambda p: write_phantom(case, p),
        "write_case phantom": lambda p: write_case(case, p, format="phantom"),
        "write_gdphmm": lambda p: write_gdphmm(case, p),
        "Scorecard.to_yaml": card.to_yaml,
        "write_maas": lambda p: write_maas(card, p),
        "ScoreReport.to_json into a file": report.to_json,
    }


@pytest.mark.parametrize(
    "name",
    ["write_image", "write_phantom", "write_case phantom", "write_gdphmm", "Scorecard.to_yaml", "write_maas"],
)
def test_a_file_writer_refuses_a_folder_and_keeps_it(case, tmp_path, name):
    names = {"write_image": "d.nii.gz", "write_gdphmm": "HNC_001+A4Ac+MOS_1.npz", "write_maas": "c.json"}
    target = user_folder(tmp_path / names.get(name, "out.npz" if "phantom" in name else "out.yaml"))
    before = snapshot(target)
    with pytest.raises(DataError, match="exists and is a folder; dosegym replaces only a regular file"):
        file_writers(case)[name](target)
    assert snapshot(target) == before and no_partials(tmp_path)


def test_a_file_writer_replaces_a_regular_file_and_a_link_but_not_its_target(case, tmp_path):
    write = file_writers(case)["write_image"]
    old = tmp_path / "old.nii.gz"
    old.write_bytes(b"old")
    write(old)
    assert old.stat().st_size > 100
    target = tmp_path / "target.nii.gz"
    target.write_bytes(b"keep")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(target)
    write(link)
    assert not link.is_symlink() and target.read_bytes() == b"keep"


def test_special_files_and_paths_under_a_file_are_refused(case, tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    report = file_writers(case)["ScoreReport.to_json into a file"]
    with pytest.raises(DataError, match=r"pipe.json: exists and is a FIFO"):
        report(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile/x.json: cannot be written: .*afile is a file, not a folder"):
        report(tmp_path / "afile" / "x.json")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match="broken symbolic link"):
        report(tmp_path / "dangling")


@pytest.mark.skipif(not Path("/dev/full").exists() or os.geteuid() != 0, reason="needs /dev/full and root")
def test_dev_full_stays_a_device(case):
    with pytest.raises(DataError, match="/dev/full: exists and is a character device"):
        file_writers(case)["ScoreReport.to_json into a file"]("/dev/full")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_score_report_into_a_folder_writes_the_default_name(case, tmp_path):
    folder = user_folder(tmp_path / "results")
    before = snapshot(folder)
    text = file_writers(case)["ScoreReport.to_json into a file"](folder)
    written = folder / "score_headneck_028.json"
    assert written.read_text() == text
    assert {k: v for k, v in snapshot(folder).items() if k != written.name} == before


def test_a_full_disk_is_a_data_error_and_leaves_nothing(tmp_path):
    def fill(file: Path) -> None:  # what a writer sees when the disk fills up half-way
        file.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(DataError, match=r"out.json: could not be written: No space left on device"):
        with atomic_path(target) as tmp:
            fill(tmp)
    with pytest.raises(DataError, match=r"case: could not be written: No space left on device"):
        with atomic_folder(tmp_path / "case", "test writer") as tmp:
            fill(tmp / "a")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# -- folder writers ---------------------------------------------------------------------------
def test_a_case_folder_with_case_json_but_no_marker_is_not_replaced(case, tmp_path):
    """The old writer replaced any folder holding a case.json, with everything else in it."""
    folder = user_folder(tmp_path / "mine")
    (folder / "case.json").write_text("{}")
    before = snapshot(folder)
    with pytest.raises(DataError, match="not an earlier dosegym case folder output"):
        write_case(case, folder)
    assert snapshot(folder) == before


def test_a_case_folder_is_rewritten_in_place_keeping_the_users_files(case, tmp_path):
    folder = write_case(case, tmp_path / "case")
    marker = json.loads((folder / MARKER).read_text())
    assert marker["writer"] == "dosegym case folder" and "case.json" in marker["files"]
    (folder / "notes.txt").write_text("my notes")
    fewer = read_case(folder)
    dropped = next(iter(fewer.structures))
    doc = json.loads((folder / "case.json").read_text())
    stem = next(s["file"] for s in doc["structures"] if s["name"] == dropped)
    stale = folder / "structures" / f"{stem}.nii.gz"
    assert stale.is_file()
    del fewer.structures[dropped]
    fewer.occupancy.pop(dropped, None)
    fewer.prescriptions = [p for p in fewer.prescriptions if p.target != dropped]
    write_case(fewer, folder)
    assert (folder / "notes.txt").read_text() == "my notes"
    assert sorted(read_case(folder).structures) == sorted(fewer.structures)
    assert not stale.exists() and no_partials(folder)
    files = set(json.loads((folder / MARKER).read_text())["files"])
    assert files == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {
        MARKER,
        "notes.txt",
    }


def test_an_empty_folder_is_filled_not_replaced(case, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    inode = folder.stat().st_ino
    write_case(case, folder)
    assert folder.stat().st_ino == inode and (folder / "case.json").is_file()


def test_a_user_file_with_an_output_name_is_never_replaced(tmp_path):
    with atomic_folder(tmp_path / "out", "test writer") as tmp:
        (tmp / "a.txt").write_text("1")
    (tmp_path / "out" / "b.txt").write_text("user")
    with pytest.raises(DataError, match=r"b.txt: exists and was not written by an earlier test writer"):
        with atomic_folder(tmp_path / "out", "test writer") as tmp:
            (tmp / "a.txt").write_text("2")
            (tmp / "b.txt").write_text("2")
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    assert (tmp_path / "out" / "b.txt").read_text() == "user"
    with pytest.raises(DataError, match="names 'test writer'"):
        check_output_path(tmp_path / "out", writer="other writer")


def test_a_forged_marker_cannot_reach_outside_the_folder(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "x").write_text("x")
    (folder / MARKER).write_text(json.dumps({"writer": "w", "files": ["x", "../precious.txt"]}))
    with pytest.raises(DataError, match="holds no valid"):
        with atomic_folder(folder, "w") as tmp:
            (tmp / "y").write_text("y")
    assert outside.read_text() == "keep" and (folder / "x").exists()


def test_a_phantom_set_refuses_a_users_folder_and_replaces_its_own(tmp_path):
    folder = user_folder(tmp_path / "ph")
    before = snapshot(folder)
    with pytest.raises(DataError, match="not an earlier dosegym phantom set output"):
        generate_phantom_set(folder, sites=["lung"], n=1, dose="none")
    assert snapshot(folder) == before
    (first,) = generate_phantom_set(tmp_path / "set", sites=["lung"], n=1, dose="none")
    (again,) = generate_phantom_set(tmp_path / "set", sites=["prostate"], n=1, dose="none")
    assert again.is_file() and not first.exists()
    with pytest.raises(DataError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        generate_phantom_set(tmp_path / "s2", sites=["lung"], n=1, seed=-3, dose="none")


def test_checkpoint_rotation_keeps_a_users_file(tmp_path):
    from dosegym.diffusion.checkpoint import save_checkpoint
    from dosegym.diffusion.config import ModelConfig, UNetConfig
    from dosegym.diffusion.model import Any2Any
    from dosegym.diffusion.slots import ModelSpec

    cfg = ModelConfig(
        spec=ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0)),
        unet=UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4, attention_heads=2),
    )
    weights = Any2Any(cfg).state_dict()
    folder = user_folder(tmp_path / "ck")
    before = snapshot(folder)
    with pytest.raises(DataError, match="not an earlier dosegym checkpoint output"):
        save_checkpoint(folder, cfg, weights)
    assert snapshot(folder) == before
    ck = save_checkpoint(tmp_path / "run", cfg, weights, step=1, train_files={"state": {"step": 1}})
    (ck / "README.txt").write_text("mine")
    save_checkpoint(ck, cfg, weights, step=2)
    assert json.loads((ck / "config.json").read_text())["step"] == 2
    assert (ck / "README.txt").read_text() == "mine" and not (ck / "train").exists()


def test_json_outputs_are_strict(case, tmp_path):
    assert json_text({"a": math.nan, "b": [math.inf, 1.5], "c": np.float64(-math.inf)}) == (
        '{\n  "a": null,\n  "b": [\n    null,\n    1.5\n  ],\n  "c": null\n}\n'
    )
    from dosegym.scorecards import ScoreReport

    report = ScoreReport.build(card="c", case_id="x", prescription_gy=None, items=[])
    assert math.isnan(report.normalised)
    path = tmp_path / "r.json"
    report.to_json(path)

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name}")

    assert json.loads(path.read_text(), parse_constant=no_constants)["normalised"] == "NaN"
    assert math.isnan(ScoreReport.from_json(path).normalised)


def test_outputs_get_the_usual_permissions(tmp_path):
    """Temporary names are created private (0600 / 0700); the output itself must carry the mode
    a plain open / mkdir gives under the umask, or nobody else could read a shared result."""
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "out", "test writer") as tmp:
            (tmp / "a.txt").write_text("x")
        with atomic_path(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out" / MARKER).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o644
