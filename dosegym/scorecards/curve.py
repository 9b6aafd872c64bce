"""Piecewise-linear scoring curves (numpy), as PlanScoreCard's ``GetScore``: linear between
points sorted by ``x``, clamped beyond the ends; one point gives its score. The torch twin is
:func:`dosegym.scorecards.soft.soft_piecewise_linear`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dosegym.errors import ScorecardError


def check_curve(xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(xs, ys)`` as float64 arrays; raises ``ScorecardError`` unless they are as many (>= 1),
    finite, and ``xs`` ascending."""
    x = np.asarray(xs, dtype=np.float64).reshape(-1)
    y = np.asarray(ys, dtype=np.float64).reshape(-1)
    if x.size == 0 or x.shape != y.shape:
        raise ScorecardError(
            f"a piecewise-linear curve needs as many xs as ys (>= 1), got {x.size} and {y.size}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ScorecardError("piecewise-linear curve points must be finite")
    if np.any(np.diff(x) < 0):
        raise ScorecardError(f"piecewise-linear xs must be sorted ascending, got {x.tolist()}")
    return x, y


def piecewise_linear(x: float | np.ndarray, xs: Sequence[float], ys: Sequence[float]):
    """The curve through ``(xs[i], ys[i])`` at ``x`` (numpy), clamped to ``ys[0]`` below
    ``xs[0]`` and ``ys[-1]`` above ``xs[-1]``. ``xs`` ascending; at a repeated x the curve
    jumps and takes the right-hand value. One point gives a constant. Returns a float for a
    scalar ``x``."""
    px, py = check_curve(xs, ys)
    xa = np.asarray(x, dtype=np.float64)
    if px.size == 1:
        out = np.full_like(xa, py[0])
    else:
        xc = np.clip(xa, px[0], px[-1])
        i = np.clip(np.searchsorted(px, xc, side="right"), 1, px.size - 1)
        x0, x1, y0, y1 = px[i - 1], px[i], py[i - 1], py[i]
        h = x1 - x0
        t = np.where(h > 0, (xc - x0) / np.where(h > 0, h, 1.0), 1.0)
        out = y0 + t * (y1 - y0)
    return float(out) if np.ndim(out) == 0 else out
