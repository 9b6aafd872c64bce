"""A dense training score: the card's points, continued past the failing end of each curve.

A PlanScoreCard curve is flat beyond its ends: an underdosed target whose D95 is 4 Gy below
the curve's first point scores its minimum whether it is 4 Gy or 1 Gy short, so samples of
a case that all fail the same items tie and a reward-difference agent learns nothing from
them. :func:`failing_end_points` gives each item's extra points where its metric lies past
the end of its curve that carries the curve's lowest points: ``-leak * s * d``, with ``d``
the distance past that end (in the metric's unit) and ``s = (max(ys) - min(ys)) / (xs[-1] -
xs[0])`` the curve's mean slope in points per unit (so ``leak = 1`` continues the curve at
its mean slope). Items at their best end, inside their curve or unmatched get 0: nothing
pushes an item past its ideal. :func:`dense_normalised` is the card's normalised total of
``points + failing_end_points`` (below 0 where items fail by far). Training uses it; every
evaluation stays on the exact card.
"""

from __future__ import annotations

import numpy as np
import torch

from dosegym.scorecards.soft_card import SoftScorecard

Tensor = torch.Tensor


def failing_end_points(soft: SoftScorecard, metrics: Tensor, leak: float) -> Tensor:
    """``(B, n_items)`` extra (negative) points of metric values ``metrics`` ``(B, n_items)``
    past each matched item's failing curve end (see the module docstring); 0 elsewhere."""
    out = torch.zeros_like(metrics)
    if leak <= 0:
        return out
    for i, item in enumerate(soft.items):
        xs, ys = (np.asarray(v, dtype=np.float64) for v in item.curve)
        if not soft.matched[i] or xs.size < 2 or xs[-1] <= xs[0] or ys.max() == ys.min():
            continue
        slope = leak * (ys.max() - ys.min()) / (xs[-1] - xs[0])
        m = torch.nan_to_num(metrics[:, i], nan=0.0)
        if ys[0] == ys.min():
            out[:, i] = out[:, i] - slope * torch.clamp(xs[0] - m, min=0.0)
        if ys[-1] == ys.min():
            out[:, i] = out[:, i] - slope * torch.clamp(m - xs[-1], min=0.0)
    return out


def dense_normalised(soft: SoftScorecard, dose_gy: Tensor, temperature: float, leak: float) -> Tensor:
    """``(B,)`` normalised dense score of doses ``(B, Z, Y, X)`` (Gy, the bound case's grid):
    soft metrics at ``temperature`` (Gy), the card's points plus :func:`failing_end_points`,
    over the matched items' maximum."""
    metrics = soft.metrics(dose_gy, temperature=temperature)
    points = soft.points(metrics) + failing_end_points(soft, metrics, leak)
    matched = torch.as_tensor(soft.matched, device=points.device)
    maximum = float(soft.max_points[soft.matched].sum())
    return torch.where(matched, points, torch.zeros_like(points)).sum(dim=1) / maximum
