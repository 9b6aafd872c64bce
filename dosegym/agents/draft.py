"""DRaFT-K (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards") and AlignProp (Prabhudesai et al. 2023): backpropagate a differentiable reward
through the last K steps of the sampling chain.

The env is the ScorecardBandit (``env_kind = "bandit"``): its context is a case, its action a
whole dose on the model grid, and :meth:`~dosegym.envs.bandit.ScorecardBanditVectorEnv.differentiable_reward`
its reward's differentiable twin (``reward.score="dense"``: the dense score of the card on the
model grid, soft metrics at ``dense_temperature_gy`` continued past each failing end; minus
``w_fid`` times the MAE to the fidelity anchor, decoded onto the case grid through the
policy's decoder and refiner). One iteration, read top to bottom in :meth:`DRaFT.train_iteration`:

1. **Sample** (per rollout batch of ``env.num_envs`` episodes, reset with the batch's seed):
   the chain of ``sample_num_steps`` steps at ``sample_eta`` (DDIM; 0, deterministic given the
   initial noise, as DRaFT samples), every sample with its own seeded generator. The first
   ``steps - K`` steps run without gradient on the sampling copy of the policy; the last K
   run the trainable (LoRA'd) denoiser with gradient, each step's forward under gradient
   checkpointing (``gradient_checkpointing``: activations recomputed in the backward pass,
   so memory does not grow with K). ``truncation="random"`` is AlignProp's randomised
   truncation: each batch draws K uniformly from ``1..draft_k``.
2. **Loss**: ``-mean(differentiable_reward(x0))``, plus with ``kl_weight`` > 0 the mean
   closed-form Gaussian KL of the K trained steps to the frozen reference's steps at the
   same states (the reference runs only then; needs ``sample_eta`` > 0, a deterministic step
   has no Gaussian). One optimizer step per iteration: the batches' gradients accumulate.
3. **Score**: each final state goes to the env as its action (clamped to the action space),
   whose step scores it with the exact card: ``score_mean`` is the exact normalised score,
   ``soft_gap`` the mean of (dense - exact) that DRaFT can over-optimise.

Conventions: model-grid states ``(B, C, Z, Y, X)`` in model units (1.0 = the case's highest
prescription); a reward is per sample.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.checkpoint import checkpoint

from dosegym.agents.base import Agent
from dosegym.agents.config import AgentConfig, RewardFields
from dosegym.agents.rollout import check_bandit_env, step_gaussian
from dosegym.diffusion.chain import ReverseChain, seeded_generator
from dosegym.diffusion.slots import collate
from dosegym.envs.reward import gaussian_kl
from dosegym.errors import AgentError


class DRaFTConfig(AgentConfig):
    """DRaFT's config: the shared fields plus its own (see the module docstring)."""

    agent_name: ClassVar[str] = "draft"

    reward: RewardFields = Field(default_factory=lambda: RewardFields(score="dense"))
    """Reward composition; DRaFT needs ``score: dense`` (its differentiable twin is the dense score)."""
    sample_eta: float = Field(0.0, ge=0)
    """DDIM eta of the chain (0: deterministic given the initial noise, as DRaFT samples)."""
    draft_k: int = Field(1, ge=1)
    """Sampling steps the gradient flows back through (the last K; DRaFT-K)."""
    truncation: Literal["fixed", "random"] = "fixed"
    """``"fixed"``: the last ``draft_k`` steps; ``"random"``: AlignProp's K ~ U{1..draft_k} per batch."""
    gradient_checkpointing: bool = True
    """Recompute each trained step's activations in the backward pass (memory flat in K)."""
    kl_weight: float = Field(0.0, ge=0)
    """KL to the frozen reference per trained step (0: off, the reference never runs)."""
    train_max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm before each optimizer step."""

    @model_validator(mode="after")
    def _fits(self) -> DRaFTConfig:
        if self.draft_k > self.sample_num_steps:
            raise ValueError(f"draft_k {self.draft_k} exceeds sample_num_steps {self.sample_num_steps}")
        if self.kl_weight > 0 and self.sample_eta == 0:
            raise ValueError("kl_weight > 0 needs sample_eta > 0 (a deterministic DDIM step has no Gaussian)")
        if self.reward.score != "dense":
            raise ValueError(
                "DRaFT ascends the reward's differentiable twin: set reward.score: dense "
                "(the exact card's points are flat past each curve's end)"
            )
        return self


class DRaFT(Agent):
    """See the module docstring."""

    name = "draft"
    Config = DRaFTConfig
    config: DRaFTConfig
    env_kind = "bandit"

    # -- the shared machinery's hooks ------------------------------------------------------
    def accumulation_steps(self) -> int:
        """The rollout batches of an iteration (one optimizer step per iteration)."""
        from accelerate.state import PartialState

        env = self._check_setup()
        return max(1, self.samples_per_iteration // PartialState().num_processes // env.num_envs)

    def _check_setup(self) -> Any:
        return check_bandit_env(self.env, "DRaFT")

    def num_trained_steps(self, index: int) -> int:
        """K of rollout batch ``index`` of this iteration (see ``truncation``)."""
        c = self.config
        if c.truncation == "fixed":
            return c.draft_k
        return int(torch.randint(1, c.draft_k + 1, (1,), generator=self.generator(index)))

    # -- one iteration -----------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        """Sample, loss, update, score (see the module docstring); the metrics."""
        c, env = self.config, self._check_setup()
        assert self.optim is not None
        self.optim.set_iteration(self.iteration, max(self.total_iterations, self.iteration + 1))
        batches = self.samples_per_iteration // self.optim.world_size // env.num_envs
        rewards, dense, exact, mae, kls, ks = [], [], [], [], [], []
        for j in range(batches):
            seed = self.rollout_seed(j)
            env.reset(seed=seed)
            k = self.num_trained_steps(j)
            x0, kl = self._sample(env, seed, k)
            reward = env.differentiable_reward(x0)
            loss = -reward.mean()
            if kl is not None:
                loss = loss + c.kl_weight * kl
                kls.append(float(kl.detach()))
            keys = [cd.key for cd in env.core.cds]
            where = (
                f"rollout batch {j + 1}/{batches} (cases {keys}, reset seed {seed}, last {k} steps trained)"
            )
            try:
                self.optim.backward(loss, where)
            except AgentError as exc:
                raise self.nonfinite_error(str(exc)) from None
            action = x0.detach().clamp(0.0, float(env.single_action_space.high.flat[0]))
            _, r, _, _, infos = env.step(action)
            rewards.append(reward.detach().double().cpu().numpy())
            dense.append(np.asarray(infos["score_dense"], dtype=np.float64))
            exact.append(np.asarray(infos["score_normalised"], dtype=np.float64))
            if "reference_mae_gy" in infos:
                mae.append(np.asarray(infos["reference_mae_gy"], dtype=np.float64))
            ks.append(k)
        r_all, d_all, e_all = (np.concatenate(v) for v in (rewards, dense, exact))
        norms = self.optim.grad_norms[-1:]
        return {
            "reward_mean": float(r_all.mean()),
            "reward_std": float(r_all.std()),
            "score_mean": float(e_all.mean()),
            "soft_gap": float((d_all - e_all).mean()),
            "kl_mean": float(np.mean(kls)) if kls else math.nan,
            "mae_gy": float(np.concatenate(mae).mean()) if mae else math.nan,
            "loss": float(-r_all.mean()) + (c.kl_weight * float(np.mean(kls)) if kls else 0.0),
            "grad_norm": float(norms[0]) if norms else math.nan,
            "trained_steps": float(np.mean(ks)),
        }

    def _sample(self, env: Any, seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch's final states ``(B, C, Z, Y, X)``, differentiable through the last ``k``
        steps, and (``kl_weight`` > 0) the mean KL of those steps to the reference."""
        c = self.config
        device = self.policy.device
        cond = collate([cd.cond_input for cd in env.core.cds]).to(device)
        chain = ReverseChain(
            self.sampling_policy().model, c.sample_num_steps, self.policy.sampler, c.sample_eta
        )
        chain.start(cond, [seeded_generator(seed + i) for i in range(cond.batch_size)])
        while chain.k < chain.steps - k:
            chain.step()
        model, scheduler = self.optim.model, chain.scheduler
        reference = self.reference().model if c.kl_weight > 0 else None
        x = chain.x.detach()
        kls = []
        while chain.running:
            t = chain.t
            if c.gradient_checkpointing and torch.is_grad_enabled():
                mean, std = checkpoint(
                    lambda xx, tt=t: step_gaussian(model, scheduler, xx, tt, cond, c.sample_eta),
                    x,
                    use_reentrant=False,
                )
            else:
                mean, std = step_gaussian(model, scheduler, x, t, cond, c.sample_eta)
            if reference is not None:
                with torch.no_grad():
                    ref_mean, _ = step_gaussian(reference, scheduler, x.detach(), t, cond, c.sample_eta)
                kls.append(gaussian_kl(mean, std, ref_mean, std).mean())
            noise = chain.noise() if chain.stochastic else torch.zeros_like(x)
            x = mean + std * noise
            chain.advance(x.detach())
        return x, (torch.stack(kls).mean() if kls else None)
