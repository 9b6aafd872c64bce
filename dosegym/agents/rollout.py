"""Batched on-policy rollouts of a trainable policy through the native DenoiseDose vector env.

:func:`collect` steps ``DenoiseDoseVectorEnv`` (B = ``env.num_envs`` episodes at once, best
made with ``obs_backend="torch"`` and ``pretrained_log_prob=False``). At each step the
trainable policy computes its own step Gaussian, ``mean, std`` (one forward of its denoiser
under ``torch.no_grad`` at the env's state, timestep and conditions, the env's scheduler and
the agent's ``eta``); it tells the env that Gaussian (``set_agent_gaussian``) only when the
env charges a KL (``reward.w_kl > 0``), and acts ``mean + std * env.sample_noise()`` (the
episode's own seeded noise). With ``w_kl = 0`` and ``pretrained_log_prob=False`` a rollout
costs one forward of the trainable model per step and none of the frozen one.

Batch ``j`` of a call resets the env with ``seed=seeds[j]`` (sub-env ``i`` gets ``seeds[j] +
i``): rollouts are a function of the seeds and the weights, so a resumed run needs no env
RNG state. Conventions: tensors ``(N, T, C, Z, Y, X)`` are model-grid states in model units
(dose: 1.0 = the case's highest prescription); log-probs are averaged over elements
(:func:`~dosegym.diffusion.schedulers.gaussian_log_prob`).

**Memory**: trajectories are kept on the CPU in float32: x_t and x_{t-1} of every step,
``steps x N x C x Z x Y x X x 4 bytes x 2`` (e.g. 10 steps x 8 samples x 1 x 64^3 voxels:
168 MB; the tiny 16^3 test grid: 2.6 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dosegym.diffusion.chain import frozen
from dosegym.diffusion.policy import DosePolicy
from dosegym.diffusion.schedulers import gaussian_log_prob, reverse_step
from dosegym.diffusion.slots import ModelInput, collate
from dosegym.envs.cases import CaseData
from dosegym.errors import AgentError


@dataclass
class Rollouts:
    """N complete episodes of T steps (see the module docstring for the conventions).

    ``x_t`` / ``x_prev`` ``(N, T, C, Z, Y, X)`` CPU float32: the state before and after each
    step; ``timesteps`` ``(T,)`` long: the schedule; ``log_probs`` ``(N, T)``: the acting
    policy's log-density of each step; ``rewards`` ``(N,)``: each episode's return (the sum of
    its step rewards); ``score_normalised``, ``fidelity_mae_gy``, ``reference_mae_gy``
    (NaN without a reference dose), ``kl`` (the env's mean per-step KL, NaN when not
    charged) ``(N,)``; ``case_keys``; ``cases`` (each episode's prepared case, its
    ``cond_input`` the model's conditions); ``x0`` ``(N, C, Z, Y, X)`` the final states."""

    x_t: torch.Tensor
    x_prev: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    rewards: np.ndarray
    score_normalised: np.ndarray
    fidelity_mae_gy: np.ndarray
    reference_mae_gy: np.ndarray
    kl: np.ndarray
    case_keys: list[str]
    cases: list[CaseData]
    x0: torch.Tensor

    def __len__(self) -> int:
        return int(self.x_t.shape[0])

    def conditions(self, index: torch.Tensor | Sequence[int], device: torch.device) -> ModelInput:
        """The batched conditions of samples ``index`` on ``device``."""
        return collate([self.cases[int(i)].cond_input for i in index]).to(device)

    @staticmethod
    def cat(parts: Sequence[Rollouts]) -> Rollouts:
        """The rollouts of ``parts`` in order (one schedule)."""
        first = parts[0]
        return Rollouts(
            torch.cat([p.x_t for p in parts]),
            torch.cat([p.x_prev for p in parts]),
            first.timesteps,
            torch.cat([p.log_probs for p in parts]),
            *(np.concatenate([getattr(p, f) for p in parts]) for f in _ARRAYS),
            [k for p in parts for k in p.case_keys],
            [c for p in parts for c in p.cases],
            torch.cat([p.x0 for p in parts]),
        )


_ARRAYS = ("rewards", "score_normalised", "fidelity_mae_gy", "reference_mae_gy", "kl")


def step_gaussian(
    model: torch.nn.Module, scheduler: Any, x: torch.Tensor, t: torch.Tensor, cond: ModelInput, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the reverse step of the denoiser ``model`` from ``x`` ``(B, C, Z, Y, X)``
    at timestep ``t`` (scalar or ``(B,)``), with ``scheduler`` (the env chain's) and ``eta``;
    differentiable in the weights when grad is enabled (the model's output is taken in float32
    under mixed precision); ``std`` is ``(B, 1, 1, 1, 1)``."""
    out = model(x, t, cond).float()
    step = reverse_step(scheduler, out, t, x, eta=eta, variance_noise=torch.zeros_like(x))
    return step.mean, step.std


def _info_array(infos: dict, key: str, b: int) -> np.ndarray:
    """A per-episode float array of a vector-env info (NaN where an episode lacks it)."""
    if key not in infos:
        return np.full(b, np.nan)
    values = np.asarray(infos[key], dtype=np.float64)
    mask = np.asarray(infos.get(f"_{key}", np.ones(b, bool)), dtype=bool)
    return np.where(mask, values, np.nan)


def check_env(env, steps: int) -> None:
    """``AgentError`` unless ``env`` is a DenoiseDose vector env of ``steps`` steps."""
    core = getattr(env, "core", None)
    if core is None or not hasattr(core, "set_agent_gaussian") or not hasattr(env, "num_envs"):
        raise AgentError(
            f"rollouts need a DenoiseDose vector env (gymnasium.make_vec('dosegym/DenoiseDose-v0', "
            f"num_envs=B, vectorization_mode='vector_entry_point', ...)), got {type(env).__name__}"
        )
    if core.steps != steps:
        raise AgentError(
            f"the env runs {core.steps} sampler steps but the agent's sample_num_steps is {steps}: "
            f"make the env with steps={steps}"
        )


def collect(
    env,
    policy: DosePolicy,
    seeds: Sequence[int],
    eta: float,
    case_indices: Sequence[Sequence[int]] | None = None,
) -> Rollouts:
    """``len(seeds) * env.num_envs`` episodes of ``policy`` through ``env`` (see the module
    docstring), one reset per seed; ``case_indices[j]``: the source's case index of each
    sub-env in batch ``j`` (default: each sub-env draws its own)."""
    if case_indices is not None and len(case_indices) != len(seeds):
        raise AgentError(f"collect: {len(case_indices)} case-index lists for {len(seeds)} batches")
    picks = case_indices if case_indices is not None else [None] * len(seeds)
    return Rollouts.cat([_one_batch(env, policy, int(s), eta, p) for s, p in zip(seeds, picks)])


def case_groups(n_cases: int, batch: int, group: int, rng: np.random.Generator) -> list[int]:
    """Case indices of one rollout batch of ``batch`` episodes in groups of ``group`` samples
    of the same case: ``batch // group`` cases drawn without replacement (with replacement
    when the source has fewer), each repeated ``group`` times."""
    if group < 1 or batch % group:
        raise AgentError(f"samples_per_case {group} must divide the env's num_envs {batch}")
    k = batch // group
    chosen = rng.choice(n_cases, size=k, replace=n_cases < k)
    return [int(i) for i in np.repeat(chosen, group)]


def _one_batch(env, policy: DosePolicy, seed: int, eta: float, cases_of: Sequence[int] | None) -> Rollouts:
    core = env.core
    b, steps = env.num_envs, core.steps
    charge_kl = core.reward_config.w_kl > 0
    options = None if cases_of is None else {"case_index": list(cases_of)}
    _, reset_infos = env.reset(seed=seed, options=options)
    cases = list(core.cds)
    chain = core.chain
    xs, xps, lps, ts = [], [], [], []
    returns = np.zeros(b)
    kls = []
    infos: dict = {}
    for _ in range(steps):
        x, t = chain.x, chain.t
        with frozen(policy.model):
            mean, std = step_gaussian(policy.model, chain.scheduler, x, t, chain.cond, eta)
        if not bool((std > 0).all()):
            raise AgentError(
                f"the step at timestep {int(t)} is deterministic (std 0): DDPO needs a stochastic "
                "policy, sample_eta > 0"
            )
        if charge_kl:
            env.set_agent_gaussian(mean, std)
        noise = torch.as_tensor(env.sample_noise()).to(mean.device, mean.dtype)
        action = mean + std * noise
        lps.append(gaussian_log_prob(action, mean, std).cpu())
        xs.append(x.detach().to("cpu", torch.float32))
        xps.append(action.detach().to("cpu", torch.float32))
        ts.append(t.detach().cpu().long().reshape(()))
        _, rewards, _, _, infos = env.step(action)
        returns += np.asarray(rewards, dtype=np.float64)
        kls.append(_info_array(infos, "kl", b))
    kl = np.nanmean(np.stack(kls), axis=0) if charge_kl else np.full(b, np.nan)
    return Rollouts(
        torch.stack(xs, 1),
        torch.stack(xps, 1),
        torch.stack(ts),
        torch.stack(lps, 1),
        returns,
        _info_array(infos, "score_normalised", b),
        _info_array(infos, "fidelity_mae_gy", b),
        _info_array(infos, "reference_mae_gy", b),
        kl,
        [str(k) for k in reset_infos["case_key"]],
        cases,
        xps[-1].clone(),
    )


def check_bandit_env(env, agent: str):
    """``env`` when it is a ScorecardBandit vector env (whole doses as actions); else
    ``AgentError`` naming ``agent`` and how to make one."""
    if env is None or not hasattr(env, "differentiable_reward") or not hasattr(env, "num_envs"):
        raise AgentError(
            f"{agent}'s rollouts are whole doses: give it a ScorecardBandit vector env "
            "(gymnasium.make_vec('dosegym/ScorecardBandit-v0', num_envs=B, "
            f"vectorization_mode='vector_entry_point', reward=...)), got {type(env).__name__}"
        )
    return env
