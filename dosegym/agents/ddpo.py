"""DDPO (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning").

The reverse chain is the MDP (``DenoiseDose``); an episode's return is its reward (the
scorecard of the final dose, minus fidelity / KL terms as the env's ``reward`` composes).
One iteration, read top to bottom in :meth:`DDPO.train_iteration`:

1. **Rollouts** (:func:`dosegym.agents.rollout.collect`): ``samples_per_iteration`` episodes
   (split over the processes of ``accelerate launch``) of the trainable (LoRA'd) policy
   through the DenoiseDose vector env, storing x_t, x_{t-1}, the timestep and the policy's
   log-prob of every step. The episodes of a batch share their case in groups of
   ``samples_per_case`` (cases drawn without replacement from the source, seeded), so that
   step 3 compares samples of one case with each other.
2. **Rewards**: the env's returns (its ``reward``; with ``reward.score="dense"`` the score
   term is the dense score, :mod:`dosegym.envs.reward`, where the exact card ties samples
   that fail the same items; evaluation stays exact).
3. **Advantages**: rewards of all processes normalised per case (trl's per-prompt stat
   tracking, :class:`~dosegym.agents.stat_tracking.PerCaseStatTracker`) or over the batch,
   clipped to ``±train_adv_clip_max``. ``tied_fraction`` logs the share of per-case groups
   (of 2+ samples) in the batch whose rewards all tie: they teach nothing.
4. **Update**: ``train_num_inner_epochs`` passes; each shuffles the samples, draws for each
   sample a random subset of ``train_timestep_fraction`` of its steps, and for every
   minibatch of ``train_batch_size`` samples and every drawn step recomputes the trainable
   log-prob with grad (the model's forward on the stored x_t) and the loss (:func:`ddpo_loss`):

   - ``mode="is"``: PPO's clipped surrogate on the ratio ``exp(logp - logp_old)`` of per-step
     log-probs averaged over elements, ``max(-A r, -A clip(r, 1 ± train_clip_range))``;
   - ``mode="sf"``: REINFORCE, ``-A logp``;

   plus, with ``kl_weight`` > 0, DPOK's penalty ``kl_weight * KL(trainable step || reference
   step)``, the closed-form Gaussian KL of the two step means at the same std (the frozen
   reference :meth:`~dosegym.agents.base.Agent.reference` runs only then).
   An optimizer step (:class:`~dosegym.agents.optim.Optim`: AdamW, clip to
   ``train_max_grad_norm``) follows every ``gradient_accumulation_steps`` minibatches, the
   gradients of all their drawn steps accumulated (as trl).

Field names follow trl 0.23.1's ``DDPOConfig`` where they apply; :meth:`DDPOConfig.from_trl`
maps a trl config onto this one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from dosegym.agents.base import Agent
from dosegym.agents.config import AgentConfig
from dosegym.agents.optim import ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY
from dosegym.agents.rollout import Rollouts, case_groups, check_env, collect, step_gaussian
from dosegym.agents.stat_tracking import PerCaseStatTracker, batch_advantages
from dosegym.diffusion.schedulers import gaussian_log_prob
from dosegym.envs.reward import gaussian_kl
from dosegym.errors import AgentError

#: trl 0.23.1 ``DDPOConfig`` fields that map onto ours: trl name -> (trl default, our field).
TRL_MAPPED: dict[str, tuple[Any, str]] = {
    "seed": (42, "seed"),
    "sample_num_steps": (50, "sample_num_steps"),
    "sample_eta": (1.0, "sample_eta"),
    "train_batch_size": (1, "train_batch_size"),
    "train_learning_rate": (3e-4, "learning_rate"),
    "train_gradient_accumulation_steps": (1, "gradient_accumulation_steps"),
    "train_max_grad_norm": (1.0, "train_max_grad_norm"),
    "train_num_inner_epochs": (1, "train_num_inner_epochs"),
    "train_adv_clip_max": (5.0, "train_adv_clip_max"),
    "train_clip_range": (1e-4, "train_clip_range"),
    "train_timestep_fraction": (1.0, "train_timestep_fraction"),
    "per_prompt_stat_tracking": (False, "per_prompt_stat_tracking"),
    "per_prompt_stat_tracking_buffer_size": (16, "per_prompt_stat_tracking_buffer_size"),
    "per_prompt_stat_tracking_min_count": (16, "per_prompt_stat_tracking_min_count"),
}
#: trl's sampling batch: ``samples_per_iteration = sample_batch_size * sample_num_batches_per_epoch``.
TRL_SAMPLES = {"sample_batch_size": 1, "sample_num_batches_per_epoch": 2}
#: Our optimizer (:class:`~dosegym.agents.optim.Optim`): AdamW with trl's default settings.
TRL_ADAM = {"train_adam_beta1": ADAM_BETAS[0], "train_adam_beta2": ADAM_BETAS[1],
            "train_adam_weight_decay": ADAM_WEIGHT_DECAY, "train_adam_epsilon": ADAM_EPS,
            "train_use_8bit_adam": False}  # fmt: skip
_RUN = "run management, done by `dosegym align` (--out, --samples, --resume; TensorBoard logs always)"
#: trl fields that do not apply: trl name -> (trl default, why). A default of ``...`` is
#: computed by trl at import (never compared).
TRL_REFUSED: dict[str, tuple[Any, str]] = {
    "sample_guidance_scale": (5.0, "dosegym's dose model has no classifier-free guidance (no prompt)"),
    "train_cfg": (True, "dosegym's dose model has no classifier-free guidance (no prompt)"),
    "negative_prompts": ("", "dosegym's cases are not prompts; there are no negative prompts"),
    "async_reward_computation": (False, "the env scores each episode in the rollout (no reward workers)"),
    "max_workers": (2, "the env scores each episode in the rollout (no reward workers)"),
    "allow_tf32": (True, "a process-wide GPU setting: set torch.backends.cuda.matmul.allow_tf32 yourself"),
    "num_epochs": (100, "the budget is learn(total_samples) / --samples (epochs x samples_per_iteration)"),
    **{
        k: (d, _RUN)
        for k, d in {
            "exp_name": ..., "run_name": "", "log_with": None, "tracker_kwargs": {}, "accelerator_kwargs": {},
            "project_kwargs": {}, "tracker_project_name": "trl", "logdir": "logs", "save_freq": 1,
            "num_checkpoint_limit": 5, "resume_from": "", "push_to_hub": False,
        }.items()
    },
}  # fmt: skip


class DDPOConfig(AgentConfig):
    """DDPO's config: the shared fields plus trl's ``DDPOConfig`` names (see the module docstring)."""

    agent_name: ClassVar[str] = "ddpo"

    mode: Literal["is", "sf"] = "is"
    """``"is"``: importance-sampled, PPO clipping on the per-step ratio; ``"sf"``: REINFORCE."""
    train_batch_size: int = Field(2, ge=1)
    """Samples per minibatch of the update (per process)."""
    train_clip_range: float = Field(1e-4, gt=0)
    """PPO clip range of the ratio (mode ``"is"``)."""
    train_adv_clip_max: float = Field(5.0, gt=0)
    """Advantages are clipped to [-train_adv_clip_max, train_adv_clip_max]."""
    train_timestep_fraction: float = Field(1.0, gt=0, le=1)
    """Fraction of each sample's steps trained on (a random subset per sample and epoch)."""
    train_num_inner_epochs: int = Field(1, ge=1)
    """Passes over each iteration's samples."""
    train_max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm before each optimizer step."""
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per case (trl's per-prompt stat tracking) instead of over the batch."""
    per_prompt_stat_tracking_buffer_size: int = Field(16, ge=1)
    """Rewards kept per case for its statistics."""
    per_prompt_stat_tracking_min_count: int = Field(4, ge=1)
    """Rewards a case needs before its own statistics are used (else the batch's)."""
    samples_per_case: int = Field(4, ge=1)
    """Episodes of a rollout batch share their case in groups of this size (capped at the
    env's num_envs), so each case's statistics compare samples of that case; 1: each
    episode draws its own case."""
    kl_weight: float = Field(0.0, ge=0)
    """DPOK KL penalty to the frozen reference per trained step (0: off; the reference never runs)."""

    @model_validator(mode="after")
    def _fits(self) -> DDPOConfig:
        if self.samples_per_iteration % self.train_batch_size:
            raise ValueError(
                f"samples_per_iteration {self.samples_per_iteration} is not a multiple of "
                f"train_batch_size {self.train_batch_size}"
            )
        minibatches = self.samples_per_iteration // self.train_batch_size
        if minibatches % self.gradient_accumulation_steps:
            raise ValueError(
                f"the {minibatches} minibatches of an iteration are not a multiple of "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        return self

    @classmethod
    def from_trl(cls, trl_config: Any, device: str = "cpu", **overrides: Any) -> DDPOConfig:
        """Our config from a trl ``DDPOConfig`` or a dict of its fields, field by field
        (``TRL_MAPPED``; ``sample_batch_size * sample_num_batches_per_epoch`` ->
        ``samples_per_iteration``; ``mixed_precision``). A trl config object carries the fields
        it sets away from trl's defaults (the others keep dosegym's defaults); a dict carries
        all its keys. A field that does not apply (``TRL_REFUSED``, an Adam setting other than
        ours, fp16 on a CPU ``device``) or is unknown raises ``AgentError`` with the reason."""
        given = _trl_fields(trl_config)
        data: dict[str, Any] = {}
        refused: list[str] = []
        for key, value in given.items():
            if key in TRL_MAPPED:
                data[TRL_MAPPED[key][1]] = value
            elif key in TRL_REFUSED:
                refused.append(f"{key}={value!r}: {TRL_REFUSED[key][1]}")
            elif key in TRL_ADAM:
                if value != TRL_ADAM[key]:
                    refused.append(f"{key}={value!r}: dosegym's optimizer is fixed to AdamW with {TRL_ADAM}")
            elif key == "mixed_precision":
                if value == "fp16" and str(device).startswith("cpu"):
                    refused.append("mixed_precision='fp16': needs a GPU; on CPU use 'no' or 'bf16'")
                else:
                    data["mixed_precision"] = value
            elif key not in TRL_SAMPLES:
                valid = sorted([*TRL_MAPPED, *TRL_SAMPLES, *TRL_ADAM, "mixed_precision", *TRL_REFUSED])
                refused.append(f"{key!r} is not a field of trl's DDPOConfig (0.23.1); its fields: {valid}")
        if refused:
            raise AgentError("trl DDPOConfig: fields that do not apply to dosegym: " + "; ".join(refused))
        if any(k in given for k in TRL_SAMPLES):
            sizes = {k: given.get(k, d) for k, d in TRL_SAMPLES.items()}
            data["samples_per_iteration"] = int(np.prod(list(sizes.values())))
        return cls.coerce(data, **overrides)  # type: ignore[return-value]


def _trl_fields(trl_config: Any) -> dict[str, Any]:
    """The fields a trl config sets: a dict's keys, or an object's DDPO fields whose value is
    not trl's default."""
    if isinstance(trl_config, dict):
        return dict(trl_config)
    if type(trl_config).__name__ != "DDPOConfig":
        raise AgentError(f"from_trl: expected a trl DDPOConfig or a dict, got {type(trl_config).__name__}")
    defaults = {k: d for k, (d, _) in {**TRL_MAPPED, **TRL_REFUSED}.items()}
    defaults.update(TRL_SAMPLES, **TRL_ADAM, mixed_precision="fp16")
    out = {}
    for key, default in defaults.items():
        if default is ... or not hasattr(trl_config, key):
            continue
        value = getattr(trl_config, key)
        if value != default:
            out[key] = value
    return out


def clip_advantages(advantages: np.ndarray, clip_max: float) -> np.ndarray:
    """Advantages clipped to ``[-clip_max, clip_max]``."""
    return np.clip(np.asarray(advantages, dtype=np.float64), -clip_max, clip_max)


def ddpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mode: str,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's loss of one minibatch step: ``(loss, stats)``, all ``(B,)`` inputs.

    ``"is"``: ``mean(max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)))`` with ``r =
    exp(log_prob - old_log_prob)``; ``"sf"``: ``mean(-A log_prob)``. ``stats``: ``ratio``
    (``(B,)``), ``clipfrac`` (share of ``|r - 1| > clip_range``) and ``approx_kl``
    (``mean((log_prob - old)^2) / 2``), detached."""
    ratio = torch.exp(log_prob - old_log_prob)
    if mode == "is":
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
    elif mode == "sf":
        loss = (-advantages * log_prob).mean()
    else:
        raise AgentError(f"DDPO mode {mode!r} is unknown; valid: ['is', 'sf']")
    r = ratio.detach()
    stats = {
        "ratio": r,
        "clipfrac": ((r - 1.0).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean(),
    }
    return loss, stats


def tied_fraction(keys: list[str], rewards: np.ndarray) -> float:
    """Share of the per-case groups of 2+ samples whose rewards all tie (NaN without such groups)."""
    keys_arr = np.asarray(keys, dtype=object)
    groups = [rewards[keys_arr == k] for k in dict.fromkeys(keys)]
    groups = [g for g in groups if g.size > 1]
    if not groups:
        return math.nan
    return float(np.mean([float(np.ptp(g)) == 0.0 for g in groups]))


class DDPO(Agent):
    """See the module docstring."""

    name = "ddpo"
    Config = DDPOConfig
    config: DDPOConfig

    def __init__(self, env: Any = None, policy: Any = None, config: Any = None, **kw: Any) -> None:
        super().__init__(env, policy, config, **kw)
        self._fresh_state()

    def _after_load(self, folder: Path, resume: bool) -> None:
        self._fresh_state()  # a resumed tracker comes back with the training state

    def _fresh_state(self) -> None:
        c = self.config
        self.tracker = (
            PerCaseStatTracker(c.per_prompt_stat_tracking_buffer_size, c.per_prompt_stat_tracking_min_count)
            if c.per_prompt_stat_tracking
            else None
        )

    # -- the shared machinery's hooks ------------------------------------------------------
    def num_train_timesteps(self) -> int:
        """Steps trained per sample and epoch: ``train_timestep_fraction`` of the chain's, >= 1."""
        return max(1, int(self.config.sample_num_steps * self.config.train_timestep_fraction))

    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: each drawn step of ``gradient_accumulation_steps`` batches."""
        return int(self.config.gradient_accumulation_steps) * self.num_train_timesteps()

    def agent_state(self) -> dict[str, Any]:
        return {"tracker": None if self.tracker is None else self.tracker.state_dict()}

    def load_agent_state(self, state: dict[str, Any]) -> None:
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])

    def _check_setup(self) -> Any:
        """The env, checked against the config and the number of processes."""
        c, env = self.config, self.env
        if env is None:
            raise AgentError("DDPO learns from rollouts: give it a DenoiseDose vector env (env=...)")
        check_env(env, c.sample_num_steps)
        assert self.optim is not None
        world = self.optim.world_size
        per_rank, rest = divmod(self.samples_per_iteration, world)
        if rest or per_rank % env.num_envs or per_rank % c.train_batch_size:
            raise AgentError(
                f"samples_per_iteration {self.samples_per_iteration} over {world} processes must give each "
                f"a multiple of num_envs {env.num_envs} and of train_batch_size {c.train_batch_size}"
            )
        return env

    # -- one iteration -----------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        """Rollouts, rewards, advantages, update (see the module docstring); the metrics."""
        c, env = self.config, self._check_setup()
        assert self.optim is not None
        per_rank = self.samples_per_iteration // self.optim.world_size
        seeds = [self.rollout_seed(j) for j in range(per_rank // env.num_envs)]
        group = min(c.samples_per_case, env.num_envs)
        picks = None
        if group > 1:
            rng = np.random.default_rng(self.rollout_seed(len(seeds)))
            picks = [case_groups(len(env.core.source), env.num_envs, group, rng) for _ in seeds]
        ro = collect(env, self.sampling_policy(), seeds, c.sample_eta, picks)
        rewards = ro.rewards
        self._check_rewards(ro, rewards, seeds)

        # advantages over every process's samples, per case; this rank's slice
        everyone = self.optim.gather(torch.as_tensor(np.stack([rewards, ro.score_normalised,
                                                               ro.reference_mae_gy, ro.kl], 1)))  # fmt: skip
        all_rewards = everyone[:, 0].double().numpy()
        keys = self.optim.gather_objects(ro.case_keys)
        adv = self.advantages(keys, all_rewards)
        mine = slice(self.optim.rank * len(ro), (self.optim.rank + 1) * len(ro))
        adv = clip_advantages(adv[mine], c.train_adv_clip_max)

        self.optim.set_iteration(self.iteration, max(self.total_iterations, self.iteration + 1))
        stats = self.update(ro, adv)
        scores, mae, kl = (everyone[:, j].double().numpy() for j in (1, 2, 3))
        kl_mean = float(np.nanmean(kl)) if np.isfinite(kl).any() else stats.pop("kl_penalty", math.nan)
        return {
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()),
            "score_mean": float(np.nanmean(scores)),
            "kl_mean": kl_mean,
            "mae_gy": float(np.nanmean(mae)) if np.isfinite(mae).any() else math.nan,
            "tied_fraction": tied_fraction(keys, all_rewards),
            **stats,
        }

    def advantages(self, keys: list[str], rewards: np.ndarray) -> np.ndarray:
        """The advantages of every process's samples (before clipping): per case through the
        stat tracker, else over the batch."""
        return self.tracker.update(keys, rewards) if self.tracker else batch_advantages(rewards)

    def drawn_steps(self, n: int, steps: int, gen: torch.Generator) -> torch.Tensor:
        """``(n, k)`` chain-step indices each sample trains on this epoch: a random subset of
        :meth:`num_train_timesteps` of its ``steps``."""
        k = self.num_train_timesteps()
        return torch.stack([torch.randperm(steps, generator=gen)[:k] for _ in range(n)])

    def old_log_prob(self, log_prob: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The log-prob the ratio is taken against (DDPO: the rollout's)."""
        return old

    def _check_rewards(self, ro: Rollouts, rewards: np.ndarray, seeds: list[int]) -> None:
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            i, b, steps = int(bad[0]), self.env.num_envs, self.config.sample_num_steps
            raise self.nonfinite_error(
                f"the reward of episode {i} (case {ro.case_keys[i]!r}, rollout batch {i // b} reset with "
                f"seed {seeds[i // b]}) is {rewards[i]} at its last step {steps}/{steps}"
                + (f"; {bad.size - 1} more episodes too" if bad.size > 1 else "")
            )

    def update(self, ro: Rollouts, advantages: np.ndarray) -> dict[str, float]:
        """The inner epochs of the update (see the module docstring); mean loss, gradient norm,
        clip fraction, approximate KL and (``kl_weight`` > 0) the KL penalty."""
        c = self.config
        assert self.optim is not None
        model, device = self.optim.model, self.policy.device
        scheduler = self.env.core.chain.scheduler
        reference = self.reference().model if c.kl_weight > 0 else None
        n, steps, k = len(ro), len(ro.timesteps), self.num_train_timesteps()
        adv = torch.as_tensor(advantages, dtype=torch.float32)
        gen = self.generator()
        first_norm = len(self.optim.grad_norms)
        sums: dict[str, list[float]] = {"loss": [], "clipfrac": [], "approx_kl": [], "kl_penalty": []}
        for epoch in range(c.train_num_inner_epochs):
            perm = torch.randperm(n, generator=gen)
            drawn = self.drawn_steps(n, steps, gen)
            for start in range(0, n, c.train_batch_size):
                idx = perm[start : start + c.train_batch_size]
                cond = ro.conditions(idx, device)
                for j in range(k):
                    step = drawn[idx, j]
                    x = ro.x_t[idx, step].to(device)
                    x_prev = ro.x_prev[idx, step].to(device)
                    t = ro.timesteps[step].to(device)
                    mean, std = step_gaussian(model, scheduler, x, t, cond, c.sample_eta)
                    log_prob = gaussian_log_prob(x_prev, mean, std)
                    old = self.old_log_prob(log_prob, ro.log_probs[idx, step].to(device))
                    loss, st = ddpo_loss(log_prob, old, adv[idx].to(device), c.mode, c.train_clip_range)
                    if reference is not None:
                        with torch.no_grad():
                            ref_mean, _ = step_gaussian(reference, scheduler, x, t, cond, c.sample_eta)
                        kl = gaussian_kl(mean, std, ref_mean, std).mean()
                        loss = loss + c.kl_weight * kl
                        sums["kl_penalty"].append(float(kl.detach()))
                    where = (
                        f"epoch {epoch + 1}, minibatch {start // c.train_batch_size + 1}, trained step "
                        f"{j + 1}/{k} (cases {[ro.case_keys[int(i)] for i in idx]}, chain steps "
                        f"{[int(s) + 1 for s in step]} of {steps})"
                    )
                    try:
                        self.optim.backward(loss, where)
                    except AgentError as exc:
                        raise self.nonfinite_error(str(exc)) from None
                    sums["loss"].append(float(loss.detach()))
                    sums["clipfrac"].append(float(st["clipfrac"]))
                    sums["approx_kl"].append(float(st["approx_kl"]))
        norms = self.optim.grad_norms[first_norm:]
        out = {key: float(np.mean(v)) for key, v in sums.items() if v}
        out["grad_norm"] = float(np.mean(norms)) if norms else math.nan
        return out
