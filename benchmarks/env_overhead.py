"""Overhead of the dose environments over the raw sampler, and vector-env throughput.

Baseline (measured in the same run, same model, same batch size B, alternating with the env
so that load changes hit both alike): one reverse step done by hand, ``model(x, t, cond)`` +
``reverse_step`` (DDIM, eta = 1) on tensors.

* **step overhead**, for every env kind at B = 1 (the single env) and B = 8 (its native
  vector env), numpy observations:

  - DenoiseDose, GuidedDose: the median, over the mid-episode steps of every round, of the
    ratio of ``env.step(action)``'s time to the baseline step's just before it at the same
    timestep (paired ratios: a load change between rounds hits both sides of a pair alike;
    the ms columns are the plain medians). GuidedDose also against the guided step done by hand (the
    baseline step plus ``SoftScorer.guidance`` of the batch and the step to the
    moved x̂0, ``mean + mean_x0_gain * delta``): what the env adds over the guidance it must
    compute. ``env.step`` checks the
    action, runs the pretrained forward
    (log-probability; GuidedDose: the soft-scorecard gradients of every objective group and
    the guided step), advances and copies the observation to numpy. The last step (decode +
    scorecard) is timed separately.
  - ScorecardBandit (no chain: the agent brings the dose): the median, over rounds, of the
    time of ``reset`` + the baseline chain of ``steps`` steps + ``step(dose)`` over the time of
    the baseline chain alone just before it; its last step is the ``step`` (decode + scorecard).

* **episode throughput**: whole episodes per second (reset, then each step the kind's
  actions: DenoiseDose on-policy ``policy_step`` + ``sample_noise``, GuidedDose fixed
  weights, the Bandit a fixed dose; scoring at the end) of the vector env with B = 8 against
  8 single envs run one after another, and their ratio.

Model: the shipped checkpoint when there is one, else random weights built from
``configs/pretrain_cpu.yaml`` (``--config``), else from ``configs/pretrain_tiny.yaml``; the
script says which. Timing does not depend on the weights. Case: OpenKBP ``pt_108`` from
``../shared/data`` when present, else a generated head-and-neck phantom.

    PYTHONPATH=. python benchmarks/env_overhead.py [--steps 4] [--repeats 1] [--threads 1]
        [--device cpu] [--kinds denoise,guided,bandit] [--config configs/pretrain_cpu.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import ROOT, build_policy, the_case

from dosegym.diffusion import DosePolicy, seeded_generator
from dosegym.diffusion.schedulers import make_scheduler, mean_x0_gain, reverse_step
from dosegym.diffusion.slots import make_resampler
from dosegym.envs.bandit import ScorecardBanditEnv, ScorecardBanditVectorEnv
from dosegym.envs.cards import CardChooser
from dosegym.envs.denoise import DenoiseDoseEnv, DenoiseDoseVectorEnv
from dosegym.envs.guidance import SoftScorer
from dosegym.envs.guided import GuidedConfig, GuidedDoseEnv, GuidedDoseVectorEnv

KINDS = {
    "denoise": ("DenoiseDose", DenoiseDoseEnv, DenoiseDoseVectorEnv),
    "guided": ("GuidedDose", GuidedDoseEnv, GuidedDoseVectorEnv),
    "bandit": ("ScorecardBandit", ScorecardBanditEnv, ScorecardBanditVectorEnv),
}


class Timer:
    """Wall-clock seconds of calls, synchronising CUDA around each."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[..., Any], *args: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def fixed_action(kind: str, env: Any, obs: dict[str, Any]) -> Any:
    """The kind's timing action: DenoiseDose stays near x_t, GuidedDose half weights, the
    Bandit a flat dose at 0.9 x Rx."""
    if kind == "denoise":
        return np.clip(obs["x_t"], -1.0, 1.0)
    shape = env.action_space.shape
    return np.zeros(shape, np.float32) if kind == "guided" else np.full(shape, 0.9, np.float32)


def run_episode(kind: str, env: Any, seed: int | None = None) -> None:
    obs, _ = env.reset(seed=seed)
    done = False
    while not done:
        if kind == "denoise":
            mean, std = env.unwrapped.policy_step(obs) if hasattr(env, "unwrapped") else env.policy_step(obs)
            noise = env.unwrapped.sample_noise() if hasattr(env, "unwrapped") else env.sample_noise()
            action = mean + std * noise
        else:
            action = fixed_action(kind, env, obs)
        obs, _, terminated, _, _ = env.step(action)
        done = bool(np.all(terminated))


def measure(policy: DosePolicy, case, kind: str, b: int, steps: int, repeats: int, device: str) -> dict:
    """Raw and env timings (s) of ``kind`` at batch ``b``: raw step, env step, last step."""
    timer = Timer(device)
    cond = policy.conditions(case)
    cond = cond.expand(b) if b > 1 else cond
    scheduler = make_scheduler("ddim", policy.model.config.diffusion)
    scheduler.set_timesteps(steps, device=torch.device(device))
    gen = seeded_generator(0)
    state: dict[str, torch.Tensor] = {}

    def raw_step(t: torch.Tensor) -> None:
        with torch.no_grad():
            x = state["x"]
            out = policy.model(x, t, cond)
            noise = torch.randn(x.shape, generator=gen).to(x.device)
            state["x"] = reverse_step(scheduler, out, t, x, eta=policy.eta, variance_noise=noise).prev_sample

    scorer = None
    if kind == "guided":
        scorer = SoftScorer(CardChooser(None).card_for(case), case, make_resampler(case, policy.spec), 1.0)

    def raw_guided_step(t: torch.Tensor) -> None:
        """The guided step by hand: forward, each group's direction, the step to the moved x̂0."""
        assert scorer is not None
        x = state["x"]
        with torch.no_grad():
            d = reverse_step(scheduler, policy.model(x, t, cond), t, x, eta=policy.eta)
        delta = scorer.guidance(d.pred_original_sample)[1].combine(
            torch.full((b, len(scorer.soft.groups)), 0.5)
        )
        mean = d.mean + mean_x0_gain(scheduler, t, x, eta=policy.eta) * (GuidedConfig.guidance_scale * delta)
        state["x"] = mean + d.std * torch.randn(x.shape, generator=gen).to(x.device)

    def raw_chain() -> None:
        state["x"] = policy.initial_noise(b, gen)
        for t in scheduler.timesteps:
            raw_step(t)

    _, single, vector = KINDS[kind]
    kw = dict(policy=policy, cases=[case], steps=steps, device=device)
    env = single(**kw) if b == 1 else vector(num_envs=b, **kw)
    obs, _ = env.reset(seed=0)
    action = fixed_action(kind, env, obs)
    raw_chain()  # warm-up
    raw, mid, last, guided = [], [], [], []

    def bandit_episode(seed: int, dose: np.ndarray) -> None:
        env.reset(seed=seed)
        raw_chain()
        env.step(dose)

    ratio, ratio_guided = [], []  # env / raw (and / raw guided) of back-to-back timings
    for rep in range(repeats):
        if kind == "bandit":
            dose = np.clip(state["x"].cpu().numpy(), 0.0, env.action_space.high.flat[0])
            dose = dose[0] if b == 1 else dose
            raw.append(timer(raw_chain))
            mid.append(timer(bandit_episode, rep, dose))
            ratio.append(mid[-1] / raw[-1])
            env.reset(seed=rep)
            last.append(timer(env.step, dose))
            continue
        env.reset(seed=rep)
        state["x"] = policy.initial_noise(b, gen)
        for k, t in enumerate(scheduler.timesteps):
            raw.append(timer(raw_step, t))
            if scorer is not None and k < steps - 1:
                x = state["x"]
                guided.append(timer(raw_guided_step, t))
                state["x"] = x
            (last if k == steps - 1 else mid).append(timer(env.step, action))
            if k < steps - 1:
                ratio.append(mid[-1] / raw[-1])
                if scorer is not None:
                    ratio_guided.append(mid[-1] / guided[-1])
    med = statistics.median
    return {
        "raw": med(raw),
        "env": med(mid),
        "last": med(last),
        "guided": med(guided) if guided else None,
        "overhead": med(ratio),
        "overhead_guided": med(ratio_guided) if ratio_guided else None,
    }


def throughput(
    policy: DosePolicy, case, kind: str, b: int, steps: int, repeats: int, device: str
) -> tuple[float, float]:
    """Episodes per second of the vector env (B = ``b``) and of ``b`` single envs in turn
    (medians over ``repeats`` rounds, the two alternating)."""
    timer = Timer(device)
    _, single, vector = KINDS[kind]
    kw = dict(policy=policy, cases=[case], steps=steps, device=device)
    venv, env = vector(num_envs=b, **kw), single(**kw)
    run_episode(kind, venv, seed=0)  # warm-up (case preparation)
    run_episode(kind, env, seed=0)
    t_vec, t_single = [], []
    for rep in range(repeats):
        t_vec.append(timer(run_episode, kind, venv, 1 + rep))
        t_single.append(sum(timer(run_episode, kind, env, 1 + rep + i) for i in range(b)))
    return b / statistics.median(t_vec), b / statistics.median(t_single)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="reverse steps per episode")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default=",".join(KINDS), help="env kinds to time")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "pretrain_cpu.yaml")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    policy, model_name = build_policy(args.config, args.device)
    policy.model.eval()  # as a loaded checkpoint is
    case, case_name = the_case()
    kinds = args.kinds.split(",")
    print(f"model: {model_name}; grid {policy.spec.shape}; case: {case_name} {case.grid.shape}")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.steps} steps per episode\n")
    print(f"{'kind':<16} {'B':>3} {'raw ms':>10} {'env ms':>10} {'overhead':>9} {'last step ms':>13}")
    for kind in kinds:
        for b in (1, 8):
            r = measure(policy, case, kind, b, args.steps, args.repeats, args.device)
            line = (
                f"{KINDS[kind][0]:<16} {b:>3} {r['raw'] * 1e3:10.1f} {r['env'] * 1e3:10.1f} "
                f"{r['overhead']:9.3f} {r['last'] * 1e3:13.1f}"
            )
            if r["guided"] is not None:
                g = r["guided"]
                line += f"   raw guided step {g * 1e3:.1f} ms: env / raw guided {r['overhead_guided']:.3f}"
            print(line)
    print(f"\n{'kind':<16} {'vector B=8 ep/s':>16} {'8 singles ep/s':>15} {'ratio':>6}")
    for kind in kinds:
        vec, one = throughput(policy, case, kind, 8, args.steps, args.repeats, args.device)
        print(f"{KINDS[kind][0]:<16} {vec:16.3f} {one:15.3f} {vec / one:6.2f}")
    print(
        "\noverhead = median of paired env step / raw model + reverse_step step (the Bandit: reset + "
        "raw chain + step over the raw chain); target <= 1.05. ratio = vector env episodes/s over 8 "
        "single envs'."
    )


if __name__ == "__main__":
    main()
