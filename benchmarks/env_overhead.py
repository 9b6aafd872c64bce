"""Overhead of the DenoiseDose environment over the raw sampler, and episode throughput.

Baseline (measured in the same run, same model, same batch size B, alternating with the env
so that load changes hit both alike): one reverse step done by hand, ``model(x, t, cond)`` +
``reverse_step`` (DDIM, eta = 1) on tensors.

* **step overhead** = median time of a mid-episode ``env.step(action)`` / median time of the
  baseline step, at B = 1 (``DenoiseDoseEnv``) and at B = 8 (the native
  ``DenoiseDoseVectorEnv``), with numpy observations (Gymnasium's: every step copies x_t and
  the condition volumes to fresh arrays) and with torch observations (tensors stay on the
  device). ``env.step`` checks the action, runs the pretrained forward for
  the action's log-probability, advances and copies the observation to numpy; the last step
  (decode + scorecard) is timed separately.
* **episode throughput**: whole on-policy episodes per second (``reset``, then each step
  ``policy_step`` + ``sample_noise`` + ``step``, scoring at the end) at B = 1 and B = 8, next
  to the baseline's chains per second (the sampler loop alone, no decode, no scoring).

Model: the shipped checkpoint when there is one, else random weights built from
``configs/pretrain_cpu.yaml`` (``--config``), else from ``configs/pretrain_tiny.yaml``; the
script says which. Timing does not depend on the weights. Case: OpenKBP ``pt_108`` from
``../shared/data`` when present, else a generated head-and-neck phantom.

    python benchmarks/env_overhead.py [--steps 4] [--repeats 1] [--threads 1] [--device cpu]
                                      [--backends numpy,torch] [--config configs/pretrain_cpu.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from data_paths import PT_108

from dosegym.diffusion import Any2Any, DosePolicy, PretrainConfig, load_pretrained
from dosegym.diffusion.policy import shipped_checkpoint_dir
from dosegym.diffusion.sample import seeded_generator
from dosegym.diffusion.schedulers import make_scheduler, reverse_step
from dosegym.envs.denoise import DenoiseDoseEnv
from dosegym.envs.vector import DenoiseDoseVectorEnv

ROOT = Path(__file__).resolve().parents[1]
PATIENT = PT_108


def build_policy(config: Path, device: str) -> tuple[DosePolicy, str]:
    if (shipped_checkpoint_dir() / "config.json").is_file():
        return load_pretrained(device=device), "shipped checkpoint"
    if not config.is_file():
        config = ROOT / "configs" / "pretrain_tiny.yaml"
    cfg = PretrainConfig.from_yaml(config)
    torch.manual_seed(0)
    model = Any2Any(cfg.model)
    where = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    name = f"random weights from {where} ({model.num_parameters():,} parameters)"
    return DosePolicy(model, sampler="ddim", eta=1.0, device=device), name


def the_case():
    if PATIENT.is_dir():
        from dosegym.data import read_case

        return read_case(PATIENT), "OpenKBP pt_108"
    from dosegym.data.phantoms import generate_anatomy

    return generate_anatomy("headneck", index=0, seed=0), "generated head-and-neck phantom"


def median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    policy: DosePolicy, case, b: int, steps: int, repeats: int, device: str, backend: str
) -> tuple[float, ...]:
    """(raw step s, env step s, env last step s, raw chain s, env episode s) at batch ``b``
    with observations from ``backend`` ("numpy" or "torch").

    Raw and env timings alternate step by step (and chain by episode), so that a change of
    machine load hits both alike.
    """
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cond = policy.conditions(case)
    cond = cond.expand(b) if b > 1 else cond
    scheduler = make_scheduler("ddim", policy.model.config.diffusion)
    scheduler.set_timesteps(steps, device=dev)
    gen = seeded_generator(0)

    def raw_step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = policy.model(x, t, cond)
            noise = torch.randn(x.shape, generator=gen).to(dev)
            return reverse_step(scheduler, out, t, x, eta=policy.eta, variance_noise=noise).prev_sample

    def raw_chain() -> None:
        x = policy.initial_noise(b, gen)
        for t in scheduler.timesteps:
            x = raw_step(x, t)

    kw = dict(policy=policy, cases=[case], steps=steps, device=device, obs_backend=backend)
    env = DenoiseDoseEnv(**kw) if b == 1 else DenoiseDoseVectorEnv(num_envs=b, **kw)
    obs, _ = env.reset(seed=0)
    action = obs["x_t"].clamp(-1.0, 1.0) if backend == "torch" else np.clip(obs["x_t"], -1.0, 1.0)

    def episode() -> None:
        o, _ = env.reset()
        for _ in range(steps):
            mean, std = env.policy_step(o)
            o, *_ = env.step(mean + std * env.sample_noise())

    raw_step(policy.initial_noise(b, gen), scheduler.timesteps[0])  # warm-up
    env.reset(seed=0)
    env.step(action)
    raw, mid, last, chains, episodes = [], [], [], [], []
    for rep in range(repeats):
        env.reset(seed=rep)
        x = policy.initial_noise(b, gen)
        for k, t in enumerate(scheduler.timesteps):
            sync()
            t0 = time.perf_counter()
            x = raw_step(x, t)
            sync()
            t1 = time.perf_counter()
            env.step(action)
            sync()
            t2 = time.perf_counter()
            raw.append(t1 - t0)
            (last if k == steps - 1 else mid).append(t2 - t1)
        chains.append(median_time(raw_chain, 1, sync))
        episodes.append(median_time(episode, 1, sync))
    med = statistics.median
    return med(raw), med(mid), med(last), med(chains), med(episodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="reverse steps per episode")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--backends", default=None, help="observation backends to time (default: numpy on CPU, both on CUDA)"
    )
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "pretrain_cpu.yaml")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    policy, model_name = build_policy(args.config, args.device)
    policy.model.eval()  # as a loaded checkpoint is
    case, case_name = the_case()
    print(f"model: {model_name}; grid {policy.spec.shape}; case: {case_name} {case.grid.shape}")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.steps} steps per episode\n")
    print(
        f"{'B':>3} {'obs':>6} {'raw step ms':>12} {'env step ms':>12} {'overhead':>9} {'last step ms':>13} "
        f"{'raw chains/s':>13} {'episodes/s':>11} {'ratio':>6}"
    )
    backends = args.backends or ("numpy" if args.device == "cpu" else "numpy,torch")
    for backend in backends.split(","):
        for b in (1, 8):
            raw_s, env_s, last_s, chain_s, ep_s = measure(
                policy, case, b, args.steps, args.repeats, args.device, backend
            )
            print(
                f"{b:>3} {backend:>6} {raw_s * 1e3:12.2f} {env_s * 1e3:12.2f} {env_s / raw_s:9.3f} "
                f"{last_s * 1e3:13.2f} {b / chain_s:13.2f} {b / ep_s:11.2f} {chain_s / ep_s:6.3f}"
            )
    print(
        "\noverhead = env step / raw step (target <= 1.10 at B=1); ratio = episodes/s over raw "
        "chains/s (episodes include reset, decode and the scorecard)."
    )


if __name__ == "__main__":
    main()
