"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with
Forward Process"): reinforcement on the forward (noising) process, with no likelihoods.

The env is the ScorecardBandit (``env_kind = "bandit"``: the action is a whole dose), so any
sampler serves the rollouts, deterministic DDIM (``sample_eta`` 0, the default) included.
One iteration, read top to bottom in :meth:`NFT.train_iteration`:

1. **Rollouts**: per batch of ``env.num_envs`` episodes (groups of ``samples_per_case`` of one
   case, seeded), the sampling copy of the policy (the **old policy** v_old of this
   iteration, frozen through its update) runs its chain; each final state x0 goes to the env
   as its action, whose reward (``reward``: the exact or dense card, fidelity) it earns.
2. **Optimality**: group-relative advantages A (:func:`~dosegym.agents.stat_tracking.group_advantages`;
   all-tied groups get 0), mapped to ``r = 0.5 + 0.5 * clip(A / adv_clip_max, -1, 1)`` in [0, 1].
3. **Update** (``train_num_inner_epochs`` passes over minibatches of ``train_batch_size``):
   for each sample, ``timesteps_per_sample`` forward-process draws ``t ~ U[timestep_range]``
   (a share of the training timesteps) and ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; the
   trainable model's and the old policy's x̂0 at ``(x_t, t)`` define the implicit positive and
   negative policies ``x̂0± = x̂0_old ± nft_beta * (x̂0_θ - x̂0_old)``, and the loss is
   ``r * |x̂0+ - x0|² + (1 - r) * |x̂0- - x0|²`` (mean over elements): samples better than
   their group pull the model toward them, worse ones push it away, in the model's own
   denoising objective. One optimizer step per minibatch (its draws accumulate).

Conventions: model-grid states ``(B, C, Z, Y, X)`` in model units (1.0 = the case's highest
prescription); x̂0 from any prediction type (:func:`~dosegym.diffusion.schedulers.logprob.x0_and_eps`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from dosegym.agents.base import Agent
from dosegym.agents.config import AgentConfig
from dosegym.agents.ddpo import tied_fraction
from dosegym.agents.rollout import case_groups, check_bandit_env
from dosegym.agents.stat_tracking import group_advantages
from dosegym.diffusion.chain import ReverseChain, frozen, seeded_generator
from dosegym.diffusion.schedulers import make_scheduler
from dosegym.diffusion.schedulers.logprob import per_sample, x0_and_eps
from dosegym.diffusion.slots import ModelInput, collate
from dosegym.errors import AgentError


class NFTConfig(AgentConfig):
    """DiffusionNFT's config: the shared fields plus its own (see the module docstring)."""

    agent_name: ClassVar[str] = "nft"

    sample_eta: float = Field(0.0, ge=0)
    """DDIM eta of the rollouts (0: deterministic; NFT needs no stochastic step)."""
    samples_per_case: int = Field(4, ge=2)
    """G: samples of one case per group (capped at the env's num_envs)."""
    nft_beta: float = Field(1.0, gt=0)
    """β of the implicit policies ``x̂0± = x̂0_old ± β (x̂0_θ - x̂0_old)``."""
    adv_clip_max: float = Field(2.0, gt=0)
    """Advantages are mapped to ``r = 0.5 + 0.5 clip(A / adv_clip_max, -1, 1)``."""
    timesteps_per_sample: int = Field(2, ge=1)
    """Forward-process noise levels drawn per sample and epoch."""
    timestep_range: tuple[float, float] = (0.0, 1.0)
    """Share of the training timesteps ``t`` is drawn from (0: clean, 1: pure noise)."""
    train_batch_size: int = Field(2, ge=1)
    """Samples per minibatch of the update."""
    train_num_inner_epochs: int = Field(1, ge=1)
    """Passes over each iteration's samples."""
    train_max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm before each optimizer step."""

    @model_validator(mode="after")
    def _fits(self) -> NFTConfig:
        lo, hi = self.timestep_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"timestep_range must satisfy 0 <= lo < hi <= 1, got {self.timestep_range}")
        if self.samples_per_iteration % self.train_batch_size:
            raise ValueError(
                f"samples_per_iteration {self.samples_per_iteration} is not a multiple of "
                f"train_batch_size {self.train_batch_size}"
            )
        return self


def nft_loss(
    x0_theta: torch.Tensor, x0_old: torch.Tensor, x0: torch.Tensor, r: torch.Tensor, beta: float
) -> torch.Tensor:
    """DiffusionNFT's loss of a minibatch (see the module docstring): ``x0_theta`` (with grad),
    ``x0_old`` and the rollout's ``x0`` ``(B, C, Z, Y, X)``, optimality ``r`` ``(B,)`` in [0, 1];
    the mean over samples of ``r |x̂0+ - x0|² + (1 - r) |x̂0- - x0|²`` (each a mean over elements)."""
    delta = x0_theta - x0_old
    pos = ((x0_old + beta * delta - x0) ** 2).flatten(1).mean(1)
    neg = ((x0_old - beta * delta - x0) ** 2).flatten(1).mean(1)
    return (r * pos + (1 - r) * neg).mean()


def optimality(advantages: np.ndarray, clip_max: float) -> np.ndarray:
    """``0.5 + 0.5 * clip(A / clip_max, -1, 1)``: advantages as optimality in [0, 1]."""
    return 0.5 + 0.5 * np.clip(np.asarray(advantages, dtype=np.float64) / clip_max, -1.0, 1.0)


class NFT(Agent):
    """See the module docstring."""

    name = "nft"
    Config = NFTConfig
    config: NFTConfig
    env_kind = "bandit"

    def accumulation_steps(self) -> int:
        """Each minibatch's ``timesteps_per_sample`` draws accumulate into one optimizer step."""
        return int(self.config.timesteps_per_sample) * int(self.config.gradient_accumulation_steps)

    def _check_setup(self) -> Any:
        return check_bandit_env(self.env, "DiffusionNFT")

    # -- one iteration -----------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        """Rollouts, optimality, update (see the module docstring); the metrics."""
        c, env = self.config, self._check_setup()
        assert self.optim is not None
        old = self.sampling_policy().model  # the old policy: synced now, frozen until next iteration
        if old is self.optim.model or old is self.policy.model:
            old = copy.deepcopy(self.policy.model).requires_grad_(False).eval()  # full weights train
        batches = self.samples_per_iteration // self.optim.world_size // env.num_envs
        group = min(c.samples_per_case, env.num_envs)
        rng = np.random.default_rng(self.rollout_seed(batches))
        x0s, conds, keys, rewards, scores, maes = [], [], [], [], [], []
        for j in range(batches):
            seed = self.rollout_seed(j)
            picks = case_groups(len(env.core.source), env.num_envs, group, rng)
            _, reset_infos = env.reset(seed=seed, options={"case_index": picks})
            cond = collate([cd.cond_input for cd in env.core.cds]).to(self.policy.device)
            chain = ReverseChain(old, c.sample_num_steps, self.policy.sampler, c.sample_eta)
            chain.start(cond, [seeded_generator(seed + i) for i in range(cond.batch_size)])
            with frozen(old):
                x0 = chain.run()
            action = x0.clamp(0.0, float(env.single_action_space.high.flat[0]))
            _, r, _, _, infos = env.step(action)
            r = np.asarray(r, dtype=np.float64)
            if not np.isfinite(r).all():
                i = int(np.flatnonzero(~np.isfinite(r))[0])
                raise self.nonfinite_error(
                    f"the reward of episode {i} (case {reset_infos['case_key'][i]!r}, rollout batch {j + 1} "
                    f"reset with seed {seed}) is {r[i]}"
                )
            x0s.append(x0.detach().cpu())
            conds += [cd.cond_input for cd in env.core.cds]
            keys += [str(k) for k in reset_infos["case_key"]]
            rewards.append(r)
            scores.append(np.asarray(infos["score_normalised"], dtype=np.float64))
            if "reference_mae_gy" in infos:
                maes.append(np.asarray(infos["reference_mae_gy"], dtype=np.float64))
        everyone = self.optim.gather(torch.as_tensor(np.concatenate(rewards)))
        all_rewards = everyone.double().numpy()
        all_keys = self.optim.gather_objects(keys)
        adv = group_advantages(all_keys, all_rewards)
        mine = slice(self.optim.rank * len(keys), (self.optim.rank + 1) * len(keys))
        r_opt = optimality(adv[mine], c.adv_clip_max)
        self.optim.set_iteration(self.iteration, max(self.total_iterations, self.iteration + 1))
        stats = self.update(torch.cat(x0s), conds, keys, r_opt, old)
        score = np.concatenate(scores)
        return {
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()),
            "score_mean": float(score.mean()),
            "kl_mean": math.nan,
            "mae_gy": float(np.concatenate(maes).mean()) if maes else math.nan,
            "tied_fraction": tied_fraction(all_keys, all_rewards),
            "optimality_mean": float(r_opt.mean()),
            **stats,
        }

    def update(
        self, x0: torch.Tensor, conds: list[ModelInput], keys: list[str], r: np.ndarray, old: torch.nn.Module
    ) -> dict[str, float]:
        """The inner epochs (see the module docstring); the mean loss and gradient norm."""
        c = self.config
        assert self.optim is not None
        model, device = self.optim.model, self.policy.device
        cfg = self.policy.model.config.diffusion
        noise_sched = make_scheduler("ddpm", cfg)
        acp = noise_sched.alphas_cumprod.to(device)
        n_train = int(cfg.num_train_timesteps)
        lo = int(round(c.timestep_range[0] * (n_train - 1)))
        hi = max(lo + 1, int(round(c.timestep_range[1] * (n_train - 1))) + 1)
        gen = self.generator()
        r_t = torch.as_tensor(r, dtype=torch.float32)
        first_norm, losses = len(self.optim.grad_norms), []
        n = x0.shape[0]
        for epoch in range(c.train_num_inner_epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, c.train_batch_size):
                idx = perm[start : start + c.train_batch_size]
                cond = collate([conds[int(i)] for i in idx]).to(device)
                clean = x0[idx].to(device)
                for j in range(c.timesteps_per_sample):
                    t = torch.randint(lo, hi, (len(idx),), generator=gen).to(device)
                    eps = torch.randn(clean.shape, generator=gen).to(device)
                    x_t = noise_sched.add_noise(clean, eps, t)
                    a_t = per_sample(acp, t, clean.ndim).to(clean.dtype)
                    x0_theta, _ = x0_and_eps(cfg.prediction_type, model(x_t, t, cond).float(), x_t, a_t)
                    with torch.no_grad():
                        x0_old, _ = x0_and_eps(cfg.prediction_type, old(x_t, t, cond).float(), x_t, a_t)
                    loss = nft_loss(x0_theta, x0_old, clean, r_t[idx].to(device), c.nft_beta)
                    where = (
                        f"epoch {epoch + 1}, minibatch {start // c.train_batch_size + 1}, draw {j + 1}/"
                        f"{c.timesteps_per_sample} (cases {[keys[int(i)] for i in idx]}, "
                        f"timesteps {t.tolist()})"
                    )
                    try:
                        self.optim.backward(loss, where)
                    except AgentError as exc:
                        raise self.nonfinite_error(str(exc)) from None
                    losses.append(float(loss.detach()))
        norms = self.optim.grad_norms[first_norm:]
        return {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)) if norms else math.nan}
