"""``dosegym align`` end to end on a tiny model checkpoint: best_of_n and a test learner.

``Plumbing`` is a test agent written against the shared learning-loop contract (issue 17):
``learn`` runs whole iterations of one batched rollout through the env (seeded from
``(config.seed, iteration)``) and one Adam step, appends the info dict to ``curves``,
evaluates every ``eval_every`` iterations and after the last (``eval_history``, ``info["eval"]``)
and calls ``callback(agent, info)``; ``save(..., training_state=True)`` / ``load(...,
resume=True)`` keep the optimizer, iteration, curves and wall time. (Hand-written until
``Agent`` has the template; then only ``train_iteration`` stays.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_checkpoint
from typer.testing import CliRunner

from dosegym import agents
from dosegym.agents.base import Agent
from dosegym.agents.evaluate import PolicyPredictor, evaluate
from dosegym.agents.result import read_result
from dosegym.cli.main import app
from dosegym.data import read_case
from dosegym.diffusion import load_pretrained

STATE = "training_state.pt"


@agents.register("plumbing")
class Plumbing(Agent):
    """See the module docstring."""

    def train_iteration(self) -> dict[str, float]:
        env = self.env
        obs, _ = env.reset(seed=self.rollout_seed(0))
        for _ in range(self.config.sample_num_steps):
            mean, std = env.policy_step(obs)
            obs, rewards, _, _, infos = env.step(mean + std * env.sample_noise())
        params = self.parameters()
        loss = (1.0 - float(rewards.mean())) * sum((p**2).sum() for p in params)
        self.optim.set_iteration(self.iteration, self.total_iterations)
        grad_norm = self.optim.backward(loss, f"iteration {self.iteration + 1}")
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "score_mean": float(np.mean(infos["score_normalised"])),
            "kl_mean": float("nan"),
            "mae_gy": float(np.mean(infos["reference_mae_gy"])),
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "tied_fraction": float(np.ptp(rewards) == 0),
        }


runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def align(checkpoint: Path, out: Path, *extra: str, samples: int = 4, agent: str = "plumbing"):
    args = [
        "align", "--agent", agent, "--samples", str(samples), "--out", str(out),
        "--checkpoint", str(checkpoint), "--cases", "phantoms:headneck/0", "--eval-cases",
        "phantoms:headneck/28", "--steps", "2", "--diversity-samples", "2", "--no-progress", *extra,
    ]  # fmt: skip
    return runner.invoke(app, args)


def write_config(path: Path, **fields) -> Path:
    fields = {"samples_per_iteration": 2, "eval_every": 1, "learning_rate": 0.01, **fields}
    path.write_text(json.dumps(fields))  # JSON is YAML
    return path


def adapter(folder: Path) -> bytes:
    return (folder / "checkpoint" / "adapter.safetensors").read_bytes()


def test_a_learner_run_writes_a_valid_result_tensorboard_and_checkpoint(tiny_checkpoint, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    r = align(tiny_checkpoint, out, "--config", str(cfg), "--num-envs", "2")
    assert r.exit_code == 0, r.output
    doc = read_result(out)
    assert doc["agent"] == "plumbing" and doc["samples_trained"] == 4 and doc["iterations"] == 2
    assert doc["config"]["sample_num_steps"] == 2 and doc["config"]["eval_cases"] == ["phantoms:headneck/28"]
    assert doc["train_cases"] == ["phantoms:headneck/0"] and doc["base_checkpoint"] == str(tiny_checkpoint)
    assert [c["samples"] for c in doc["curves"]] == [2, 4]
    assert [e["samples"] for e in doc["eval_history"]] == [0, 2, 4]  # before, then every iteration
    assert doc["before"]["summary"]["diversity_gy"] > 0
    assert doc["after"]["cases"][0]["case_id"] == "headneck_028"
    assert (out / "checkpoint" / STATE).is_file() and (out / "run.json").is_file()
    events = EventAccumulator(str(out / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/reward_mean", "eval/score_mean", "eval/mae_gy"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/score_mean")] == [0, 2, 4, 4]  # before, every eval, after
    assert list((out / "tb" / "hparams").glob("events.out.tfevents.*"))  # the hyperparameter table
    assert "eval score" in r.output and "result.json" in r.output
    # --eval-every overrides the config's eval_every: before and after only
    sparse = tmp_path / "sparse"
    r = align(tiny_checkpoint, sparse, "--config", str(cfg), "--num-envs", "2", "--eval-every", "5")
    assert r.exit_code == 0, r.output
    doc = read_result(sparse)
    assert doc["config"]["eval_every"] == 5 and [e["samples"] for e in doc["eval_history"]] == [0, 4]


def test_resume_continues_exactly(tiny_checkpoint, tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert align(tiny_checkpoint, whole, "--config", str(cfg), samples=4).exit_code == 0
    assert align(tiny_checkpoint, split, "--config", str(cfg), samples=2).exit_code == 0
    again = align(tiny_checkpoint, split, "--config", str(cfg))
    assert again.exit_code == 2 and "--resume" in again.output  # an earlier run is not overwritten
    r = align(tiny_checkpoint, split, "--config", str(cfg), "--resume", samples=4)
    assert r.exit_code == 0, r.output
    a, b = read_result(whole), read_result(split)
    drop = ("wall_s",)
    assert [{k: v for k, v in c.items() if k not in drop} for c in a["curves"]] == [
        {k: v for k, v in c.items() if k not in drop} for c in b["curves"]
    ]
    assert a["before"] == b["before"] and a["after"] == b["after"]
    assert adapter(whole) == adapter(split)


def test_resume_with_another_config_is_refused_unless_forced(tiny_checkpoint, tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    assert align(tiny_checkpoint, out, "--config", str(cfg), samples=2).exit_code == 0
    r = align(tiny_checkpoint, out, "--config", str(cfg), "--resume", "--seed", "5")
    assert r.exit_code == 2 and "config.seed: 0 -> 5" in r.output and "--force" in r.output
    rank2 = write_config(tmp_path / "r.yaml", lora_rank=2)
    r = align(tiny_checkpoint, out, "--config", str(rank2), "--resume")
    assert r.exit_code == 2 and "cannot change what trains: lora_rank: 8 -> 2" in r.output
    r = align(tiny_checkpoint, out, "--config", str(cfg), "--resume", "--seed", "5", "--force")
    assert r.exit_code == 0, r.output
    assert read_result(out)["seed"] == 5 and read_result(out)["samples_trained"] == 4


def test_best_of_n_run(tiny_checkpoint, tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("n: 2\n")
    out = tmp_path / "bon"
    r = align(tiny_checkpoint, out, "--config", str(cfg), agent="best_of_n")
    assert r.exit_code == 0, r.output
    doc = read_result(out)
    assert doc["agent"] == "best_of_n" and doc["config"]["n"] == 2 and doc["samples_trained"] == 4
    assert not (out / "checkpoint").exists()  # nothing trains
    # "before" is the pretrained policy's own single sample (what Best-of-N is compared with)
    policy = load_pretrained(tiny_checkpoint)
    case = read_case("phantoms:headneck/28")
    pretrained = evaluate(PolicyPredictor(policy, steps=2), [case], diversity_samples=2).summary()
    for key in ("score_mean", "mae_gy", "diversity_gy"):
        assert doc["before"]["summary"][key] == pytest.approx(pretrained[key], rel=1e-9), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "nope"], "unknown agent 'nope'; valid: ["),
        (["--scorecard", "nope"], "unknown scorecard 'nope'"),
        (["--cases", "phantoms:brain"], "--cases: case source 'phantoms:brain'"),
        (["--cases", "phantoms:headneck/3", "--eval-cases", "phantoms:headneck/val"], "unknown split 'val'"),
        (["--eval-seeds", "0,0"], "--eval-seeds '0,0': give distinct integers"),
        (["--steps", "100000"], "--steps (sample_num_steps) must be an integer in [1, "),
        (["--resume"], "no earlier align run to resume"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, args, message):
    r = runner.invoke(
        app,
        ["align", "--agent", "best_of_n", "--samples", "4", "--out", str(tmp_path / "o"), "--checkpoint",
         str(tiny_checkpoint), "--no-progress", *args],
    )  # fmt: skip
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output and not (tmp_path / "o" / "result.json").exists()


def test_bad_config_field_and_out_are_refused_before_any_work(tiny_checkpoint, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampels_per_iteration: 2\n")
    r = align(tiny_checkpoint, tmp_path / "o", "--config", str(cfg))
    assert r.exit_code == 2 and "unknown field 'sampels_per_iteration'" in r.output
    assert "valid fields" in r.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    r = align(tiny_checkpoint, mine, "--agent", "nope")
    assert r.exit_code == 2 and "not an earlier dosegym align output" in " ".join(r.output.split())
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("agent", "fields"),
    [
        ("ddpo", {"train_batch_size": 2}),
        ("ppo", {"batch_size": 2}),
        ("ppo_guided", {}),
        ("sac_guided", {"learning_starts": 0}),
        ("draft", {"sample_num_steps": 3, "draft_k": 2}),
        ("grpo", {"train_batch_size": 2, "samples_per_case": 2, "train_last_k": 1}),
        ("nft", {"samples_per_case": 2, "timesteps_per_sample": 1}),
    ],
)
def test_every_registered_learner_runs_through_align(tiny_checkpoint, tmp_path, agent, fields):
    cfg = write_config(tmp_path / "c.yaml", **fields)
    out = tmp_path / agent
    r = align(
        tiny_checkpoint, out, "--config", str(cfg), "--num-envs", "2", "--diversity-samples", "0", agent=agent
    )
    assert r.exit_code == 0, r.output
    doc = read_result(out)
    assert doc["agent"] == agent and doc["samples_trained"] == 4 and len(doc["curves"]) == 2
    assert all(math.isfinite(c["reward_mean"]) for c in doc["curves"])
    assert (out / "checkpoint" / "training_state.pt").is_file()
