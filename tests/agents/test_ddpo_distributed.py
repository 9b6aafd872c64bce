"""DDPO on 2 CPU processes under ``accelerate launch`` (``ACCELERATE_USE_CPU=yes accelerate
launch --multi_gpu --num_processes 2``: accelerate's ``--cpu`` alone runs one process): both
ranks end with the same trainable weights, changed from the start, and only rank 0 writes."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import accelerate_launch

WORKER = Path(__file__).with_name("ddpo_distributed_worker.py")


def test_two_cpu_processes_end_with_identical_trained_weights(tmp_path):
    proc = accelerate_launch(WORKER, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["first_seed"] != r1["first_seed"]  # each rank rolls out its own episodes
    assert r0["reward_mean"] == r1["reward_mean"]  # metrics over both ranks' samples
    for k, v in r0["after"].items():
        assert torch.equal(v, r1["after"][k]), k  # gradients were all-reduced
    assert any(not torch.equal(v, r0["before"][k]) for k, v in r0["after"].items())
    assert (tmp_path / "agent" / "agent.json").is_file()
