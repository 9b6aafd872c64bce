#!/usr/bin/env python3
"""How much of a DDPO policy gradient is signal at a given batch size (issue 17).

DDPO's gradient is a score-function estimate: ``-mean_i A_i * grad log p(x_prev | x_t)`` over
rollout samples, each step's action a whole dose volume (the shipped model: 48 x 64 x 64
voxels of independent noise). This script draws ``--batches`` independent rollout batches of
the same cases (``--cases-per-batch`` cases x ``--samples-per-case`` samples, advantages
normalised per case as DDPO's per-case stat tracking does once it has its counts), computes
each batch's gradient over the LoRA adapters (rank and targets of ``--config``, adapters at
their initial state: the gradient of the first update) on the same ``--trained-steps`` chain
steps, and prints the mean pairwise cosine ``c`` between the batches' gradients, for each
reward:

* ``env``: the episode return of the run's reward (``--config``'s ``reward``: the dense card
  score and its terms), what DDPO trains on;
* ``mean_dose``: the mean of the final dose (model grid, normalised units), a reward whose
  gradient direction is the same in every voxel (a control with signal);
* ``random``: independent standard-normal rewards (the null: no signal, ``c`` near 0 within
  the estimate's own noise).

Reading it: for independent estimates ``g_i = g + noise_i``, ``E[g_i . g_k] = |g|^2`` and
``E|g_i|^2 = |g|^2 + S / n`` (n samples a batch, ``S`` the per-sample noise power), so the
signal share ``c = mean_pairs(g_i . g_k) / mean_i |g_i|^2`` estimates ``|g|^2 / (|g|^2 + S / n)``
and ``r = n (1 - c) / c`` is the number of samples a batch at which an estimate is half signal
(``c_r = 0.5``: cosine 0.71 to the true gradient); the table prints it with the pairwise
cosines. Each reward's ``c`` and ``r`` are measured in the same run.

    PYTHONPATH=. python benchmarks/gradient_agreement.py [--batches 4] [--cases-per-batch 2]
        [--samples-per-case 4] [--trained-steps 5] [--threads 1] [--config dosegym/agents/configs/ddpo.yaml]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import ROOT

from dosegym.agents import registry
from dosegym.agents.rollout import Rollouts, collect, step_gaussian
from dosegym.agents.stat_tracking import PerCaseStatTracker
from dosegym.cli.align import case_refs, make_env
from dosegym.diffusion import load_pretrained
from dosegym.diffusion.schedulers import gaussian_log_prob

REWARDS = ("env", "mean_dose", "random")


def gradient(agent, ro: Rollouts, adv: np.ndarray, steps: list[int], minibatch: int) -> torch.Tensor:
    """The flattened gradient over the agent's trainable parameters of DDPO's score-function
    loss ``-mean_i A_i log p_i`` summed over ``steps`` (the IS loss's gradient at ratio 1)."""
    params = agent.parameters()
    for p in params:
        p.grad = None
    model, scheduler, eta = agent.policy.model, agent.env.core.chain.scheduler, agent.config.sample_eta
    a = torch.as_tensor(adv, dtype=torch.float32)
    n = len(ro)
    for start in range(0, n, minibatch):
        idx = torch.arange(start, min(start + minibatch, n))
        cond = ro.conditions(idx, agent.policy.device)
        for s in steps:
            mean, std = step_gaussian(model, scheduler, ro.x_t[idx, s], ro.timesteps[s], cond, eta)
            log_prob = gaussian_log_prob(ro.x_prev[idx, s], mean, std)
            (-(a[idx] * log_prob).sum() / n).backward()
    # a parameter outside the graph (an adapter of a modality these cases lack) has no gradient
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    ).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "dosegym" / "agents" / "configs" / "ddpo.yaml")
    ap.add_argument(
        "--cases", default="phantoms:headneck/train", help="case source (the first cases are used)"
    )
    ap.add_argument("--scorecard", default="phantom_headneck")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--cases-per-batch", type=int, default=2)
    ap.add_argument("--samples-per-case", type=int, default=4)
    ap.add_argument(
        "--trained-steps", type=int, default=5, help="chain steps in each gradient (evenly spaced)"
    )
    ap.add_argument("--minibatch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cls = registry.get("ddpo")
    b = args.cases_per_batch * args.samples_per_case
    cfg = cls.Config.coerce(
        cls.Config.from_yaml(args.config), samples_per_iteration=b, train_batch_size=args.minibatch
    )
    policy = load_pretrained(eta=cfg.sample_eta)
    env = make_env(
        "denoise", b, policy=policy, cases=case_refs(args.cases, "--cases"), scorecard=args.scorecard,
        steps=cfg.sample_num_steps, reward=cfg.reward_config(),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    agent = cls(env, policy, cfg)
    n_steps = cfg.sample_num_steps
    steps = sorted({int(round(x)) for x in np.linspace(0, n_steps - 1, args.trained_steps)})
    picks = [int(i) for i in np.repeat(np.arange(args.cases_per_batch), args.samples_per_case)]
    print(
        f"{cls.name} config {args.config.name}: {b} samples a batch ({args.cases_per_batch} cases x "
        f"{args.samples_per_case}), {n_steps} DDIM steps at eta {cfg.sample_eta}, trained steps {steps}, "
        f"{sum(p.numel() for p in agent.parameters()):,} trainable parameters, {args.threads} thread(s)"
    )
    grads: dict[str, list[torch.Tensor]] = {r: [] for r in REWARDS}
    t0 = time.perf_counter()
    for j in range(args.batches):
        # a vector env seeds sub-env i with seed + i: batch seeds far apart share no episode
        ro = collect(env, agent.sampling_policy(), [10_000 + 1_000 * j], cfg.sample_eta, [picks])
        rewards = {
            "env": ro.rewards,
            "mean_dose": ro.x0.double().mean(dim=(1, 2, 3, 4)).numpy(),
            "random": np.random.default_rng(j).standard_normal(len(ro)),
        }
        for r in REWARDS:
            # fresh per-case statistics of this batch alone (DDPO's tracker once it has its counts)
            adv = PerCaseStatTracker(b, args.samples_per_case).update(ro.case_keys, rewards[r])
            grads[r].append(gradient(agent, ro, adv, steps, args.minibatch))
        spread = {r: float(np.ptp(v)) for r, v in rewards.items()}
        print(
            f"  batch {j + 1}/{args.batches} done at {time.perf_counter() - t0:.0f} s; reward spread {spread}"
        )
    env.close()
    head = "| reward | batches | samples a batch | signal share c | pairwise cosines (mean, min..max) "
    head += "| samples for c = 0.5 |"
    print("\n" + head + "\n" + "|---" * 6 + "|")
    for r in REWARDS:
        g = grads[r]
        pairs = list(itertools.combinations(range(len(g)), 2))
        cos = [float(torch.nn.functional.cosine_similarity(g[i], g[k], dim=0)) for i, k in pairs]
        # E[g_i . g_k] = |g|^2 and E|g_i|^2 = |g|^2 + noise: their ratio is the signal share
        c = float(np.mean([float(g[i] @ g[k]) for i, k in pairs]) / np.mean([float(x @ x) for x in g]))
        need = f"{b * (1 - c) / c:,.0f}" if c > 0 else "inf (no signal measured)"
        cells = f"{np.mean(cos):.4f} ({min(cos):.4f}..{max(cos):.4f})"
        print(f"| {r} | {len(g)} | {b} | {c:.4f} | {cells} | {need} |")


if __name__ == "__main__":
    main()
