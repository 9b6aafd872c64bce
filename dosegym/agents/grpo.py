"""GRPO for the reverse chain (Flow-GRPO / DanceGRPO style): DDPO's clipped importance-
sampled update with group-relative advantages and a KL to the reference.

It is :class:`~dosegym.agents.ddpo.DDPO` (``mode="is"``, read that file for the loop) with
three changes:

1. **Groups**: every rollout batch holds groups of ``samples_per_case`` (G) samples of one
   case; a sample's advantage is its reward against its own group of this iteration,
   ``(r - mean_g) / (std_g + 1e-6)`` (:func:`~dosegym.agents.stat_tracking.group_advantages`),
   no value network and no history. A group whose rewards all tie gets 0 (it teaches
   nothing); ``tied_fraction`` logs their share, and ``reward.score="dense"`` trains on the
   dense score, which rarely ties.
2. **KL**: ``kl_weight`` (β) times the closed-form Gaussian KL of each trained step to the
   frozen reference (on by default, as in GRPO; the reference runs only when it is > 0).
3. **Which steps train**: a random ``train_timestep_fraction`` of each sample's steps, or
   with ``train_last_k`` only its last K steps, where the dose takes its final shape
   (cheaper, in the spirit of Flow-GRPO-Fast's few trained steps).

``ratio_norm`` (off by default) is a simplified form of GRPO-Guard's ratio normalisation
against the negatively biased per-step ratio: each trained step's log-ratios are centred on
their minibatch mean before the ratio is clipped (GRPO-Guard also rescales by the step's
spread; not done here).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from dosegym.agents.ddpo import DDPO, DDPOConfig
from dosegym.agents.stat_tracking import group_advantages


class GRPOConfig(DDPOConfig):
    """GRPO's config: DDPO's fields plus its own (see the module docstring)."""

    agent_name: ClassVar[str] = "grpo"

    per_prompt_stat_tracking: bool = False
    """Unused by GRPO (its advantages are group-relative); kept False."""
    kl_weight: float = Field(0.01, ge=0)
    """β: KL to the frozen reference per trained step (0: off, the reference never runs)."""
    train_last_k: int | None = Field(None, ge=1)
    """Train only the last K chain steps of each sample; None: a random ``train_timestep_fraction``."""
    ratio_norm: bool = False
    """Centre each trained step's log-ratios on their minibatch mean (simplified GRPO-Guard)."""

    @model_validator(mode="after")
    def _grpo(self) -> GRPOConfig:
        if self.mode != "is":
            raise ValueError("GRPO's update is the clipped ratio: mode must be 'is'")
        if self.samples_per_case < 2:
            raise ValueError("GRPO compares samples of one case: samples_per_case (G) must be >= 2")
        if self.train_last_k is not None and self.train_last_k > self.sample_num_steps:
            raise ValueError(
                f"train_last_k {self.train_last_k} exceeds sample_num_steps {self.sample_num_steps}"
            )
        if self.per_prompt_stat_tracking:
            raise ValueError("GRPO's advantages are group-relative: per_prompt_stat_tracking must be False")
        return self


class GRPO(DDPO):
    """See the module docstring."""

    name = "grpo"
    Config = GRPOConfig
    config: GRPOConfig

    def num_train_timesteps(self) -> int:
        if self.config.train_last_k is not None:
            return int(self.config.train_last_k)
        return super().num_train_timesteps()

    def advantages(self, keys: list[str], rewards: np.ndarray) -> np.ndarray:
        """Group-relative advantages (each case's samples of this batch)."""
        return group_advantages(keys, rewards)

    def drawn_steps(self, n: int, steps: int, gen: torch.Generator) -> torch.Tensor:
        """The last ``train_last_k`` steps of every sample, else DDPO's random subset."""
        if self.config.train_last_k is None:
            return super().drawn_steps(n, steps, gen)
        last = torch.arange(steps - self.config.train_last_k, steps)
        return last.expand(n, -1).clone()

    def old_log_prob(self, log_prob: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """With ``ratio_norm``, the rollout's log-prob shifted by the minibatch's mean log-ratio."""
        if not self.config.ratio_norm:
            return old
        return old + (log_prob.detach() - old).mean()
