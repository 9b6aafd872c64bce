"""``dosegym/GuidedDose-v0``: steer a frozen dose model with per-objective guidance weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from dosegym.diffusion.policy import DosePolicy
from dosegym.diffusion.sample import seeded_generator
from dosegym.diffusion.slots import collate
from dosegym.envs.base import (
    CaseData,
    DoseEnvBase,
    ReverseChain,
    check_seed,
    count_arg,
    default_card_name,
    reject_unknown_kwargs,
)
from dosegym.envs.reward import RewardConfig, compose, gaussian_kl
from dosegym.errors import EnvError
from dosegym.scorecards.groups import GROUP_NAMES
from dosegym.scorecards.scorecard import Scorecard


class GuidedDoseEnv(DoseEnvBase):
    """
    ## Description

    The pretrained dose model stays frozen; at every reverse step the agent chooses how hard
    to push the model's prediction towards each group of scorecard objectives. The push is
    gradient guidance from the differentiable (soft) scorecard on the predicted clean dose
    x̂0, applied to x̂0 itself, after which the step mean is re-derived (x̂0 guidance, as in
    universal / reconstruction guidance, rather than classifier guidance on x_t):

    1. the frozen model gives x̂0 = x̂0(x_t) and the unguided step Gaussian (mean, std);
    2. for each objective group g (:data:`~dosegym.envs.base.GROUP_NAMES`: ``targets``, one
       group per canonical OAR group, ``hot_spots``; items assigned by
       :func:`~dosegym.envs.base.objective_group`) the gradient with respect to x̂0 of the
       group's soft objective (its items' soft metrics on the model grid, Gy = x̂0 x highest
       Rx, each along its scoring curve's slope, see :class:`~dosegym.envs.base.SoftScorer`)
       is scaled so that its largest voxel value is 1: d_g;
    3. x̂0' = x̂0 + guidance_scale * sum_g w_g d_g, with w_g = (a_g + 1) / 2 in [0, 1];
    4. the model output implied by x̂0' at x_t is fed to the sampler's step, giving the guided
       mean (same std), and x_{t-1} = mean' + std * noise (noise from the env's RNG).

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
    """

    def __init__(
        self,
        policy: DosePolicy | None = None,
        cases: Any = "phantoms:headneck",
        scorecard: str | Path | Scorecard | None = None,
        steps: int = 20,
        reward: RewardConfig | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        obs_backend: str = "numpy",
        render_mode: str | None = None,
        guidance_scale: float = 0.1,
        temperature_gy: float = 1.0,
        pool: int = 4,
        case_cache: int = 16,
        allow_card_mismatch: bool = False,
        rescale_card: bool = False,
        **unknown: Any,
    ) -> None:
        reject_unknown_kwargs(type(self), unknown)
        super().__init__(
            policy,
            cases,
            scorecard,
            steps,
            reward,
            device,
            obs_backend,
            render_mode,
            case_cache=case_cache,
            allow_card_mismatch=allow_card_mismatch,
            rescale_card=rescale_card,
        )
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise EnvError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not (math.isfinite(temperature_gy) and temperature_gy > 0):
            raise EnvError(f"temperature_gy must be a finite number of Gy > 0, got {temperature_gy!r}")
        self.guidance_scale = float(guidance_scale)
        self.temperature_gy = float(temperature_gy)
        self.pool = count_arg("pool", pool)
        self.cards.fixed = self._one_card()
        n_items = len(self.cards.fixed.items)
        n_features = 2 * self.gen_shape[0] * self.pool**3
        self.action_space = spaces.Box(-1.0, 1.0, (len(GROUP_NAMES),), np.float32)
        self.observation_space = spaces.Dict(
            {
                "timestep": spaces.Box(0.0, 1.0, (1,), np.float32),
                "scores": spaces.Box(0.0, 1.0, (n_items,), np.float32),
                "features": spaces.Box(-self.x_bound, self.x_bound, (n_features,), np.float32),
            }
        )
        self.chain = ReverseChain(self.policy, self.steps)
        self._cd: CaseData | None = None
        self._items: torch.Tensor | None = None
        self._dirs: torch.Tensor | None = None

    def _one_card(self) -> Scorecard:
        if self.cards.fixed is not None:
            return self.cards.fixed
        names = set()
        for i in range(len(self.source)):
            site, is_phantom = self.source.site(i)
            if site is not None:
                names.add(default_card_name(site, bool(is_phantom)))
        if not names:
            case = self.source.load(0)
            names.add(default_card_name(case.meta.get("site"), case.meta.get("format") == "phantom"))
        if len(names) > 1:
            raise EnvError(
                f"GuidedDose scores every case with one card, but the source's sites need "
                f"{sorted(names)}; pass scorecard= or a single-site source"
            )
        return self.cards.load(names.pop())

    # -- Gymnasium API ------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=check_seed(seed))
        cd = self._choose_case(self.np_random, options)
        sampler_seed = self._sampler_seed(self.np_random)
        self.chain.start(collate([cd.cond_input]).to(self.device), [seeded_generator(sampler_seed)], [cd.key])
        self._cd, self._last_report = cd, None
        self._analyse()
        info = {
            "case_id": cd.case.case_id,
            "case_key": cd.key,
            "sampler_seed": sampler_seed,
            "scorecard": cd.card.name,
            "score_matched_fraction": cd.fit.matched_fraction,
            "step": 0,
            "timestep": int(self.chain.t),
        }
        return self._obs(), info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        cd = self._running()
        weights = (self.as_action(action, self.action_space)[0] + 1.0) / 2.0
        assert self._dirs is not None and self.chain.x is not None
        dist = self.chain.distribution()
        x, t = self.chain.x, self.chain.t
        delta = self.guidance_scale * (weights.reshape(-1, 1, 1, 1, 1) * self._dirs).sum(0, keepdim=True)
        guided = self.chain.step_from_output(
            self.chain.output_for_x0(dist.pred_original_sample + delta, x, t), x, t
        )
        x_prev = guided.mean + guided.std * self.chain.noise()
        kl = None
        if bool((dist.std > 0).all()):
            kl = float(gaussian_kl(guided.mean, guided.std, dist.mean, dist.std)[0])
        last = self.chain.k == self.steps - 1
        pretrained_x0 = dist.pred_original_sample[0]
        self.chain.advance(x_prev)
        if last:
            reward, info = self.finish(cd, x_prev[0], pretrained_x0, kl)
        else:
            reward, terms = compose(self.reward_config, None, None, kl)
            info = {"reward_terms": terms}
        self._analyse()
        info.update(
            step=self.chain.k,
            timestep=int(t),
            guidance_weights=weights.cpu().numpy().tolist(),
            guidance_max=float(delta.abs().max()),
        )
        if kl is not None:
            info["kl"] = kl
        return self._obs(), float(reward), last, False, info

    # -- internals ----------------------------------------------------------------------
    def _analyse(self) -> None:
        """Soft item scores and group directions at the current state (scores only at the end)."""
        assert self._cd is not None and self.chain.x is not None
        soft = self.soft_scorer(self._cd, self.temperature_gy)
        if self.chain.running:
            x0 = self.chain.distribution().pred_original_sample
            self._items, self._dirs = soft.group_directions(x0)
        else:
            with torch.no_grad():
                self._items = soft.item_scores(self.chain.x)[0]
            self._dirs = None

    def _running(self) -> CaseData:
        if self._cd is None or self.chain.x is None:
            raise EnvError("step() before reset(): call reset() first")
        if not self.chain.running:
            raise EnvError("the episode has ended (terminated); call reset() to start a new one")
        return self._cd

    def _x0(self) -> torch.Tensor:
        assert self.chain.x is not None
        if self.chain.running:
            return self.chain.distribution().pred_original_sample
        return self.chain.x

    def _obs(self) -> dict[str, Any]:
        assert self._items is not None and self.chain.x is not None
        scores = torch.nan_to_num(self._items.float(), nan=0.0).clamp(0.0, 1.0)
        pooled = F.adaptive_avg_pool3d(torch.cat([self.chain.x, self._x0()], dim=1), self.pool)
        ts = torch.tensor([self.chain.timestep_fraction()], dtype=torch.float32)
        return {
            "timestep": self.to_obs(ts),
            "scores": self.to_obs(scores),
            "features": self.to_obs(pooled.reshape(-1).clamp(-self.x_bound, self.x_bound)),
        }

    def current_x0(self) -> tuple[CaseData, torch.Tensor] | None:
        if self._cd is None or self.chain.x is None:
            return None
        return self._cd, self._x0()[0]
