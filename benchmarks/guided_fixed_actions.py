#!/usr/bin/env python3
"""What constant GuidedDose actions score: the room a guided agent has, and where it starts.

Each row is a policy that plays the same action at every step (10 guidance weights, one per
objective group of ``dosegym.scorecards.groups.GROUP_NAMES``; action -1 = weight 0, +1 = weight
1), evaluated exactly as ``dosegym align`` evaluates a guided agent (``PPOGuided.predict``:
DDIM ``sample_num_steps`` steps at ``predict_eta``, the agent's ``guidance_scale``; eval seed 0;
mean normalised exact card score and MAE to the reference, Gy). Rows:

* ``unguided`` (all -1): what ``dosegym align`` reports as a guided agent's "before";
* ``all 0.5`` (all 0): an untrained SB3 Gaussian policy's deterministic action (mean 0);
* ``all 1`` (all +1);
* ``targets 1`` (the targets group +1, the others -1).

    PYTHONPATH=. python benchmarks/guided_fixed_actions.py [--config dosegym/agents/configs/ppo_guided.yaml]
        [--eval-cases phantoms:headneck/test] [--scorecard phantom_headneck] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import ROOT

from dosegym.agents import registry
from dosegym.agents.evaluate import evaluate
from dosegym.cli.align import case_refs, make_env
from dosegym.diffusion import load_pretrained
from dosegym.scorecards.groups import GROUP_NAMES


class Constant:
    """Stands in for SB3's model in ``SB3Guided.predict``: the same action at every step."""

    def __init__(self, action: np.ndarray) -> None:
        self.action = np.asarray(action, np.float32)

    def predict(self, obs, deterministic: bool = True):
        return self.action[None], None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configs = ROOT / "dosegym" / "agents" / "configs"
    ap.add_argument("--config", type=Path, default=configs / "ppo_guided.yaml")
    ap.add_argument("--eval-cases", default="phantoms:headneck/test")
    ap.add_argument("--scorecard", default="phantom_headneck")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cls = registry.get("ppo_guided")
    refs = case_refs(args.eval_cases, "--eval-cases")
    cfg = cls.Config.coerce(cls.Config.from_yaml(args.config), eval_cases=refs)
    policy = load_pretrained(eta=cfg.sample_eta)
    env = make_env(
        "guided", 1, policy=policy, cases=refs, scorecard=args.scorecard, steps=cfg.sample_num_steps,
        reward=cfg.reward_config(),
    )  # fmt: skip
    agent = cls(env, policy, cfg)
    cases = agent.eval_cases()
    n = len(GROUP_NAMES)
    targets = -np.ones(n)
    targets[GROUP_NAMES.index("targets")] = 1.0
    rows = {"unguided": -np.ones(n), "all 0.5": np.zeros(n), "all 1": np.ones(n), "targets 1": targets}
    print(
        f"{len(cases)} cases of {args.eval_cases}, card {args.scorecard}, {cfg.sample_num_steps} steps, "
        f"guidance_scale {cfg.guidance_scale}, predict_eta {cfg.predict_eta}\n"
    )
    print("| constant action | weights | score | MAE Gy | outside targets Gy (reference) | s |")
    print("|---|---|---|---|---|---|")
    for name, action in rows.items():
        agent.model = Constant(action)
        t0 = time.perf_counter()
        s = evaluate(agent, cases).summary()
        weights = ",".join(f"{(a + 1) / 2:g}" for a in action)
        out = f"{s['outside_targets_gy']:.2f} ({s['reference_outside_targets_gy']:.2f})"
        print(
            f"| {name} | {weights} | {s['score_mean']:.3f} | {s['mae_gy']:.2f} | {out} | "
            f"{time.perf_counter() - t0:.0f} |"
        )
    env.close()


if __name__ == "__main__":
    main()
