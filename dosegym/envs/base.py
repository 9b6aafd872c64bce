"""Soft (differentiable) scoring of model-grid doses for the dose environments: the model-grid
case, the objective groups of GuidedDose's actions and :class:`SoftScorer`.

Conventions: model-grid tensors are ``(B, C, Z, Y, X)`` in normalised units (dose: 1.0 = the
case's highest prescription); doses in Gy. The rest of the env machinery lives beside it:
argument checks and configs (:mod:`~dosegym.envs.config`), card resolution
(:mod:`~dosegym.envs.cards`), per-case preparation and caches (:mod:`~dosegym.envs.cases`),
the batched core (:mod:`~dosegym.envs.core`) and its single / vector adapters
(:mod:`~dosegym.envs.adapters`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dosegym.data.case import BODY_NAMES, TARGET_PREFIXES, Case, canonical_name
from dosegym.diffusion.slots import OAR_GROUPS, Resampler, oar_group
from dosegym.scorecards.scorecard import Scorecard
from dosegym.scorecards.soft import soft_metric_torch, soft_piecewise_linear

#: Objective groups of GuidedDose: targets (coverage), one per canonical OAR group, hot spots.
GROUP_NAMES: tuple[str, ...] = ("targets", *(f"oar_{n}" for n, _ in OAR_GROUPS), "hot_spots")


def model_grid_case(case: Case, res: Resampler) -> Case:
    """``case``'s structures, body and prescriptions resampled onto its model grid, for soft
    (differentiable) scoring of model-grid doses. A structure is the voxels it covers at
    least half of (linear occupancy >= 0.5), at least its best-covered voxel; a non-target
    structure entirely outside the model field is left out (its items become unmatched)."""
    targets = {rx.target for rx in case.prescriptions}
    structures: dict[str, np.ndarray] = {}
    for name, mask in case.structures.items():
        occ = res.to_model(mask.astype(np.float32), "linear").numpy()
        if occ.max() <= 0 and name not in targets:
            continue
        m = occ >= 0.5
        if not m.any():
            m.flat[int(occ.argmax())] = True
        structures[name] = m
    body = None
    if case.body is not None:
        body = res.to_model(case.body.astype(np.float32), "linear").numpy() >= 0.5
        body = body if body.any() else None
    return Case(
        case_id=case.case_id,
        grid=res.model_grid,
        ct=None,
        structures=structures,
        prescriptions=list(case.prescriptions),
        beams=case.beams,
        dose=None,
        body=body,
        meta={**case.meta, "model_grid": True},
    )


def objective_group(item_structure: str, falling: bool, case: Case) -> int:
    """Index in :data:`GROUP_NAMES` of a card item on ``item_structure``.

    Target items (a prescription target, or a name starting PTV/CTV/GTV/ITV) whose score
    rises with the metric are ``targets``; target items whose score falls with it (upper
    limits: near-max dose, V110%, ...) and body items are ``hot_spots``; every other item goes
    to its canonical OAR group (:data:`dosegym.diffusion.slots.OAR_GROUPS`).
    """
    key = canonical_name(item_structure)
    rx_targets = {canonical_name(rx.target) for rx in case.prescriptions}
    is_target = key in rx_targets or key.startswith(tuple(p.lower() for p in TARGET_PREFIXES))
    is_body = key in {canonical_name(b) for b in BODY_NAMES}
    if is_target:
        return len(GROUP_NAMES) - 1 if falling else 0
    if is_body:
        return len(GROUP_NAMES) - 1
    return 1 + oar_group(item_structure)


class SoftScorer:
    """A card's soft (differentiable) metrics and scores of model-grid doses of one case.

    ``metrics(x)``: each item's soft metric value (:mod:`dosegym.scorecards.soft`, smoothing
    ``temperature_gy``), ``(B, n_items)``, NaN for items the model-grid case cannot match.
    ``item_scores(x)``: their normalised scores ``(points - min) / (max - min)`` in [0, 1].
    ``groups``: the matched items of each :data:`GROUP_NAMES` group.

    Guidance does not ascend the scores themselves: a scoring curve is flat beyond its end
    points, so an item that earns nothing (or everything) would give no gradient. It ascends
    each item's curve extended linearly, ``slope_i * metric_i`` with ``slope_i`` the curve's
    overall slope (score range over x range), which points the same way as the score and
    never goes flat.
    """

    def __init__(self, card: Scorecard, case: Case, res: Resampler, temperature_gy: float) -> None:
        self.card = card
        self.mcase = model_grid_case(case, res)
        self.bound = card.bind(self.mcase, on_unmatched="report")
        self.rx_gy = float(res.rx_max_gy)
        self.temperature_gy = float(temperature_gy)
        self.min_points = np.array([it.min_score for it in card.items])
        self.span = np.array([it.max_score - it.min_score for it in card.items])
        self.slope = np.zeros(len(card.items))
        self.groups: list[list[int]] = [[] for _ in GROUP_NAMES]
        for i, item in enumerate(card.items):
            xs, ys = item.curve
            if self.bound.resolved[i].mask is None or len(xs) < 2 or xs[-1] <= xs[0]:
                continue
            self.slope[i] = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
            if self.slope[i] != 0:
                group = objective_group(item.structure, bool(self.slope[i] < 0), case)
                self.groups[group].append(i)
        self._masks: dict[str, list[tuple[torch.Tensor, ...] | None]] = {}

    def _device_masks(self, device: torch.device) -> list[tuple[torch.Tensor, ...] | None]:
        key = str(device)
        if key not in self._masks:

            def t(a: np.ndarray | None) -> torch.Tensor | None:
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

            body = None if self.mcase.body is None else t(self.mcase.body)
            self._masks[key] = [
                None if r.mask is None else (t(r.mask), t(r.body), t(r.occupancy), body)
                for r in self.bound.resolved
            ]
        return self._masks[key]

    def dose_gy(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model-grid Gy of normalised ``x`` ``(B, 1, Z, Y, X)``, zero outside the body;
        clamped at 0 as decoding does unless ``clamp=False`` (guidance: the clamp would hide
        the gradient wherever x̂0 is negative)."""
        dose = (x[:, 0].clamp_min(0.0) if clamp else x[:, 0]) * self.rx_gy
        masks = self._device_masks(dose.device)
        body = next((m[3] for m in masks if m is not None), None)
        return dose if body is None else dose * body.to(dose.dtype)

    def metrics(self, x: torch.Tensor) -> torch.Tensor:
        return self.metrics_of_dose(self.dose_gy(x))

    def metrics_of_dose(self, dose: torch.Tensor) -> torch.Tensor:
        """Soft metric values ``(B, n_items)`` of model-grid doses ``(B, Z, Y, X)`` in Gy."""
        cols = []
        for item, masks in zip(self.card.items, self._device_masks(dose.device)):
            if masks is None:
                cols.append(torch.full((dose.shape[0],), math.nan, dtype=dose.dtype, device=dose.device))
                continue
            mask, body, occupancy, _ = masks
            cols.append(
                soft_metric_torch(
                    item.spec,
                    dose,
                    mask,
                    temperature=self.temperature_gy,
                    voxel_volume_cc=self.mcase.voxel_volume_cc,
                    rx_gy=self.bound.rx_gy,
                    body=body,
                    occupancy=occupancy,
                ).to(dose.dtype)
            )
        return torch.stack(cols, dim=1)

    def points(self, metrics: torch.Tensor) -> torch.Tensor:
        """Soft points ``(B, n_items)`` of metric values (NaN stays NaN)."""
        cols = []
        for i, item in enumerate(self.card.items):
            xs, ys = item.curve
            cols.append(soft_piecewise_linear(metrics[:, i], xs, ys).to(metrics.dtype))
        return torch.stack(cols, dim=1)

    def item_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores_of_metrics(self.metrics(x))

    def scores_of_metrics(self, metrics: torch.Tensor) -> torch.Tensor:
        pts = self.points(metrics)
        lo = torch.as_tensor(self.min_points, dtype=pts.dtype, device=pts.device)
        span = torch.as_tensor(self.span, dtype=pts.dtype, device=pts.device)
        return (pts - lo) / torch.where(span > 0, span, torch.ones_like(span))

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised soft total ``(B,)``: matched points over matched maximum (differentiable)."""
        pts = self.points(self.metrics(x))
        matched = [i for i, r in enumerate(self.bound.resolved) if r.mask is not None]
        maximum = sum(self.card.items[i].max_score for i in matched)
        return pts[:, matched].sum(dim=1) / maximum

    def group_directions(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item scores ``(n_items,)`` (detached) and ascent directions of each group's
        objective at ``x0`` ``(1, C, Z, Y, X)``, scaled to a largest voxel change of 1:
        ``(n_groups, C, Z, Y, X)`` (zero for empty groups and where the objective is flat)."""
        x = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            # one batched evaluation: [unclamped x (for gradients), clamped x (the scores)]
            pair = torch.cat([self.dose_gy(x, clamp=False), self.dose_gy(x.detach())])
            both = self.metrics_of_dose(pair)
            metrics = both[:1]
            dirs = torch.zeros((len(GROUP_NAMES), *x.shape[1:]), dtype=x.dtype, device=x.device)
            live = [g for g, idx in enumerate(self.groups) if idx]
            for n, g in enumerate(live):
                idx = self.groups[g]
                slope = torch.as_tensor(self.slope[idx], dtype=metrics.dtype, device=x.device)
                objective = (metrics[0, idx] * slope).sum()
                (grad,) = torch.autograd.grad(objective, x, retain_graph=n < len(live) - 1)
                peak = grad.abs().max()
                if float(peak) > 0:
                    dirs[g] = (grad / peak)[0]
        with torch.no_grad():
            items = self.scores_of_metrics(both[1:].detach())
        return items[0], dirs
