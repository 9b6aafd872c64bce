"""``dosegym/ScorecardBandit-v0``: one step, the action is a whole dose, the reward its score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from dosegym.diffusion.policy import DosePolicy
from dosegym.envs.base import CaseData, DoseEnvBase, check_seed, reject_unknown_kwargs
from dosegym.envs.reward import RewardConfig
from dosegym.errors import EnvError
from dosegym.scorecards.scorecard import Scorecard
from dosegym.scorecards.soft_card import SoftScorecard


class ScorecardBanditEnv(DoseEnvBase):
    """
    ## Description

    A contextual bandit over whole doses: the context is a case (its model-grid conditions),
    the action a dose on the model grid, the reward the scorecard of that dose decoded onto
    the case grid. Its use is checking reward hacking: an optimiser that sees only the
    scorecard finds doses no machine could deliver (cold organs beside hot targets, sharp
    unphysical edges); the fidelity term (and, in the chain envs, the KL term) of the reward
    holds it near physical doses. :meth:`soft_score` gives a differentiable scorecard of
    doses for gradient-based optimisers.

    ## Action Space

    ``Box(0, max_dose, (C, Z, Y, X), float32)``: the dose on the model grid in **normalised
    units** (1.0 = the case's highest prescription; Gy = action x ``info["rx_gy"]``), decoded
    onto the case grid as the policy decodes (trilinear, zero outside the body). Actions
    outside the bounds, of the wrong shape or dtype, or with NaN raise ``EnvError``.

    ## Observation Space

    ``Dict`` of the condition slots: ``cond_<slot>`` Boxes on the model grid and
    ``cond_present`` (as DenoiseDose, without ``x_t`` and ``timestep``).

    ## Rewards

    :mod:`dosegym.envs.reward` with no KL term (there is no chain): ``w_score * S - w_fid * F``;
    the ``pretrained`` fidelity anchor is the mean dose of ``baseline_samples`` pretrained
    samples of the case (``steps`` reverse steps each).

    ## Starting State

    A case drawn uniformly from the source with ``np_random`` (or ``options["case_index"]``).

    ## Episode End

    Terminates after the one step.

    ## Info

    At reset: ``case_id``, ``case_key``, ``scorecard``, ``score_matched_fraction`` (as
    DenoiseDose) and ``rx_gy``; after the step: the last-step keys of DenoiseDose and ``rx_gy``.

    ## Arguments

    As DenoiseDose (``policy``, ``cases``, ``scorecard``, ``steps`` (of the pretrained samples
    behind the baseline and the anchor), ``reward``, ``device``, ``obs_backend``,
    ``render_mode``, ``case_cache``, ``allow_card_mismatch``, ``rescale_card``), plus
    ``max_dose`` (upper action bound in units of the highest Rx, default 2.0) and
    ``temperature_gy`` (of :meth:`soft_score`, default 1 Gy).
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
        max_dose: float = 2.0,
        temperature_gy: float = 1.0,
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
        if not (math.isfinite(max_dose) and max_dose > 0):
            raise EnvError(f"max_dose must be a finite number > 0 (x highest Rx), got {max_dose!r}")
        if not (math.isfinite(temperature_gy) and temperature_gy > 0):
            raise EnvError(f"temperature_gy must be a finite number of Gy > 0, got {temperature_gy!r}")
        self.max_dose = float(max_dose)
        self.temperature_gy = float(temperature_gy)
        self.action_space = spaces.Box(0.0, self.max_dose, self.gen_shape, np.float32)
        self.observation_space = spaces.Dict(self.cond_spaces())
        self._cd: CaseData | None = None
        self._dose: torch.Tensor | None = None
        self._done = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=check_seed(seed))
        cd = self._choose_case(self.np_random, options)
        self._cd, self._dose, self._done, self._last_report = cd, None, False, None
        info = {
            "case_id": cd.case.case_id,
            "case_key": cd.key,
            "scorecard": cd.card.name,
            "score_matched_fraction": cd.fit.matched_fraction,
            "rx_gy": cd.rx_gy,
        }
        return self.cond_obs(cd), info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self._cd is None:
            raise EnvError("step() before reset(): call reset() first")
        if self._done:
            raise EnvError("the episode has ended (one step); call reset() to start a new one")
        x = self.as_action(action, self.action_space)
        reward, info = self.finish(self._cd, x[0], None, None)
        self._dose, self._done = x[0], True
        info["rx_gy"] = self._cd.rx_gy
        return self.cond_obs(self._cd), float(reward), True, False, info

    def soft_score(self, dose: torch.Tensor) -> torch.Tensor:
        """The reward's smooth twin: normalised soft scorecard total ``(B,)`` of model-grid
        doses ``(B, C, Z, Y, X)`` (normalised units, as actions) for the current case,
        decoded onto the case grid as the reward decodes them and scored with the card's
        soft metrics (:mod:`dosegym.scorecards.soft`, smoothing ``temperature_gy``);
        differentiable with respect to ``dose``."""
        if self._cd is None:
            raise EnvError("soft_score() before reset(): call reset() first")
        if dose.ndim != 5 or tuple(dose.shape[1:]) != self.gen_shape:
            raise EnvError(f"soft_score: dose shape {tuple(dose.shape)}; expected (B, *{self.gen_shape})")
        cd = self._cd
        dose_gy = cd.resampler.decode(dose.to(self.device)[:, 0])
        if "soft_card" not in cd.extras:
            cd.extras["soft_card"] = SoftScorecard(cd.bound)
        return cd.extras["soft_card"].score(dose_gy, temperature=self.temperature_gy).normalised

    def current_x0(self) -> tuple[CaseData, torch.Tensor] | None:
        if self._cd is None:
            return None
        if self._dose is None:
            return self._cd, torch.zeros(self.gen_shape, device=self.device)
        return self._cd, self._dose
