#!/usr/bin/env python3
"""Train the shipped checkpoint (diffusion) and the regression baseline on a lent GPU.

    python scripts/gpu_pretrain.py CONFIG.yaml TRANSPORT.npz OUT_DIR SECONDS_EACH [EXPORT_DIR]

Runs on a machine that has the training cache only (``scripts/gpu_transport.py unpack``), not
the source data. Both models get the same wall-clock budget (``SECONDS_EACH``): a short probe
measures the step time, and ``train.steps`` (hence the cosine schedule) is set so that the
run ends inside its budget. Both runs use the same model, data, batch and seed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_transport import unpack  # noqa: E402

from dosegym.diffusion import train  # noqa: E402
from dosegym.diffusion.config import PretrainConfig  # noqa: E402


def _sources_from_transport(cfg: PretrainConfig):
    index = json.loads((train.cache_root(cfg) / "transport_index.json").read_text())

    def missing(label: str):
        raise RuntimeError(f"{label}: the source is not on this machine; only its cache is")

    return [train.SourceCase(k, lbl, lambda lbl=lbl: missing(lbl), stamp) for k, lbl, stamp in index]


def _preload_cases() -> None:
    """Keep every case's model input in memory: the cache is read from disk once, not per step."""
    original = train.CachedCase.model_input
    memo: dict = {}

    def model_input(self, spec):
        if self.key not in memo:
            memo[self.key] = original(self, spec)
        return memo[self.key]

    train.CachedCase.model_input = model_input


def main() -> None:
    config, transport, out_dir, seconds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    unpack(config, transport)
    train.training_sources = _sources_from_transport
    _preload_cases()
    base = PretrainConfig.from_yaml(config)
    summary = {}
    for objective in ("diffusion", "regression"):
        cfg = base.model_copy(deep=True)
        cfg.model.objective = objective
        timings = []
        for until in (10, 40):  # two probes: their difference excludes start-up and warm-up costs
            probe_dir = out_dir / f"probe_{objective}_{until}"
            timings.append(train.pretrain(cfg, probe_dir, until=until, progress=False).seconds)
            shutil.rmtree(probe_dir)
        sec_per_step = max(timings[1] - timings[0], 1e-3) / 30
        steps = max(100, int(seconds / sec_per_step))
        cfg.train.steps = steps
        cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 10)
        cfg.train.checkpoint_every = max(steps // 4, 1)
        t0 = time.perf_counter()
        res = train.pretrain(cfg, out_dir / objective, progress=False)
        summary[objective] = {
            "steps": res.step,
            "final_loss": res.loss,
            "seconds": time.perf_counter() - t0,
            "probe_sec_per_step": sec_per_step,
            "cases": res.num_cases,
            "batch_size": cfg.train.batch_size,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        }
        print(objective, summary[objective], flush=True)
    (out_dir / "gpu_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if len(sys.argv) > 5:
        export(out_dir, Path(sys.argv[5]))


def export(out_dir: Path, dest: Path) -> None:
    """float16 weights in two halves per model (each file stays small enough to travel back)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for objective in ("diffusion", "regression"):
        ckpt = out_dir / objective / train.CHECKPOINT_DIR
        weights = load_file(str(ckpt / "model.safetensors"))
        keys = sorted(weights)
        half = len(keys) // 2
        for part, chunk in (("a", keys[:half]), ("b", keys[half:])):
            tensors = {
                k: weights[k].half().contiguous() if weights[k].is_floating_point() else weights[k]
                for k in chunk
            }
            save_file(tensors, str(dest / f"{objective}_{part}.safetensors"))
        shutil.copy(ckpt / "config.json", dest / f"{objective}_config.json")
    shutil.copy(out_dir / "gpu_summary.json", dest / "gpu_summary.json")


if __name__ == "__main__":
    main()
