"""``dosegym align --agent ddpo`` on 2 CPU processes under ``accelerate launch``
(``ACCELERATE_USE_CPU=yes accelerate launch --multi_gpu --num_processes 2``): the run trains
its whole budget (``samples_per_iteration`` is the total over the processes), only rank 0
evaluates and writes, and the checkpoint it writes resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import accelerate_launch, save_tiny_checkpoint
from safetensors.torch import load_file

from dosegym.agents.ddpo import DDPO
from dosegym.agents.lora import trained_state
from dosegym.agents.result import read_result
from dosegym.diffusion import load_pretrained

WORKER = Path(__file__).with_name("align_distributed_worker.py")
CONFIG = {"samples_per_iteration": 4, "train_batch_size": 2, "eval_every": 1, "learning_rate": 0.01}


def test_align_ddpo_on_two_processes(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "model")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(CONFIG))  # JSON is YAML
    out = tmp_path / "run"
    proc = accelerate_launch(
        WORKER, "align", "--agent", "ddpo", "--samples", "8", "--out", str(out), "--checkpoint",
        str(checkpoint), "--cases", "phantoms:headneck/0", "--eval-cases", "phantoms:headneck/28",
        "--steps", "2", "--diversity-samples", "0", "--no-progress", "--config", str(cfg),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 of 2" in proc.stdout and "rank 1 of 2" in proc.stdout  # one process group
    assert proc.stdout.count("result.json") == 1  # one process reports
    assert json.loads((out / "run.json").read_text())["num_envs"] == 2  # 4 samples / 2 processes

    doc = read_result(out)
    assert doc["samples_trained"] == 8 and doc["iterations"] == 2
    assert [c["samples"] for c in doc["curves"]] == [4, 8]
    assert [e["samples"] for e in doc["eval_history"]] == [0, 4, 8]  # one evaluation each time
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [w for w in written if w.endswith("result.json")] == ["result.json"]
    assert not [w for w in written if "partial" in w or "tmp" in w.lower()], written
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0's logger only

    # the adapter trained (it differs from the seed's start) and resumes where the run ended
    policy = load_pretrained(checkpoint)
    torch.manual_seed(0)  # as align does: the adapters' start follows the seed
    fresh = DDPO(None, policy, CONFIG)
    start = trained_state(fresh.policy.model, fresh.trains)
    trained = load_file(out / "checkpoint" / "adapter.safetensors")
    assert trained.keys() == start.keys()
    assert any(not torch.equal(v, start[k]) for k, v in trained.items())
    resumed = DDPO.load(out / "checkpoint", policy=policy, resume=True)
    assert resumed.samples_trained == 8 and resumed.iteration == 2
    assert [c["samples"] for c in resumed.curves] == [4, 8]
    now = trained_state(resumed.policy.model, resumed.trains)
    assert all(torch.equal(v, now[k]) for k, v in trained.items())
