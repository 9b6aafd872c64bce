"""What the stable-baselines3 agents share: whole-episode rollouts, seeds, the LR schedule, the loop.

:class:`SB3Agent` drives an SB3 algorithm (``self.model``, built by the subclass's
``setup_training``) on a :class:`~dosegym.agents.sb3_env.CoreVecEnv` (``self.vec_env``) one
iteration at a time: an iteration is ``samples_per_iteration`` whole episodes
(``model.learn`` of ``samples_per_iteration * sample_num_steps`` env steps, which for an
on-policy algorithm is one rollout of SB3's ``n_steps`` = :meth:`SB3Agent.n_steps` and one
update) as the shared loop's :meth:`~dosegym.agents.base.Agent.train_iteration`, whose
metrics come from the episodes' infos and SB3's logger. Every random draw of iteration
``k`` comes from ``(seed, k, index)``
(:func:`~dosegym.agents.sb3_env.rollout_seed`): episode resets, and SB3's global draws under
:func:`~dosegym.agents.sb3_env.scoped_seed`, so a resumed run needs no RNG state. The
learning rate follows the config's schedule per iteration (:class:`IterationSchedule`, the
callable SB3 is given). ``grad_norm`` is the largest gradient norm over the iteration's
optimizer steps, taken after SB3's clipping; ``loss`` and ``grad_norm`` are absent from an
iteration without an update (SAC before ``learning_starts``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pydantic import Field

from dosegym.agents.base import Agent
from dosegym.agents.config import AgentConfig
from dosegym.agents.sb3_env import (
    ACTION_NOISE,
    EPISODES,
    CoreVecEnv,
    EpisodeResult,
    rollout_seed,
    scoped_seed,
)
from dosegym.errors import AgentError


class PPOFields(AgentConfig):
    """The fields of SB3's PPO that both PPO agents share (SB3's defaults; each agent's config
    overrides where its action space needs another)."""

    n_steps: int | None = Field(None, ge=1)
    """SB3's env steps per env per rollout: None or samples_per_iteration / num_envs * sample_num_steps."""
    batch_size: int = Field(64, ge=2)
    """Transitions per minibatch of the update (the update's memory grows with it)."""
    n_epochs: int = Field(10, ge=1)
    """Passes over the rollout per update."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor (1: the episode's end score counts in full at every step)."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """GAE lambda (bias-variance trade-off of the advantages)."""
    clip_range: float = Field(0.2, gt=0)
    """PPO clip range of the probability ratio."""
    ent_coef: float = Field(0.0, ge=0)
    """Entropy coefficient."""
    vf_coef: float = Field(0.5, ge=0)
    """Value loss coefficient."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Gradient norm clip of each minibatch step."""
    target_kl: float | None = Field(None, gt=0)
    """Stop an update's epochs early past this approximate KL (None: never)."""


class IterationSchedule:
    """SB3's learning-rate schedule: the config's rate at the iteration the agent sets
    (SB3's progress argument is ignored); picklable, so it survives ``model.save``."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.iteration = 0
        self.total = 1

    def __call__(self, _progress_remaining: float) -> float:
        return self.config.learning_rate_at(self.iteration, max(1, self.total))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


class SB3Agent(Agent):
    """Base of the SB3 agents (see the module docstring)."""

    def __init__(self, env: Any = None, policy: Any = None, config: Any = None, **kw: Any) -> None:
        super().__init__(env, policy, config, **kw)
        self._reset_training()

    def _reset_training(self) -> None:
        self.model: Any = None
        self.vec_env: CoreVecEnv | None = None
        self.schedule = IterationSchedule(self.config)
        self._grad_norms: list[float] = []

    # -- sizes ----------------------------------------------------------------------------
    def num_envs(self) -> int:
        """Episodes the env steps at once."""
        return int(getattr(self.env, "num_envs", 1))

    def n_steps(self) -> int:
        """SB3's ``n_steps`` of whole episodes: ``samples_per_iteration / num_envs *
        sample_num_steps``; a config ``n_steps`` must be that (or None)."""
        c = self.config
        n = self.samples_per_iteration // self.num_envs() * c.sample_num_steps
        given = getattr(c, "n_steps", None)
        if given is not None and given != n:
            raise AgentError(
                f"n_steps {given} does not make whole episodes of samples_per_iteration "
                f"{self.samples_per_iteration} on {self.num_envs()} envs with sample_num_steps "
                f"{c.sample_num_steps}; valid: n_steps={n} or None"
            )
        return n

    def make_vec_env(self, core: Any, model_conditions: bool = False) -> CoreVecEnv:
        """The SB3 env over ``core``, episodes seeded from ``(seed, iteration, index)``."""
        self.vec_env = CoreVecEnv(core, self._episode_seeds, model_conditions)
        return self.vec_env

    def _episode_seeds(self, round_: int) -> list[int]:
        b = self.num_envs()
        iteration, j = divmod(round_, self.samples_per_iteration // b)
        return [rollout_seed(self.config.seed, iteration, j * b + i, EPISODES) for i in range(b)]

    def record_grad_norms(self, *optimizers: torch.optim.Optimizer) -> None:
        """Record the gradient norm of every step of ``optimizers`` (for ``grad_norm``)."""
        for opt in optimizers:
            opt.register_step_pre_hook(self._record_grad_norm)

    def _record_grad_norm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads])
            self._grad_norms.append(float(torch.linalg.vector_norm(norms)))

    # -- the loop -------------------------------------------------------------------------
    def setup_training(self, iterations: int) -> None:
        """Build ``self.model`` and ``self.vec_env`` once (subclasses)."""
        raise NotImplementedError

    def before_iteration(self) -> None:
        """Hook: reseed what the subclass draws itself (called at the start of each iteration)."""

    def train_iteration(self) -> dict[str, float]:
        """One iteration: ``model.learn`` over ``samples_per_iteration`` whole episodes (one
        rollout and one update for PPO), seeded from ``(seed, iteration)``; their metrics."""
        assert self.vec_env is not None and self.model is not None
        c = self.config
        self.schedule.total = self.total_iterations
        self.schedule.iteration = self.iteration
        self.vec_env.round = self.iteration * (self.samples_per_iteration // self.num_envs())
        self._grad_norms = []
        self.before_iteration()
        with scoped_seed(rollout_seed(c.seed, self.iteration, 0, ACTION_NOISE)):
            self.model.learn(self.samples_per_iteration * c.sample_num_steps, reset_num_timesteps=False)
        return self.metrics(self.vec_env.take_episodes())

    def metrics(self, episodes: list[EpisodeResult]) -> dict[str, float]:
        """The iteration's metrics (the shared contract's keys, plus SB3's ``train/*`` values
        under their short names) from its episodes and SB3's logger."""
        logged = {
            k.removeprefix("train/"): float(v)
            for k, v in self.model.logger.name_to_value.items()
            if k.startswith("train/")
        }
        rewards = np.array([e.reward for e in episodes])
        out = {
            "lr": self.schedule(1.0),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "score_mean": _mean([e.score for e in episodes]),
            "kl_mean": _mean([e.kl for e in episodes]),
            "mae_gy": _mean([e.mae_gy for e in episodes]),
            "tied_fraction": float(np.ptp(rewards) == 0),
        }
        if self._grad_norms:
            loss = logged.pop(
                "loss", logged.get("actor_loss", math.nan) + logged.get("critic_loss", math.nan)
            )
            out.update(loss=loss, grad_norm=max(self._grad_norms))
        logged.pop("learning_rate", None)
        return {**logged, **out}
