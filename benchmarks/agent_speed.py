"""Rollout and training speed of the learning agents against the raw sampler (issue 17 "Speed").

Measured in one run, on one model and case, at one batch size B and ``--steps`` sampler
steps (DDIM, eta 1), with ``reward.w_kl = 0`` (the env never runs the frozen model):

* **raw sampler**: ``ReverseChain`` of the same model, B chains in lockstep, on-policy
  (``chain.run()``: one model forward + ``reverse_step`` per step; no decoding, no scoring),
  on B materialised copies of the case's conditions, as the env batches them (a stride-0
  ``expand`` of one case runs the model ~8 % faster at B = 8 than B real copies; training
  batches hold different cases);
* **rollout** of each agent: B whole episodes through its env, what the agent's training
  collects before it updates: DDPO ``dosegym.agents.rollout.collect`` (of
  ``agent.sampling_policy()``, the adapters merged) on the DenoiseDose vector env (its own
  step Gaussian each step, the trajectory kept, the final dose decoded and scored); the SB3
  agents (``ppo`` on DenoiseDose, ``ppo_guided`` and ``sac_guided`` on GuidedDose) one
  ``learn`` iteration of B episodes minus the time SB3 spends in its update
  (``model.train``, timed by wrapping it), i.e. SB3's ``collect_rollouts`` phase. GuidedDose
  steps also compute the soft-scorecard guidance, so their ratio is below DenoiseDose's by
  that cost;
* **training**: a whole ``learn`` iteration of B samples (rollout + update) over its wall time.
  GRPO times its rollout as DDPO does; DRaFT's rollout carries its gradient (no separate
  update) and DiffusionNFT's rollout is the phase before its ``update``, both on the
  ScorecardBandit vector env (a whole dose an episode);
* **peak memory**: each agent runs in its own process (this script with ``--child``), whose
  peak resident memory (``ru_maxrss``, the model, its env and B episodes at the default grid)
  is printed beside its times (on CUDA also ``torch.cuda.max_memory_allocated``).

Each repeat times the raw sampler and the agent alternately (so load changes hit both); the
table shows medians, samples/s and the ratios agent / raw (target: rollout >= 0.9x). The
first iteration of each agent (setup, case preparation) is a warm-up and not timed.

Model: the shipped checkpoint when there is one, else random weights from ``--config``
(``--random`` forces random weights); timing does not depend on the weights.

    PYTHONPATH=. python benchmarks/agent_speed.py [--batch 8] [--steps 10] [--repeats 3]
        [--threads 1] [--device cpu] [--agents ddpo,ppo,ppo_guided,sac_guided,grpo,draft,nft]
        [--config configs/pretrain_cpu.yaml] [--random]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import ROOT, build_policy, the_case
from env_overhead import Timer

from dosegym.agents import registry
from dosegym.agents.rollout import collect
from dosegym.diffusion import DosePolicy, seeded_generator
from dosegym.diffusion.chain import ReverseChain
from dosegym.envs.bandit import ScorecardBanditVectorEnv
from dosegym.envs.denoise import DenoiseDoseVectorEnv
from dosegym.envs.guided import GuidedDoseVectorEnv

AGENTS = ("ddpo", "ppo", "ppo_guided", "sac_guided", "grpo", "draft", "nft")
#: Agents whose update is their own ``update`` method (the rest: SB3's ``model.train``; DRaFT none).
OWN_UPDATE = ("ddpo", "grpo", "nft")
#: Per-agent config fields that make one iteration B samples with a small update.
FIELDS: dict[str, dict[str, Any]] = {
    "ddpo": {"train_batch_size": 2},
    "ppo": {"batch_size": 2},
    "ppo_guided": {"batch_size": 2},
    "sac_guided": {"learning_starts": 0},
    "grpo": {"train_batch_size": 2, "samples_per_case": 2, "train_last_k": 1},
    "draft": {"reward": {"score": "dense", "w_fid": 1.0, "fidelity": "reference"}},
    "nft": {"samples_per_case": 2, "reward": {"score": "dense", "w_fid": 1.0, "fidelity": "reference"}},
}


def make_agent(name: str, policy: DosePolicy, case, b: int, steps: int) -> Any:
    """Agent ``name`` on its native vector env of ``b`` episodes on ``case``."""
    cls = registry.get(name)
    config = cls.Config.coerce({"samples_per_iteration": b, "sample_num_steps": steps, **FIELDS[name]})
    kw = dict(policy=policy, cases=[case], steps=steps, reward=config.reward_config())
    if cls.env_kind == "denoise":
        env = DenoiseDoseVectorEnv(num_envs=b, obs_backend="torch", pretrained_log_prob=False, **kw)
    elif cls.env_kind == "bandit":
        env = ScorecardBanditVectorEnv(num_envs=b, **kw)
    else:
        env = GuidedDoseVectorEnv(num_envs=b, **kw)
    return cls(env, policy, config)


def raw_sampler(policy: DosePolicy, cond, steps: int, seed: int) -> None:
    chain = ReverseChain(policy.model, steps, "ddim", eta=1.0)
    chain.start(cond, seeded_generator(seed))
    chain.run()


def timed_update(agent: Any) -> list[float]:
    """Wrap the agent's update (``update`` of DDPO, GRPO, NFT; SB3's ``model.train``); the list
    its seconds go to (stays empty for DRaFT, whose rollout carries the gradient)."""
    spent: list[float] = []
    if agent.name == "draft":
        return spent
    owner = agent if agent.name in OWN_UPDATE else agent.model
    name = "update" if agent.name in OWN_UPDATE else "train"
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)
    return spent


def measure(name: str, policy: DosePolicy, case, b: int, steps: int, repeats: int, device: str) -> dict:
    """Median seconds of the raw sampler, the agent's rollout and its training iteration."""
    timer = Timer(device)
    one = policy.conditions(case).expand(b)
    cond = dataclasses.replace(one, tensors={k: v.contiguous() for k, v in one.tensors.items()})
    agent = make_agent(name, policy, case, b, steps)
    agent.learn(b)  # warm-up: setup, case preparation, SB3's model
    spent = timed_update(agent)
    raw, rollout, train = [], [], []
    for rep in range(repeats):
        raw.append(timer(raw_sampler, policy, cond, steps, rep))
        if name in ("ddpo", "grpo"):
            sampling = agent.sampling_policy()
            rollout.append(timer(collect, agent.env, sampling, [1000 + rep], agent.config.sample_eta))
        spent.clear()
        train.append(timer(agent.learn, b))
        if name not in ("ddpo", "grpo"):
            rollout.append(train[-1] - sum(spent))
    agent.env.close()
    med = statistics.median
    out = {"raw": med(raw), "rollout": med(rollout), "train": med(train)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _passed(args: argparse.Namespace) -> list[str]:
    """The options of this run, for a child process."""
    out = ["--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--device", args.device, "--config", str(args.config)]  # fmt: skip
    return out + (["--random"] if args.random else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="B: episodes per rollout and iteration")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps per episode")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per agent")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--agents", default=",".join(AGENTS), help=f"agents to time, of {list(AGENTS)}")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "pretrain_cpu.yaml")
    ap.add_argument("--random", action="store_true", help="random weights even with a checkpoint")
    ap.add_argument("--child", action="store_true", help="(internal) time one agent, print its JSON")
    args = ap.parse_args()
    names = [a for a in args.agents.split(",") if a]
    unknown = sorted(set(names) - set(AGENTS))
    if unknown:
        ap.error(f"--agents: unknown {unknown}; valid: {list(AGENTS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    policy, model_name = build_policy(args.config, args.device, random=args.random)
    policy.model.eval()
    case, case_name = the_case()
    b, steps = args.batch, args.steps
    if args.child:
        print(json.dumps(measure(names[0], policy, case, b, steps, args.repeats, args.device)))
        return
    print(f"model: {model_name}; grid {policy.spec.shape}; case: {case_name} {case.grid.shape}")
    threads = torch.get_num_threads()
    print(f"device {args.device}, torch threads {threads}, B = {b}, {steps} steps, w_kl = 0\n")
    head = f"{'agent':<11} {'raw ms':>9} {'rollout ms':>11} {'train ms':>10} {'raw s/s':>8} "
    print(
        head + f"{'rollout s/s':>12} {'train s/s':>10} {'rollout/raw':>12} {'train/raw':>10} {'peak MB':>8}"
    )
    for name in names:
        child = [sys.executable, __file__, "--child", "--agents", name, *_passed(args)]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{name:<11} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        sps = {k: b / r[k] for k in ("raw", "rollout", "train")}
        print(
            f"{name:<11} {r['raw'] * 1e3:9.1f} {r['rollout'] * 1e3:11.1f} {r['train'] * 1e3:10.1f} "
            f"{sps['raw']:8.2f} {sps['rollout']:12.2f} {sps['train']:10.2f} "
            f"{sps['rollout'] / sps['raw']:12.3f} {sps['train'] / sps['raw']:10.3f} {r['peak_rss_mb']:8.0f}"
        )
    print(
        "\ns/s = samples (whole episodes) per second; rollout/raw: target >= 0.9 (DenoiseDose agents; "
        "GuidedDose adds its guidance); train = rollout + update of one learn iteration."
    )


if __name__ == "__main__":
    main()
