"""The scripts that train on a lent GPU, run here on CPU (16^3, two real OpenKBP patients):
``scripts/gpu_transport.py`` packs the training cache into one file that unpacks to the same
cache within its quantisation, and ``scripts/gpu_pretrain.py`` trains both objectives from that
file alone, with no source data, and exports their weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import numpy as np
import pytest
from helpers import tiny_pretrain_config
from safetensors.torch import load_file
from shared_data import REPO

from dosegym.diffusion import train, train_data
from dosegym.diffusion.config import PretrainConfig
from dosegym.diffusion.train_data import CachedCase, MemoryCase


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The tiny config's cache built here and packed; the config of a machine without the data."""
    root = tmp_path_factory.mktemp("transport")
    here = tiny_pretrain_config(root / "cache_here", steps=4)
    (root / "here.yaml").write_text(here.to_yaml())
    _script("gpu_transport").pack(str(root / "here.yaml"), str(root / "train.npz"))
    data = here.data.model_copy(
        update={"cache_dir": str(root / "cache_there"), "openkbp_dir": str(root / "no_such_data")}
    )
    there = here.model_copy(update={"data": data})
    (root / "there.yaml").write_text(there.to_yaml())
    return root, here, there


def test_transport_unpacks_to_the_training_cache(packed):
    root, here, there = packed
    _script("gpu_transport").unpack(str(root / "there.yaml"), str(root / "train.npz"))
    originals = sorted(train_data.cache_root(here).glob("*.npy"))
    assert len(originals) == 2
    for original in originals:
        copy = train_data.cache_root(there) / original.name
        a, b = np.load(original).astype(np.float32), np.load(copy).astype(np.float32)
        assert a.shape == b.shape
        meta_a = json.loads(original.with_suffix(".json").read_text())
        meta_b = json.loads(copy.with_suffix(".json").read_text())
        assert meta_a == meta_b
        offset, count = meta_a["slots"]["dose"]
        dose_channels = range(offset, offset + count)
        for ch in range(a.shape[0]):
            span = float(a[ch].max() - a[ch].min())
            levels = 65535 if ch in dose_channels else 255
            # quantisation over the channel's range, then float16 storage; masks come back exact
            tol = span / (2 * levels) + 1e-3 * float(np.abs(a[ch]).max()) + 1e-6
            assert np.abs(a[ch] - b[ch]).max() <= tol, (original.name, ch)
        for ch in dose_channels:
            assert np.abs(a[ch] - b[ch]).max() <= 2e-3 * float(a[ch].max()), "dose off by more than 0.2 %"


def test_gpu_pretrain_trains_both_objectives_from_the_transport_alone(packed, tmp_path, monkeypatch):
    root, _, there = packed
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    out, export = tmp_path / "runs", tmp_path / "export"
    argv = ["gpu_pretrain.py", str(root / "there.yaml"), str(root / "train.npz"), str(out), "4", str(export)]
    monkeypatch.setattr(sys, "argv", argv)
    model_input = CachedCase.model_input
    monkeypatch.setattr(train_data, "training_sources", None)  # not called: the cache comes as sources
    _script("gpu_pretrain").main()
    assert CachedCase.model_input is model_input  # nothing patched

    summary = json.loads((out / "gpu_summary.json").read_text())
    for objective in ("diffusion", "regression"):
        assert summary[objective]["steps"] == 4
        assert summary[objective]["cases"] == 2
        assert np.isfinite(summary[objective]["final_loss"])
        weights = load_file(str(out / objective / train.CHECKPOINT_DIR / "model.safetensors"))
        exported = {
            **load_file(str(export / f"{objective}_a.safetensors")),
            **load_file(str(export / f"{objective}_b.safetensors")),
        }
        assert exported.keys() == weights.keys()
        for key, value in weights.items():
            np.testing.assert_allclose(exported[key].float().numpy(), value.numpy(), rtol=1e-3, atol=1e-4)
    assert json.loads((export / "regression_config.json").read_text())["model"]["objective"] == "regression"


def test_gpu_pretrain_passes_the_carried_cache_through_the_sources_seam(packed, tmp_path, monkeypatch):
    """The script hands ``pretrain`` the unpacked cases (in memory) as ``sources``: it never asks
    for the configured sources (absent on the GPU machine) and leaves the configs it read as
    they were."""
    root, _, there = packed

    def no_sources(cfg):
        raise AssertionError("gpu_pretrain must pass its data through pretrain(sources=...)")

    calls = []

    def spy(cfg, out_dir, resume=False, until=None, progress=True, *, sources=None):
        calls.append((cfg, until, sources))
        out_dir.mkdir(parents=True, exist_ok=True)
        return train.TrainResult(until, 0.5, out_dir / train.CHECKPOINT_DIR, 0.0, len(sources))

    read = []
    from_yaml = PretrainConfig.from_yaml.__func__

    def reading(cls, path):
        read.append(from_yaml(cls, path))
        return read[-1]

    monkeypatch.setattr(PretrainConfig, "from_yaml", classmethod(reading))
    monkeypatch.setattr(train_data, "training_sources", no_sources)
    monkeypatch.setattr(train, "pretrain", spy)
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    out = tmp_path / "runs"
    argv = ["gpu_pretrain.py", str(root / "there.yaml"), str(root / "train.npz"), str(out), "8"]
    monkeypatch.setattr(sys, "argv", argv)
    _script("gpu_pretrain").main()

    assert [(c.model.objective, until) for c, until, _ in calls] == [
        (objective, until) for objective in ("diffusion", "regression") for until in (2, 4, 6, 8)
    ]
    sources = calls[0][2]
    assert all(s is sources for _, _, s in calls)  # unpacked once, read from disk once
    assert [type(s) for s in sources] == [MemoryCase, MemoryCase]
    assert len({s.label for s in sources}) == 2
    assert all(s.label.startswith("openkbp:train-pats/") for s in sources)
    cfg = calls[0][0]
    assert (cfg.train.steps, cfg.train.checkpoint_every, cfg.train.warmup_steps) == (8, 2, 0)
    assert read and all(c == there for c in read)  # the configs it read were not changed in place
    assert json.loads((out / "gpu_summary.json").read_text())["regression"]["cases"] == 2
