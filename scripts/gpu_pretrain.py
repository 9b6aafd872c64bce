#!/usr/bin/env python3
"""Train the shipped checkpoint (diffusion) and the regression baseline on a lent GPU.

    python scripts/gpu_pretrain.py CONFIG.yaml TRANSPORT.npz OUT_DIR STEPS [EXPORT_DIR]

Runs on a machine that has the training cache only (``scripts/gpu_transport.py unpack``), not
the source data. Both models get the same budget, ``STEPS`` steps of the config's batch, with
the same model, data and seed (the budget in steps is what the CPU comparison uses too). Each
run goes in four resumed quarters, with a timestamped line after each, so that a run cut off
by its time limit still says how far it got and at what speed. The carried cases reach
``pretrain`` through its ``sources`` argument (``carried_cases``), held in memory.
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
from dosegym.diffusion.train_data import MemoryCase, build_cache  # noqa: E402


def carried_cases(config: str, transport: str) -> list[MemoryCase]:
    """The training cases of the carried cache, unpacked and held in memory: the cache is read
    from disk once, not at every step."""
    cfg = PretrainConfig.from_yaml(config)
    cached = build_cache(cfg, unpack(config, transport), progress=False)
    return [MemoryCase(c.key, c.label, c.model_input(cfg.model.spec)) for c in cached]


def run_config(base: PretrainConfig, objective: str, steps: int) -> PretrainConfig:
    """``base`` for one objective and a budget of ``steps`` (checkpoints each quarter)."""
    tc = base.train.model_copy(
        update={
            "steps": steps,
            "warmup_steps": min(base.train.warmup_steps, steps // 10),
            "checkpoint_every": max(steps // 4, 1),
        }
    )
    return base.model_copy(
        update={"model": base.model.model_copy(update={"objective": objective}), "train": tc}
    )


def main() -> None:
    config, transport, out_dir, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    if steps < 4:
        sys.exit(f"STEPS must be at least 4 (one per quarter), got {steps}")
    # TF32 only; cudnn.benchmark stays off (its algorithm search can take minutes for 3D
    # convolutions, pytorch/pytorch#51044; the default algorithms train this model at 0.015 s
    # per step on an H100, benchmarks/model_speed.py).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {message}", flush=True)

    cases = carried_cases(config, transport)
    log("cache unpacked")
    base = PretrainConfig.from_yaml(config)
    summary = {}
    for objective in ("diffusion", "regression"):
        cfg = run_config(base, objective, steps)
        t0 = time.perf_counter()
        for quarter in range(1, 5):
            res = train.pretrain(
                cfg,
                out_dir / objective,
                resume=quarter > 1,
                until=steps * quarter // 4,
                progress=False,
                sources=cases,
            )
            log(f"{objective}: step {res.step}/{steps}, loss {res.loss:.4f}")
        seconds = time.perf_counter() - t0
        summary[objective] = {
            "steps": res.step,
            "final_loss": res.loss,
            "seconds": seconds,
            "sec_per_step": seconds / steps,
            "cases": res.num_cases,
            "batch_size": cfg.train.batch_size,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        }
        log(f"{objective}: {summary[objective]}")
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
