"""``dosegym/ScorecardBandit-v0``: one step, the action is a whole dose, the reward its score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from dosegym.envs.adapters import DoseEnv, DoseVectorEnv
from dosegym.envs.config import TEMPERATURE_CHECK, EnvConfig
from dosegym.envs.core import DoseCore, Transition
from dosegym.envs.reward import masked_mae
from dosegym.errors import EnvError
from dosegym.scorecards.soft_card import SoftScorecard


@dataclass(frozen=True, eq=False)
class BanditConfig(EnvConfig):
    """ScorecardBandit's arguments: :class:`~dosegym.envs.config.EnvConfig`'s plus
    ``max_dose`` (upper action bound, x highest Rx) and ``temperature_gy`` (of ``soft_score``)."""

    max_dose: float = 2.0
    temperature_gy: float = 1.0

    CHECKS = {"max_dose": (">0", "a finite number > 0 (x highest Rx)"), "temperature_gy": TEMPERATURE_CHECK}


class BanditCore(DoseCore):
    """B one-step Bandit episodes: the action is each episode's dose on the model grid."""

    config_class = BanditConfig

    config: BanditConfig

    def __init__(self, config: BanditConfig, batch: int, unbatched: bool = False) -> None:
        super().__init__(config, batch, unbatched)
        self.max_dose = config.max_dose
        self.single_action_space = spaces.Box(0.0, self.max_dose, self.gen_shape, np.float32)
        self.single_observation_space = spaces.Dict(self.cond_spaces())
        self.ended_message = "the episode has ended (one step); call reset() to start a new one"
        self._doses: torch.Tensor | None = None
        self._done = False

    def _begin(self, rngs: list[np.random.Generator]) -> list[dict[str, Any]]:
        self._doses, self._done = None, False
        return [{"rx_gy": cd.rx_gy} for cd in self.cds]

    @property
    def running(self) -> bool:
        return not self._done

    def _transition(self, actions: Any) -> Transition:
        x = self.as_action(actions, self.single_action_space)
        self._doses, self._done = x, True
        return Transition(x, None, None, True, [{"rx_gy": cd.rx_gy} for cd in self.cds])

    def observation(self) -> dict[str, Any]:
        return self.batch_cond_obs()

    def current_x0(self, i: int) -> torch.Tensor:
        if self._doses is None:
            return torch.zeros(self.gen_shape, device=self.device)
        return self._doses[i]

    def soft_score(self, i: int, dose: torch.Tensor) -> torch.Tensor:
        """Normalised soft scorecard totals ``(K,)`` of model-grid doses ``(K, C, Z, Y, X)``
        for episode ``i``'s case (see :meth:`ScorecardBanditEnv.soft_score`)."""
        if not self.cds:
            raise EnvError("soft_score() before reset(): call reset() first")
        if dose.ndim != 5 or tuple(dose.shape[1:]) != self.gen_shape:
            raise EnvError(f"soft_score: dose shape {tuple(dose.shape)}; expected (B, *{self.gen_shape})")
        cd = self.cds[i]
        dose_gy = cd.decoder.decode(dose.to(self.device)[:, 0])
        if cd.soft_card is None:
            cd.soft_card = SoftScorecard(cd.bound)
        return cd.soft_card.score(dose_gy, temperature=self.config.temperature_gy).normalised

    def differentiable_reward(self, i: int, dose: torch.Tensor) -> torch.Tensor:
        """The reward's differentiable twin for episode ``i``'s case, ``(K,)`` of model-grid
        doses ``(K, C, Z, Y, X)``: ``w_score * dense - w_fid * F`` with the reward's dense score
        (``reward.score="dense"``, model grid) and fidelity ``F`` (MAE to the anchor over the
        body, decoded onto the case grid as the reward decodes, in units of Rx)."""
        cfg = self.reward_config
        if not self.cds:
            raise EnvError("differentiable_reward() before reset(): call reset() first")
        if cfg.score != "dense":
            raise EnvError(
                "differentiable_reward needs reward.score='dense' (the exact card's points are flat "
                "past each curve's end, so their gradient is 0 where targets underdose)"
            )
        if dose.ndim != 5 or tuple(dose.shape[1:]) != self.gen_shape:
            raise EnvError(
                f"differentiable_reward: dose shape {tuple(dose.shape)}; expected (K, *{self.gen_shape})"
            )
        cd = self.cds[i]
        dose = dose.to(self.device)
        reward = cfg.w_score * self.dense_scores(cd, dose)
        if cfg.w_fid > 0:
            _, anchor = self.fidelity_anchor(cd, None)
            dose_gy = cd.decoder.decode(dose[:, 0])
            reward = reward - cfg.w_fid * masked_mae(dose_gy, anchor, cd.body) / cd.rx_gy
        return reward


class ScorecardBanditEnv(DoseEnv):
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
    ``temperature_gy`` (of :meth:`soft_score`, default 1 Gy): the fields of
    :class:`BanditConfig` (also accepted whole as ``config=``).
    """

    core_class = BanditCore

    def soft_score(self, dose: torch.Tensor) -> torch.Tensor:
        """The reward's smooth twin: normalised soft scorecard total ``(B,)`` of model-grid
        doses ``(B, C, Z, Y, X)`` (normalised units, as actions) for the current case,
        decoded onto the case grid as the reward decodes them and scored with the card's
        soft metrics (:mod:`dosegym.scorecards.soft`, smoothing ``temperature_gy``);
        differentiable with respect to ``dose``."""
        return self.core.soft_score(0, dose)

    def differentiable_reward(self, dose: torch.Tensor) -> torch.Tensor:
        """The reward's differentiable twin ``(B,)`` of model-grid doses ``(B, C, Z, Y, X)`` for
        the current case (``reward.score="dense"``; see :meth:`BanditCore.differentiable_reward`)."""
        return self.core.differentiable_reward(0, dose)


class ScorecardBanditVectorEnv(DoseVectorEnv):
    """``num_envs`` Bandit episodes at once (see :class:`~dosegym.envs.adapters.DoseVectorEnv`):
    actions ``(B, C, Z, Y, X)``, every sub-env terminating after its one step."""

    core_class = BanditCore

    def soft_score(self, dose: torch.Tensor) -> torch.Tensor:
        """Soft totals ``(B,)`` of doses ``(B, C, Z, Y, X)``, row ``i`` for sub-env ``i``'s case."""
        if dose.ndim != 5 or dose.shape[0] != self.num_envs:
            raise EnvError(
                f"soft_score: dose shape {tuple(dose.shape)}; expected ({self.num_envs}, C, Z, Y, X)"
            )
        return torch.cat([self.core.soft_score(i, dose[i : i + 1]) for i in range(self.num_envs)])

    def differentiable_reward(self, dose: torch.Tensor) -> torch.Tensor:
        """The reward's differentiable twin ``(B,)`` of doses ``(B, C, Z, Y, X)``, row ``i`` for
        sub-env ``i``'s case (``reward.score="dense"``)."""
        if dose.ndim != 5 or dose.shape[0] != self.num_envs:
            raise EnvError(
                f"differentiable_reward: dose shape {tuple(dose.shape)}; "
                f"expected ({self.num_envs}, C, Z, Y, X)"
            )
        return torch.cat([self.core.differentiable_reward(i, dose[i : i + 1]) for i in range(self.num_envs)])
