"""``dosegym/GuidedDose-v0``: steer a frozen dose model with per-objective guidance weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from dosegym.envs.adapters import DoseEnv, DoseVectorEnv
from dosegym.envs.cases import CaseData
from dosegym.envs.config import TEMPERATURE_CHECK, EnvConfig
from dosegym.envs.core import ChainCore, Transition
from dosegym.envs.guidance import SoftScorer
from dosegym.envs.reward import gaussian_kl
from dosegym.scorecards.groups import GROUP_NAMES
from dosegym.scorecards.soft_card import GroupDirections

#: Bound of the ``features`` Box (pooled x_t and x̂0, model units).
FEATURE_BOUND = 20.0


@dataclass(frozen=True, eq=False)
class GuidedConfig(EnvConfig):
    """GuidedDose's arguments: :class:`~dosegym.envs.config.EnvConfig`'s plus
    ``guidance_scale`` (>= 0, units of the highest Rx), ``temperature_gy`` (> 0) and ``pool``."""

    guidance_scale: float = 0.1
    temperature_gy: float = 1.0
    pool: int = 4

    CHECKS = {
        "guidance_scale": (">=0", "a finite number >= 0"),
        "temperature_gy": TEMPERATURE_CHECK,
        "pool": ("count", ""),
    }


class GuidedCore(ChainCore):
    """B GuidedDose episodes: the action is each episode's guidance weights."""

    config_class = GuidedConfig

    config: GuidedConfig

    def __init__(self, config: GuidedConfig, batch: int, unbatched: bool = False) -> None:
        super().__init__(config, batch, unbatched)
        n_items = len(self.cards.fix_one_card(self.source, "GuidedDose").items)
        n_features = 2 * self.gen_shape[0] * self.config.pool**3
        self.single_action_space = spaces.Box(-1.0, 1.0, (len(GROUP_NAMES),), np.float32)
        self.single_observation_space = spaces.Dict(
            {
                "timestep": spaces.Box(0.0, 1.0, (1,), np.float32),
                "scores": spaces.Box(0.0, 1.0, (n_items,), np.float32),
                "features": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (n_features,), np.float32),
            }
        )
        self._items: torch.Tensor | None = None
        self._dirs: list[GroupDirections] | None = None  # per sample (a batch of 1 each)

    def soft_scorer(self, cd: CaseData) -> SoftScorer:
        """The case's soft scorer on the model grid (cached per case)."""
        if cd.soft is None:
            cd.soft = SoftScorer(cd.card, cd.case, cd.resampler, self.config.temperature_gy)
        return cd.soft

    def _begin(self, rngs: list[np.random.Generator]) -> list[dict[str, Any]]:
        extras = super()._begin(rngs)
        self._after_step()
        return extras

    def _chain_step(self, actions: Any) -> Transition:
        weights = (self.as_action(actions, self.single_action_space) + 1.0) / 2.0
        assert self._dirs is not None and self.chain.x is not None
        dist = self.chain.distribution()
        # x̂0 moves by delta_i = scale * sum_g w_g d_g on the structures' voxels only, the step
        # mean by x0_gain * delta_i (same std): added where it is nonzero, its KL taken there
        x_prev = dist.mean + dist.std * self.chain.noise()
        flat, gain = x_prev.view(self.batch, -1), self.chain.x0_gain().reshape(-1)
        n, kls, extras = flat.shape[1], [], []
        for i, d in enumerate(self._dirs):
            delta = self.config.guidance_scale * d.weighted(weights[i : i + 1])  # (1, U)
            move = (gain[i] * delta).to(flat.dtype)
            flat[i].index_add_(0, d.voxels, move[0])
            if bool((dist.std[i] > 0).all()):
                std = dist.std[i].reshape(1, 1)
                kls.append(float(gaussian_kl(move, std, torch.zeros_like(move), std)[0]) * move.shape[1] / n)
            extras.append(
                {
                    "guidance_weights": weights[i].cpu().numpy().tolist(),
                    "guidance_max": float(delta.abs().max()),
                }
            )
        kl = np.asarray(kls, dtype=np.float32) if len(kls) == self.batch else None
        self.chain.advance(x_prev)
        return Transition(x_prev, dist.pred_original_sample, kl, False, extras)

    def _after_step(self) -> None:
        """Soft item scores and group directions at the current state (scores only at the end)."""
        assert self.chain.x is not None
        softs = [self.soft_scorer(cd) for cd in self.cds]
        if self.chain.running:
            x0 = self.chain.distribution().pred_original_sample
            items: list[torch.Tensor | None] = [None] * self.batch
            self._dirs = [None] * self.batch
            for soft in dict.fromkeys(softs):  # the samples of each case together: one search
                rows = [i for i, s in enumerate(softs) if s is soft]
                scores, dirs = soft.guidance(x0[rows])
                for j, i in enumerate(rows):
                    items[i], self._dirs[i] = scores[j], dirs._replace(values=dirs.values[j : j + 1])
            self._items = torch.stack(items)
        else:
            with torch.no_grad():
                x = self.chain.x
                self._items = torch.stack([soft.item_scores(x[i : i + 1])[0] for i, soft in enumerate(softs)])
            self._dirs = None

    def observation(self) -> dict[str, Any]:
        assert self._items is not None and self.chain.x is not None
        scores = torch.nan_to_num(self._items.float(), nan=0.0).clamp(0.0, 1.0)
        pool = self.config.pool  # each volume pooled alone: no (B, 2C, ...) copy of both
        pooled = torch.cat([F.adaptive_avg_pool3d(v, pool) for v in (self.chain.x, self.x0())], dim=1)
        features = pooled.reshape(self.batch, -1).clamp(-FEATURE_BOUND, FEATURE_BOUND)
        return {
            "timestep": self.timestep_obs(),
            "scores": self.to_obs(scores),
            "features": self.to_obs(features),
        }

    def current_x0(self, i: int) -> torch.Tensor:
        return self.x0()[i]


class GuidedDoseEnv(DoseEnv):
    """
    ## Description

    The pretrained dose model stays frozen; at every reverse step the agent chooses how hard
    to push the model's prediction towards each group of scorecard objectives. The push is
    gradient guidance from the differentiable (soft) scorecard on the predicted clean dose
    x̂0, applied to x̂0 itself, after which the step mean is re-derived (x̂0 guidance, as in
    universal / reconstruction guidance, rather than classifier guidance on x_t):

    1. the frozen model gives x̂0 = x̂0(x_t) and the unguided step Gaussian (mean, std);
    2. for each objective group g (:data:`~dosegym.scorecards.groups.GROUP_NAMES`: ``targets``, one
       group per canonical OAR group, ``hot_spots``; items assigned by
       :func:`~dosegym.scorecards.groups.objective_group`) the gradient with respect to x̂0 of the
       group's soft objective (its items' soft metrics on the model grid of the decoded dose,
       Gy = max(x̂0, 0) x highest Rx, the gradient passed straight through the clamp; each
       along its scoring curve's slope, see :class:`~dosegym.scorecards.soft_card.SoftScorecard`)
       is scaled so that its largest voxel value is 1: d_g;
    3. x̂0' = x̂0 + guidance_scale * sum_g w_g d_g, with w_g = (a_g + 1) / 2 in [0, 1];
    4. the sampler's step towards x̂0' at x_t: its mean is affine in x̂0, so
       mean' = mean + (d mean / d x̂0) (x̂0' - x̂0) (``ReverseChain.x0_gain``; the same as
       feeding the model output implied by x̂0' to the step), the std unchanged, and
       x_{t-1} = mean' + std * noise (noise from the env's RNG).

    Every Stable-Baselines3 algorithm for Box actions (PPO, SAC, TD3, A2C) runs on it with
    ``MultiInputPolicy``.

    ## Action Space

    ``Box(-1, 1, (10,), float32)``: one guidance weight per objective group, in the order of
    ``GROUP_NAMES``; -1 = no guidance for that group, +1 = full ``guidance_scale``. Actions
    outside [-1, 1], of the wrong shape or dtype, or with NaN raise ``EnvError``.

    ## Observation Space

    ``Dict``:

    - ``timestep``: ``Box(0, 1, (1,))``, the next step's timestep over
      ``num_train_timesteps - 1`` (0 at the end);
    - ``scores``: ``Box(0, 1, (n_items,))``, each card item's soft score of the current x̂0,
      normalised as ``(points - min) / (max - min)`` (0 for items the case lacks);
    - ``features``: ``Box(-20, 20, (2 * C * pool**3,))``, x_t and x̂0 adaptive-average-pooled
      to ``pool``³ per channel, flattened (clamped to the bounds).

    ## Rewards

    :mod:`dosegym.envs.reward`: on the last step ``w_score * S - w_fid * F`` (the exact
    scorecard of the decoded dose; fidelity against the reference or the unguided x̂0 of the
    last step), and at every step ``-w_kl * KL(guided step || unguided step)`` (the KL of a
    deterministic step, std = 0, is not charged).

    ## Starting State

    As DenoiseDose: a case drawn with ``np_random``, x_T from the generator seeded with
    ``info["sampler_seed"]``.

    ## Episode End

    Terminates after ``steps`` steps. Never truncated.

    ## Info

    As DenoiseDose (no ``log_prob``; ``score_matched_fraction`` at reset and on the last
    step), plus ``guidance_weights`` (the w_g of the step), ``guidance_max`` (the largest x̂0
    change it made) and ``kl`` (guided vs unguided step).

    ## Arguments

    As DenoiseDose (``policy``, ``cases``, ``scorecard``, ``steps``, ``reward``, ``device``,
    ``obs_backend``, ``render_mode``, ``case_cache``, ``allow_card_mismatch``,
    ``rescale_card``), plus ``guidance_scale`` (the largest x̂0 change per group at full
    weight, in units of the highest Rx; default 0.1), ``temperature_gy`` (smoothing of the
    soft metrics, default 1 Gy) and ``pool`` (an integer >= 1, default 4).
    One card scores every case: ``scorecard`` or, without one, the default card of the
    source's site (a source whose sites need different default cards raises ``EnvError``).
    The arguments are the fields of :class:`GuidedConfig` (also accepted whole as ``config=``).
    """

    core_class = GuidedCore


class GuidedDoseVectorEnv(DoseVectorEnv):
    """``num_envs`` GuidedDose episodes in lockstep, one batched model forward per step (see
    :class:`~dosegym.envs.adapters.DoseVectorEnv`); actions ``(B, n_groups)``."""

    core_class = GuidedCore
