"""Run by ``test_ddpo_distributed.py`` under ``accelerate launch --num_processes 2 --cpu``:
one DDPO iteration of the tiny model on each rank; each rank saves its trainable weights
(before and after) to ``OUT/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import make_env, tiny_policy_config  # noqa: E402

from dosegym.agents.ddpo import DDPO  # noqa: E402
from dosegym.diffusion import Any2Any, DosePolicy  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same base weights on every rank
    policy = DosePolicy(Any2Any(tiny_policy_config()), sampler="ddim", eta=1.0)
    env = make_env(policy, obs_backend="torch", pretrained_log_prob=False, reward={"w_fid": 1.0})
    config = {"samples_per_iteration": 4, "sample_num_steps": 4, "train_batch_size": 2, "learning_rate": 1e-2}
    agent = DDPO(env, policy, config)
    before = {k: v.clone() for k, v in agent.policy.model.state_dict().items() if "lora_" in k}
    infos = []
    agent.learn(4, callback=lambda a, info: infos.append(info))
    after = {k: v.clone() for k, v in agent.policy.model.state_dict().items() if "lora_" in k}
    rank = agent.rank
    torch.save(
        {
            "before": before,
            "after": after,
            "world": agent.optim.world_size,
            "reward_mean": infos[0]["reward_mean"],
            "first_seed": agent.rollout_seed(0),
        },  # fmt: skip
        out / f"rank{rank}.pt",
    )
    agent.save(out / "agent")  # rank 0 only


if __name__ == "__main__":
    main(Path(sys.argv[1]))
