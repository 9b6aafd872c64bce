"""Reward composition of the dose environments.

::

    reward = w_score * S  -  w_fid * F  -  w_kl * KL

* ``S``, the scorecard term, on the decoded dose (Gy, case grid), scaled by ``scale``:

  - ``"raw"``: the card's total points;
  - ``"normalised"`` (default): total / maximum, in [0, 1] (unmatched items left out of both);
  - ``"baseline"``: total points minus the pretrained policy's expected points on that case,
    estimated from ``baseline_samples`` pretrained samples (one batched chain seeded with
    ``baseline_seed``, same sampler, steps and eta as the env) and cached per case.

* ``F``, fidelity: mean absolute difference between the decoded dose and an anchor dose
  over the case's body (all voxels when it has none), **in units of the case's highest
  prescription** (0.01 = 1 % of Rx; ``info`` also logs it in Gy). The anchor (``fidelity``):

  - ``"reference"``: the case's reference dose (a case without one raises ``EnvError``);
  - ``"pretrained"``: the pretrained model's x̂0: in DenoiseDose and GuidedDose the frozen
    model's x̂0 prediction at the last step's state ``x_1``; in ScorecardBandit (no chain)
    the mean dose of the ``baseline_samples`` pretrained samples of the case;
  - ``"auto"`` (default): the reference where the case has one, else the pretrained x̂0.

* ``KL``: the per-step Gaussian KL between the acting policy's reverse step and the frozen
  pretrained one, :func:`gaussian_kl`, averaged over elements like the log-probability. It
  is charged at the step where it occurs (so episodes with ``w_kl > 0`` earn non-zero
  reward before the last step). DenoiseDose charges it when the agent tells the env its
  Gaussian (``env.unwrapped.set_agent_gaussian(mean, std)`` before ``step``); GuidedDose
  always (the guided step vs the unguided one); ScorecardBandit has no chain and no KL.

  With ``score="dense"`` (``scale`` must be ``"normalised"``) ``S`` is instead the *dense*
  normalised score of the final state on the model grid
  (:func:`~dosegym.scorecards.dense.dense_normalised`): soft metrics at
  ``dense_temperature_gy``, and points that keep falling past each curve's failing end at
  ``dense_leak`` times its mean slope, so samples that fail the same items by different
  margins do not tie (the exact card's points are flat there). ``info`` logs both
  (``score_normalised`` exact, ``score_dense``); evaluation stays on the exact card.

``S`` and ``F`` are computed on the last step only; earlier steps earn ``-w_kl * KL`` (0 by
default). Every term, weight and the scale are logged in ``info["reward_terms"]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from dosegym.errors import EnvError

SCALES: tuple[str, ...] = ("raw", "normalised", "baseline")
FIDELITY_ANCHORS: tuple[str, ...] = ("auto", "pretrained", "reference")
SCORES: tuple[str, ...] = ("exact", "dense")


@dataclass(frozen=True)
class RewardConfig:
    """Weights and options of the reward (see the module docstring).

    ``w_score``, ``w_fid``, ``w_kl``: finite weights >= 0. ``scale``: ``"raw"``,
    ``"normalised"`` or ``"baseline"``. ``fidelity``: ``"auto"``, ``"pretrained"`` or
    ``"reference"``. ``baseline_samples`` (>= 1) and ``baseline_seed``: the pretrained
    samples that estimate the baseline points and the Bandit's pretrained anchor. ``score``:
    ``"exact"`` or ``"dense"`` (with ``dense_temperature_gy`` > 0 and ``dense_leak`` >= 0).
    """

    w_score: float = 1.0
    w_fid: float = 0.0
    w_kl: float = 0.0
    scale: Literal["raw", "normalised", "baseline"] = "normalised"
    fidelity: Literal["auto", "pretrained", "reference"] = "auto"
    baseline_samples: int = 4
    baseline_seed: int = 0
    score: Literal["exact", "dense"] = "exact"
    dense_temperature_gy: float = 2.0
    dense_leak: float = 1.0

    def __post_init__(self) -> None:
        for name in ("w_score", "w_fid", "w_kl"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise EnvError(f"reward.{name} must be a finite number >= 0, got {v!r}")
        if self.scale not in SCALES:
            raise EnvError(f"reward.scale {self.scale!r} is unknown; valid: {list(SCALES)}")
        if self.fidelity not in FIDELITY_ANCHORS:
            raise EnvError(f"reward.fidelity {self.fidelity!r} is unknown; valid: {list(FIDELITY_ANCHORS)}")
        if self.score not in SCORES:
            raise EnvError(f"reward.score {self.score!r} is unknown; valid: {list(SCORES)}")
        if self.score == "dense" and self.scale != "normalised":
            raise EnvError(
                f"reward.score='dense' is a normalised score: use scale='normalised', not {self.scale!r}"
            )
        t, leak = self.dense_temperature_gy, self.dense_leak
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise EnvError(f"reward.dense_temperature_gy must be a finite number of Gy > 0, got {t!r}")
        if not isinstance(leak, (int, float)) or not math.isfinite(leak) or leak < 0:
            raise EnvError(f"reward.dense_leak must be a finite number >= 0, got {leak!r}")
        if int(self.baseline_samples) < 1:
            raise EnvError(f"reward.baseline_samples must be >= 1, got {self.baseline_samples}")

    @classmethod
    def coerce(cls, value: RewardConfig | dict[str, Any] | None) -> RewardConfig:
        """A config from ``None`` (defaults), a dict of fields or a config."""
        if value is None:
            return cls()
        if isinstance(value, RewardConfig):
            return value
        if not isinstance(value, dict):
            raise EnvError(
                f"reward must be a RewardConfig or a dict of its fields, got {type(value).__name__}"
            )
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - fields)
        if unknown:
            raise EnvError(f"reward: unknown field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor
) -> torch.Tensor:
    """``KL(N(mean_p, std_p^2) || N(mean_q, std_q^2))`` per sample, averaged over all
    non-batch elements (the convention of the policy's log-probability): ``(B,)``.

    ``std_*`` broadcast against the means (e.g. ``(B, 1, 1, 1, 1)``) and must be > 0.
    """
    std_p = torch.as_tensor(std_p, dtype=mean_p.dtype, device=mean_p.device)
    std_q = torch.as_tensor(std_q, dtype=mean_p.dtype, device=mean_p.device)
    if not bool((std_p > 0).all()) or not bool((std_q > 0).all()):
        raise EnvError("gaussian_kl: both standard deviations must be > 0 (a deterministic step has no KL)")
    var_p, var_q = std_p**2, std_q**2
    kl = torch.log(std_q / std_p) + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5
    kl = kl.expand(torch.broadcast_shapes(kl.shape, mean_p.shape, mean_q.shape))
    return kl.reshape(kl.shape[0], -1).mean(dim=1)


def score_term(total: float, maximum: float, scale: str, baseline_points: float | None) -> float:
    """``S`` for a report's ``total`` / ``maximum`` points under ``scale``."""
    if scale == "raw":
        return float(total)
    if scale == "normalised":
        return float(total) / float(maximum) if maximum > 0 else 0.0
    if baseline_points is None:
        raise EnvError("reward.scale 'baseline' needs the baseline points of the case")
    return float(total) - float(baseline_points)


def masked_mae(dose_gy: torch.Tensor, anchor_gy: torch.Tensor, body: torch.Tensor | None) -> torch.Tensor:
    """Mean absolute difference (Gy) of case-grid doses ``(..., Z, Y, X)`` and an anchor over
    ``body`` (all voxels if None or empty), per leading index; differentiable."""
    diff = (dose_gy - anchor_gy).abs()
    if body is None or not bool(body.any()):
        return diff.flatten(-3).mean(-1)
    return diff[..., body].mean(-1)


def masked_mae_gy(dose_gy: torch.Tensor, anchor_gy: torch.Tensor, body: torch.Tensor | None) -> float:
    """:func:`masked_mae` of one dose ``(Z, Y, X)``, as a float."""
    return float(masked_mae(dose_gy, anchor_gy, body))


def compose(
    cfg: RewardConfig, score: float | None, fidelity: float | None, kl: float | None
) -> tuple[float, dict[str, Any]]:
    """``(reward, terms)``: the weighted sum of the terms that apply (``None`` = not this step)."""
    reward = 0.0
    if score is not None:
        reward += cfg.w_score * score
    if fidelity is not None:
        reward -= cfg.w_fid * fidelity
    if kl is not None:
        reward -= cfg.w_kl * kl
    terms = {
        "score": score,
        "fidelity": fidelity,
        "kl": kl,
        "w_score": cfg.w_score,
        "w_fid": cfg.w_fid,
        "w_kl": cfg.w_kl,
        "scale": cfg.scale,
        "reward": reward,
    }
    return reward, terms
