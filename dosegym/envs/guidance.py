"""GuidedDose's soft scorecard of one case on its model grid (:class:`SoftScorer`).

Conventions: model-grid tensors are ``(B, C, Z, Y, X)`` in normalised units (dose: 1.0 = the
case's highest prescription, ``unit_gy``); doses in Gy. The scoring itself, the objective
groups and their guidance directions live in :class:`dosegym.scorecards.SoftScorecard`.
"""

from __future__ import annotations

import torch

from dosegym.data.case import Case
from dosegym.diffusion.slots import Resampler
from dosegym.scorecards.model_grid import model_grid_case
from dosegym.scorecards.scorecard import Scorecard
from dosegym.scorecards.soft_card import GroupDirections, SoftScorecard


class SoftScorer:
    """Normalised model-grid doses ``x`` -> Gy (``x[:, 0] * unit_gy``, zero outside the body),
    scored by :class:`~dosegym.scorecards.soft_card.SoftScorecard` at ``temperature_gy`` on the
    case resampled onto the model grid. ``unit_gy``: Gy of 1.0 in model units."""

    def __init__(self, card: Scorecard, case: Case, res: Resampler, temperature_gy: float) -> None:
        mcase = model_grid_case(case, res.model_grid, lambda a: res.to_model(a, "linear").numpy())
        self.soft = SoftScorecard(card.bind(mcase, on_unmatched="report"))
        self.unit_gy = float(res.rx_max_gy)
        self.temperature_gy = float(temperature_gy)
        self._gain: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # d dose / d x[:, 0], per device

    def dose_gy(self, x: torch.Tensor) -> torch.Tensor:
        """Model-grid Gy of ``x``, clamped at 0 as decoding does."""
        dose = x[:, 0].clamp_min(0.0) * self.unit_gy
        body = self.soft.body(dose.device)
        return dose if body is None else dose * body.to(dose.dtype)

    def item_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised soft item scores ``(B, n_items)`` of ``x``."""
        metrics = self.soft.metrics(self.dose_gy(x), temperature=self.temperature_gy)
        return self.soft.item_scores(self.soft.points(metrics))

    def guidance(self, x0: torch.Tensor) -> tuple[torch.Tensor, GroupDirections]:
        """Item scores ``(B, n_items)`` of x̂0 ``(B, C, Z, Y, X)`` and each objective group's
        ascent direction there (:meth:`SoftScorecard.group_directions`, on ``(C, Z, Y, X)``).

        Both at the decoded dose (:meth:`dose_gy`, clamped at 0), the gradient passed straight
        through the clamp: ``d dose / d x[:, 0] = unit_gy * body`` everywhere, so voxels where
        x̂0 < 0 are guided too (the clamp's own derivative, 0 there, would stop them) and only
        channel 0 moves. One dose for scores and gradients: one root search."""
        x = x0.detach()
        key = (str(x.device), x.dtype)
        if key not in self._gain:
            body = self.soft.body(x.device)
            gain = torch.full(x.shape[2:], self.unit_gy, dtype=x.dtype, device=x.device)
            self._gain[key] = gain if body is None else gain * body.to(x.dtype)
        gain = self._gain[key]
        dose = x[:, 0].clamp_min(0.0) * gain  # dose_gy(x): the same values
        items, dirs = self.soft.group_directions(dose, temperature=self.temperature_gy, gain=gain)
        return items, dirs._replace(shape=tuple(x.shape[1:]))

    def group_directions(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item scores ``(n_items,)`` of x̂0 ``(1, C, Z, Y, X)`` and each objective group's
        direction on the grid, ``(n_groups, C, Z, Y, X)`` (:meth:`guidance` of one sample)."""
        items, dirs = self.guidance(x0)
        return items[0], dirs.dense()[0]
