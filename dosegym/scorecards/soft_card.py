"""``SoftScorecard``: a bound card scored in torch, batched, on any device, and differentiable.

One implementation for every torch consumer (``Scorecard.score_torch``, the Bandit's
``soft_score``, GuidedDose's guidance, gradient-based agents). Doses are ``(B, Z, Y, X)`` in Gy
on the bound case's grid. ``temperature`` (Gy) selects the metrics: ``None`` gives the exact
ones (:func:`~dosegym.scorecards.metrics_torch.compute_metric_torch`, equal to numpy's
``BoundScorecard.score``), a number the smooth ones (those of
:func:`~dosegym.scorecards.soft.soft_metric_torch`, all items at once by
:class:`~dosegym.scorecards.soft_items.SoftItems`, with closed-form gradients). The structure
masks are put on a device once per device and kept.

The steps, each a method: :meth:`metrics` ``(B, n_items)`` (NaN for unmatched items) ->
:meth:`points` (the items' piecewise-linear curves) -> :meth:`item_scores` (normalised to
[0, 1]) or :meth:`total` (matched items only); :meth:`score` runs them with the input checks.

Guidance (:meth:`group_directions`) does not ascend the scores themselves: a scoring curve is
flat beyond its end points, so an item that earns nothing (or everything) would give no
gradient. It ascends each item's curve extended linearly, ``slope_i * metric_i`` with
``slope_i`` the curve's overall slope (score range over x range, :attr:`SoftScorecard.slopes`),
which points the same way as the score and never goes flat; items are summed per objective
group (:mod:`dosegym.scorecards.groups`). The directions come back on the structures' voxels
only (:class:`GroupDirections`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from dosegym.errors import ScorecardError
from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.groups import GROUP_NAMES, objective_group
from dosegym.scorecards.metrics_torch import compute_metric_torch
from dosegym.scorecards.soft import curve_tensors, piecewise_linear_rows
from dosegym.scorecards.soft_items import SoftItems

Tensor = torch.Tensor


class TorchScores(NamedTuple):
    """Batched scores: ``total`` ``(B,)``, ``points`` ``(B, n_items)`` (NaN columns for
    unmatched items, left out of ``total``), ``max_points`` ``(n_items,)``, ``matched``
    ``(n_items,)`` bool."""

    total: Tensor
    points: Tensor
    max_points: Tensor
    matched: Tensor

    @property
    def normalised(self) -> Tensor:
        """``total`` over the matched items' maximum, ``(B,)``."""
        return self.total / self.max_points[self.matched].sum()


class GroupDirections(NamedTuple):
    """Each objective group's ascent direction of a batch, nonzero only on the structures'
    voxels: ``voxels`` ``(U,)`` flat indices into the grid (``shape``, C-order; only its first
    ``Z * Y * X`` entries are reached, so a leading channel axis of ``shape`` is channel 0),
    ``values`` ``(B, n_groups, U)`` (each group's largest change 1; zero rows for empty groups
    and where the objective is flat)."""

    voxels: Tensor
    values: Tensor
    shape: tuple[int, ...]

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_g weights[:, g] * direction_g`` on :attr:`voxels`, ``(B, U)``; ``weights``
        ``(B, n_groups)``."""
        return torch.einsum("bg,bgu->bu", weights.to(self.values.dtype), self.values)

    def combine(self, weights: Tensor) -> Tensor:
        """:meth:`weighted` on the grid, ``(B, *shape)`` (zero off the voxels)."""
        b = self.values.shape[0]
        out = torch.zeros((b, math.prod(self.shape)), dtype=self.values.dtype, device=self.values.device)
        out[:, self.voxels] = self.weighted(weights)
        return out.view(b, *self.shape)

    def dense(self) -> Tensor:
        """The directions on the grid, ``(B, n_groups, *shape)``."""
        b, g = self.values.shape[:2]
        out = torch.zeros((b, g, math.prod(self.shape)), dtype=self.values.dtype, device=self.values.device)
        out[:, :, self.voxels] = self.values
        return out.view(b, g, *self.shape)


class ItemTensors(NamedTuple):
    """An item's resolved masks on a device: ``mask``, ``body`` (metrics that need it) and
    ``occupancy`` (fractional, or ``None``)."""

    mask: Tensor
    body: Tensor | None
    occupancy: Tensor | None


def _on(a: np.ndarray | None, device: torch.device) -> Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)


class SoftScorecard:
    """The torch scorer of one binding (see the module docstring).

    ``matched`` ``(n_items,)`` bool; ``min_points`` / ``max_points`` / ``span`` (their
    difference) per item; ``slopes``: each matched item's overall curve slope (0 for an
    unmatched item or a curve without an x range); ``groups``: the items of each
    :data:`~dosegym.scorecards.groups.GROUP_NAMES` group that guidance ascends (nonzero slope).
    """

    def __init__(self, bound: BoundScorecard) -> None:
        self.bound = bound
        self.items = bound.card.items
        self.matched = np.array([r.mask is not None for r in bound.resolved], dtype=bool)
        self.min_points = np.array([it.min_score for it in self.items])
        self.max_points = np.array([it.max_score for it in self.items])
        self.span = self.max_points - self.min_points
        self.slopes = np.zeros(len(self.items))
        self.groups: list[list[int]] = [[] for _ in GROUP_NAMES]
        for i, item in enumerate(self.items):
            xs, ys = item.curve
            if not self.matched[i] or len(xs) < 2 or xs[-1] <= xs[0]:
                continue
            self.slopes[i] = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
            if self.slopes[i] != 0:
                self.groups[objective_group(item.structure, bool(self.slopes[i] < 0), bound.case)].append(i)
        self._tensors: dict[str, list[ItemTensors | None]] = {}
        self._body: dict[str, Tensor | None] = {}
        self._soft: dict[str, SoftItems] = {}
        self._curves: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    # -- masks on a device ------------------------------------------------------------------
    def item_tensors(self, device: torch.device) -> list[ItemTensors | None]:
        """Each item's masks on ``device`` (``None`` for unmatched items), made once."""
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = [
                None
                if r.mask is None
                else ItemTensors(_on(r.mask, device), _on(r.body, device), _on(r.occupancy, device))
                for r in self.bound.resolved
            ]
        return self._tensors[key]

    def body(self, device: torch.device) -> Tensor | None:
        """The bound case's body mask on ``device`` (``None`` when the case has none), made once."""
        key = str(device)
        if key not in self._body:
            self._body[key] = _on(self.bound.case.body, device)
        return self._body[key]

    # -- the steps of a score ---------------------------------------------------------------
    def soft_items(self, device: torch.device) -> SoftItems:
        """The soft items on ``device`` (:class:`~dosegym.scorecards.soft_items.SoftItems`), made once."""
        key = str(device)
        if key not in self._soft:
            self._soft[key] = SoftItems(self.bound, device)
        return self._soft[key]

    def metrics(self, dose_gy: Tensor, *, temperature: float | None = None) -> Tensor:
        """Metric values ``(B, n_items)`` of doses ``(B, Z, Y, X)`` (Gy) in each item's output
        unit; exact when ``temperature`` is ``None``, else soft (all items at once, by
        :class:`~dosegym.scorecards.soft_items.SoftItems`); NaN for unmatched items."""
        if temperature is not None:
            return self.soft_items(dose_gy.device).metrics(dose_gy, temperature)
        case = self.bound.case
        cols = []
        for i, (item, t) in enumerate(zip(self.items, self.item_tensors(dose_gy.device))):
            if t is None:
                cols.append(
                    torch.full((dose_gy.shape[0],), math.nan, dtype=dose_gy.dtype, device=dose_gy.device)
                )
                continue
            try:
                value = compute_metric_torch(
                    item.spec,
                    dose_gy,
                    t.mask,
                    voxel_volume_cc=case.voxel_volume_cc,
                    rx_gy=self.bound.reference_gy,
                    body=t.body,
                    occupancy=t.occupancy,
                )
            except ScorecardError as exc:
                raise ScorecardError(f"{item.describe(i)}: {exc}") from None
            cols.append(value.to(dose_gy.dtype))
        return torch.stack(cols, dim=1)

    def points(self, metrics: Tensor) -> Tensor:
        """Points ``(B, n_items)`` of metric values along each item's curve (NaN for unmatched)."""
        key = (str(metrics.device), metrics.dtype)
        if key not in self._curves:
            self._curves[key] = curve_tensors(
                [item.curve for item in self.items], metrics.dtype, metrics.device
            )
        points = piecewise_linear_rows(metrics.T, *self._curves[key]).T
        matched = torch.as_tensor(self.matched, device=metrics.device)
        return torch.where(matched, points, torch.full_like(points, math.nan))

    def item_scores(self, points: Tensor) -> Tensor:
        """Normalised item scores ``(points - min) / (max - min)`` in [0, 1], ``(B, n_items)``."""
        lo = torch.as_tensor(self.min_points, dtype=points.dtype, device=points.device)
        span = torch.as_tensor(self.span, dtype=points.dtype, device=points.device)
        return (points - lo) / torch.where(span > 0, span, torch.ones_like(span))

    def total(self, points: Tensor) -> Tensor:
        """The card's total ``(B,)``: the sum of the matched items' points."""
        matched = torch.as_tensor(self.matched, device=points.device)
        return torch.where(matched, points, torch.zeros_like(points)).sum(dim=1)

    def score(self, dose_gy: Tensor, *, temperature: float | None = None) -> TorchScores:
        """Scores of ``dose_gy`` ``(B, Z, Y, X)`` (or ``(Z, Y, X)``, then without the batch
        axis) in Gy. Raises ``ScorecardError`` for another grid, a NaN or infinite dose, or a
        metric that is undefined (NaN)."""
        if not isinstance(dose_gy, torch.Tensor):
            raise ScorecardError(f"score_torch needs a torch tensor, got {type(dose_gy).__name__}")
        shape = self.bound.case.grid.shape
        dose = dose_gy if dose_gy.ndim == 4 else dose_gy.unsqueeze(0)
        if dose.ndim != 4 or tuple(dose.shape[1:]) != shape:
            raise ScorecardError(f"dose has shape {tuple(dose_gy.shape)}; need (B, *{shape}) in Gy")
        if not bool(torch.isfinite(dose).all()):
            raise ScorecardError("dose contains NaN or infinite values: refusing to score")
        metrics = self.metrics(dose, temperature=temperature)
        undefined = torch.isnan(metrics).any(dim=0).cpu().numpy() & self.matched
        if undefined.any():
            i = int(np.argmax(undefined))
            raise ScorecardError(f"{self.items[i].describe(i)}: the metric is undefined (NaN)")
        points = self.points(metrics)
        total = self.total(points)
        matched = torch.as_tensor(self.matched, device=dose.device)
        max_points = torch.as_tensor(self.max_points, dtype=dose.dtype, device=dose.device)
        if dose_gy.ndim == 3:
            return TorchScores(total[0], points[0], max_points, matched)
        return TorchScores(total, points, max_points, matched)

    # -- guidance ---------------------------------------------------------------------------
    def group_directions(
        self,
        dose_gy: Tensor,
        scored_gy: Tensor | None = None,
        *,
        temperature: float,
        gain: Tensor | None = None,
    ) -> tuple[Tensor, GroupDirections]:
        """Item scores and the ascent direction of each objective group, for a batch.

        ``dose_gy`` ``(B, Z, Y, X)``: the doses (Gy) where the gradients are taken; ``gain``
        ``(Z, Y, X)``: ``d dose / d u`` of the variable ``u`` guided, of which the dose is an
        elementwise function (``None``: the dose itself); ``scored_gy`` ``(B, Z, Y, X)``: the
        doses whose normalised item scores are returned (``None``: ``dose_gy`` itself).
        Returns item scores ``(B, n_items)`` and the directions in ``u`` (:class:`GroupDirections`
        on the grid ``(Z, Y, X)``).

        No backward pass over the soft metrics nor the grid: one batched backward through the
        items' formulas gives each group's gradient with respect to the primitives, which the
        primitives' closed-form gradients (:meth:`SoftItems.primitives`) spread onto the
        structures' voxels. The batch shares every op (one root search for all)."""
        soft = self.soft_items(dose_gy.device)
        dose = soft.check(dose_gy.detach(), temperature)
        b = dose.shape[0]
        if scored_gy is None:
            gathered, same = soft.gather(dose.reshape(b, -1)), True
        else:
            scored = soft.check(scored_gy.detach(), temperature)
            gathered = soft.gather(torch.cat([dose, scored]).reshape(2 * b, -1))
            same = bool(torch.equal(gathered[:b], gathered[b:]))  # no voxel of a structure differs
        values, jac = soft.primitives(gathered[:b] if same else gathered, float(temperature), jacobian=True)
        dirs = torch.zeros((b, len(GROUP_NAMES), soft.union.numel()), dtype=dose.dtype, device=dose.device)
        live = [g for g, idx in enumerate(self.groups) if idx]
        scored_metrics = None
        if live:
            weights = np.zeros((len(live), 1, len(self.items)))
            for n, g in enumerate(live):
                weights[n, 0, self.groups[g]] = self.slopes[self.groups[g]]
            weights = torch.as_tensor(weights, dtype=dose.dtype, device=dose.device).expand(-1, b, -1)
            with torch.enable_grad():
                primitives = values[:b].requires_grad_(True)
                metrics = soft.item_values(primitives, dose.dtype)
                (per_primitive,) = torch.autograd.grad(metrics, primitives, weights, is_grads_batched=True)
            scored_metrics = metrics.detach() if same else None
            grad = soft.compact(per_primitive.transpose(0, 1), jac[:b])  # (B, n_live, U)
            if gain is not None:
                grad = grad * gain.reshape(-1)[soft.union].to(grad.dtype)
            peak = grad.abs().amax(dim=2, keepdim=True)
            tiny = torch.finfo(grad.dtype).tiny  # a flat objective's zero row stays zero
            dirs[:, live] = (grad / peak.clamp(min=tiny)).to(dose.dtype)
        if scored_metrics is None:
            scored_metrics = soft.item_values(values[-b:], dose.dtype)
        items = self.item_scores(self.points(scored_metrics))
        return items, GroupDirections(soft.union, dirs, tuple(dose.shape[1:]))
