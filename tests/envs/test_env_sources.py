"""Case sources and env registration."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dosegym.envs.sources import CaseSource
from dosegym.errors import EnvError


def test_openkbp_folder_and_paths(train_pats, pt108):
    src = CaseSource(train_pats)
    assert [r.rsplit("/", 1)[-1] for r in src.refs] == ["pt_108", "pt_196"]  # patient-number order
    assert src.site(0) == ("headneck", False)
    assert src.load(0).case_id == "pt_108"
    assert CaseSource([pt108]).refs == [pt108]
    assert CaseSource(pt108).refs == [pt108]  # one case folder


def test_case_objects_and_phantom_files(prostate_cases, tmp_path):
    from dosegym.data.phantoms import write_phantom

    src = CaseSource(prostate_cases)
    assert src.load(1) is prostate_cases[1] and src.site(0) == ("prostate", True)
    for i, case in enumerate(prostate_cases):
        write_phantom(case, tmp_path / f"prostate_{i:03d}.npz")
    folder = CaseSource(tmp_path)
    assert len(folder) == 2 and folder.load(1).case_id == prostate_cases[1].case_id


def test_shipped_phantom_ids():
    from dosegym.data.phantoms import shipped_phantom_dir, shipped_phantom_ids

    assert CaseSource("phantoms:prostate/0").refs == ["phantoms:prostate/0"]
    with pytest.raises(EnvError, match=r"valid: \['headneck', 'prostate', 'lung'\]"):
        CaseSource("phantoms:brain")
    if (shipped_phantom_dir() / "manifest.json").is_file():
        assert CaseSource("phantoms:prostate").refs == shipped_phantom_ids("prostate")
        assert len(CaseSource("phantoms")) == len(shipped_phantom_ids())
    else:
        with pytest.raises(EnvError, match="shipped phantoms are not available"):
            CaseSource("phantoms:prostate")


def test_phantom_splits():
    held_out = [f"phantoms:headneck/{i}" for i in range(28, 32)]
    assert CaseSource("phantoms:headneck/test").refs == held_out
    train = CaseSource("phantoms:headneck/train").refs
    assert len(train) == 28 and not set(train) & set(held_out)
    assert len(CaseSource("phantoms/test")) == 12  # 4 held out per site
    with pytest.raises(EnvError, match=r"unknown split 'val'; valid: \['train', 'test'\]"):
        CaseSource("phantoms:headneck/val")


def test_unknown_sources_list_the_valid_forms(tmp_path):
    for bad in ("no/such/folder", "phantom", 42, [3.0]):
        with pytest.raises(EnvError, match="phantoms"):
            CaseSource(bad)
    with pytest.raises(EnvError, match="no pt_"):
        CaseSource(tmp_path)
    with pytest.raises(EnvError, match="no case"):
        CaseSource([])


def test_import_registers_without_torch():
    code = (
        "import sys, dosegym, gymnasium; "
        "ids = sorted(k for k in gymnasium.registry if k.startswith('dosegym/')); "
        "print(ids, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == (
        "['dosegym/DenoiseDose-v0', 'dosegym/GuidedDose-v0', 'dosegym/ScorecardBandit-v0'] False"
    )
