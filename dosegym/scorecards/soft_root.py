"""The soft Dx root search: ``V_soft(x) = v`` for many rows of sorted ramps at once.

Conventions of :mod:`dosegym.scorecards.soft`: row ``r`` holds a structure's voxel doses sorted
descending, ``lower`` ``(R, n)`` (``d_k``), their weights ``w`` (cc), ramp ``k`` running from
``d_k`` up to ``d_{k-1}`` (ramp 0: a step at ``d_0``), ``V_soft(x) = sum_k w_k R_k(x)``. Rows may
be padded beyond ``lengths`` (their ramps are then ignored). Work is in float64.

:func:`soft_root_window` brackets the root, keeps only the ramps of each row that are not
saturated around the bracket (a :class:`RampWindow`, flattened across rows so that no row is
padded to the longest) and runs a safeguarded Newton iteration on them; the window also gives
``V_soft``, its slope and the gradients with respect to the doses at the root.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
RAMP_AS_STEP = 1e-6  # ramps narrower than this many tau are treated as a step at their middle
TOLERANCE = 1e-9  # Newton step (in tau) at which the root search stops: the last step squares it
_MAX_ITERATIONS = 200  # safeguarded Newton steps (the search stops at convergence)
_BRACKET = 8.0  # the root is looked for within this many tau of the exact one's ramp
_SATURATED = 36.0  # ramps this many tau beyond the bracket count as exactly w or 0


def _log1p(e: Tensor) -> Tensor:
    """``log1p(e)`` to an ulp (Kahan: ``log(u) - (u - 1 - e) / u``, ``u = 1 + e``), on CPU about
    twice as fast as ``torch.log1p`` for ``e`` in (0, 1]."""
    u = 1.0 + e
    return torch.log(u) - ((u - 1.0) - e) / u


class RampWindow:
    """The ramps of each row not saturated within ``_SATURATED`` tau of a bracket ``[lo, hi]``,
    flattened: row ``r``'s run ``[i0_r, i1_r)`` of ramps and its knots, the sorted doses
    ``i0_r - 1 .. i1_r - 1`` (ramp ``k`` joins knot ``k`` (lower) and ``k - 1``; ramp 0's upper
    end is knot 0 itself). ``knot`` ``(E,)``: each knot's flat position in the ``(R, n)`` rows;
    ``row``: its row; flat ramp ``j`` joins knots ``j + 1`` and ``j`` (weight 0 across rows).
    Ramps wholly above the window count as their weight (``above`` ``(R,)``), below as 0, both
    to ``e^-_SATURATED`` relative."""

    def __init__(
        self, lower: Tensor, c: Tensor, w: Tensor, lo: Tensor, hi: Tensor, tau: float, lengths: Tensor
    ) -> None:
        rows, n = lower.shape
        upper = torch.cat([lower[:, :1], lower[:, :-1]], dim=1)
        i0 = torch.minimum((lower >= hi + _SATURATED * tau).sum(dim=1), lengths - 1)
        i1 = torch.minimum((upper > lo - _SATURATED * tau).sum(dim=1), lengths)
        i1 = torch.maximum(i1, i0 + 1)
        count = i1 - i0 + 1  # knots per row
        self.row = torch.repeat_interleave(torch.arange(rows, device=lower.device), count)
        start = torch.cumsum(count, dim=0) - count
        pos = torch.arange(self.row.numel(), device=lower.device) - start[self.row]
        self.knot = self.row * n + (i0[self.row] - 1 + pos).clamp(min=0)
        doses = lower.reshape(-1)[self.knot]
        self.tau = tau
        self.scaled = (doses / tau)[:, None]
        same = (self.row[1:] == self.row[:-1]).to(w.dtype)
        self.w = (w.reshape(-1)[self.knot[1:]] * same)[:, None]  # columns (E - 1, 1)
        h = (doses[:-1] - doses[1:])[:, None]
        # 0/1 blends rather than torch.where (exact for finite values, several times faster on CPU)
        self.stepf = (h < RAMP_AS_STEP * tau).to(h.dtype)
        self.rampf = 1.0 - self.stepf
        self.inv_h = 1.0 / h.clamp(min=RAMP_AS_STEP * tau)  # exact where rampf is 1
        self.coef = tau * self.inv_h
        self.ramp_count = torch.bincount(self.row[1:], minlength=rows)  # flat ramps per row
        self.above = c.gather(1, (i0 - 1).clamp(min=0)[:, None])[:, 0] * (i0 > 0).to(c.dtype)

    def terms(self, x: Tensor, *, gradients: bool = False) -> tuple[Tensor, ...]:
        """``V_soft`` and ``dV_soft/dx`` ``(R, m)`` at the points ``x`` ``(R, m)`` of each row;
        with ``gradients`` (``m = 1``) also ``dV_soft/dd`` at each knot ``(E, 1)``
        (``softplus(z) = relu(z) + log1p(e^-|z|)`` and ``sigmoid`` once per knot; a step ramp is
        the mean of its ends' sigmoids, its middle's to ``(h / tau)^2``)."""
        one = x.shape[1] == 1  # a flat index_select is about 3x faster than a row one
        at = x.reshape(-1).index_select(0, self.row)[:, None] if one else x.index_select(0, self.row)
        z = self.scaled - at / self.tau
        sig = torch.sigmoid(z)
        t = _log1p(torch.exp(-z.abs()))  # softplus(-|z|)
        su, sl = sig[:-1], sig[1:]
        # sp(a) - sp(b) = relu(a) - relu(b) + sp(-|a|) - sp(-|b|); the relu part times tau / h is
        # 1 below the ramp (lower knot's z >= 0), else tau / h * relu(z_upper) <= 1: the min of both
        ramp = self.coef * (t[:-1] - t[1:]) + (self.coef * z[:-1].clamp(min=0)).clamp(max=1.0)
        ramp = self.rampf * ramp + self.stepf * (0.5 * (su + sl))
        ds = sig * (1.0 - sig)
        half = (0.25 / self.tau) * (ds[:-1] + ds[1:])  # dR/du = dR/dl of a step ramp
        slope = self.stepf * (-2.0 * half) + self.rampf * ((sl - su) * self.inv_h)
        vol = self.above[:, None] + torch.segment_reduce(ramp * self.w, "sum", lengths=self.ramp_count)
        dvol = torch.segment_reduce(slope * self.w, "sum", lengths=self.ramp_count)
        if not gradients:
            return vol, dvol
        # dR/du = (sigmoid_u - R) / h and dR/dl = (R - sigmoid_l) / h, each weighted by w
        g_upper = (self.stepf * half + self.rampf * ((su - ramp) * self.inv_h)) * self.w
        g_lower = (self.stepf * half + self.rampf * ((ramp - sl) * self.inv_h)) * self.w
        zero = torch.zeros_like(g_upper[:1])
        return vol, dvol, torch.cat([g_upper, zero]) + torch.cat([zero, g_lower])


def soft_root_window(
    v: float | Tensor,
    lower: Tensor,
    w: Tensor,
    tau: float,
    *,
    lengths: Tensor | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[Tensor, RampWindow]:
    """The root ``x`` ``(R, 1)`` of ``V_soft(x) = v`` (no gradient), to ``tolerance`` tau or
    better, and the window it was found on; ``v`` (cc): one volume, or one per row ``(R, 1)``;
    ``lengths`` ``(R,)``: each row's ramps (default: all ``n``).

    Bracket: the exact (unsmoothed) root lies in voxel ``k``'s ramp ``[d_k, d_{k-1}]`` with
    ``C_k`` the first cumulative volume ``>= v``; the soft root lies within a few ``tau`` of it,
    so ``[d_k - A tau, d_{k-1} + A tau]`` is taken as the bracket, tentatively: its ends are
    evaluated (``V_soft(lo) > v >= V_soft(hi)``, as bisection keeps it) only once an iterate
    needs them, for a secant or a bracket shrunk to ``tolerance`` (usually never: Newton from
    the exact root stays inside). A row where the check fails gets the wide bracket
    ``[min - 50 tau, max + 50 tau]`` (which always holds). Inside it, from the exact root, a
    safeguarded Newton iteration (the secant of the bracket's ends, Illinois-weighted, else its
    midpoint, whenever Newton would leave the bracket; the bracket shrinks at every step) on
    ``log V`` (``v`` up to half the volume) or ``log(W - V)``: the DVH's tails are exponential
    in ``x``, where Newton on ``V`` itself creeps by about ``tau`` a step. A caller's Newton
    step on ``V_soft`` then lands on the root quadratically. Every iterate moves an end to
    itself (``V_soft`` is decreasing), so the ends an iterate set are known without evaluation."""
    rows, n = lower.shape
    lengths = torch.full((rows,), n, device=lower.device) if lengths is None else lengths
    c = torch.cumsum(w, dim=1)
    vc = torch.as_tensor(v, dtype=c.dtype, device=c.device).reshape(-1, 1).expand(rows, 1).contiguous()
    k = torch.minimum(torch.searchsorted(c, vc), (lengths - 1)[:, None])
    upper = torch.cat([lower[:, :1], lower[:, :-1]], dim=1)
    lo = lower.gather(1, k) - _BRACKET * tau
    hi = upper.gather(1, k) + _BRACKET * tau
    # start from the exact root (V linear along ramp k, from C_k at d_k to C_k - w_k)
    wk, ck = w.gather(1, k), c.gather(1, k)
    dk, uk = lower.gather(1, k), upper.gather(1, k)
    x = dk + ((ck - vc) / torch.where(wk > 0, wk, torch.ones_like(wk))).clamp(0.0, 1.0) * (uk - dk)
    x = torch.where((x > lo) & (x < hi), x, 0.5 * (lo + hi))
    window = RampWindow(lower, c, w, lo, hi, tau, lengths)
    f_lo = f_hi = torch.full_like(x, torch.nan)  # V_soft - v at the ends; NaN: not evaluated
    total = c.gather(1, (lengths - 1)[:, None])
    tail = vc <= 0.5 * total
    target = torch.where(tail, vc, total - vc)
    tol = tolerance * tau
    checked, again, first = False, None, None
    for _ in range(_MAX_ITERATIONS):
        vol, dvol = window.terms(x) if first is None else first
        first = None
        f = vol - vc
        too_much = f > 0
        lo, f_lo = torch.where(too_much, x, lo), torch.where(too_much, f, f_lo)
        hi, f_hi = torch.where(too_much, hi, x), torch.where(too_much, f_hi, f)
        if again is not None:  # Illinois: the end kept twice has its f halved (for the secant)
            same = too_much == again
            f_hi = torch.where(same & too_much, 0.5 * f_hi, f_hi)
            f_lo = torch.where(same & ~too_much, 0.5 * f_lo, f_lo)
        again = too_much
        gap = torch.where(tail, f, -f)  # V (or W - V) minus its target
        dgap = torch.where(tail, dvol, -dvol)
        newton = x - torch.log1p(gap / target) * (target + gap) / dgap
        inside = (newton >= lo) & (newton <= hi)  # x itself is an end: >=, not >
        collapsed = hi - lo <= tol
        if not checked and bool(((~inside | collapsed) & (f_lo.isnan() | f_hi.isnan())).any()):
            # an iterate needs the tentative ends: evaluate them, widen the rows where they fail
            checked = True
            ends = torch.cat([lo, hi], dim=1)
            f_ends = (window.terms(ends)[0] - vc).split(1, dim=1)
            f_lo, f_hi = (
                torch.where(f_lo.isnan(), f_ends[0], f_lo),
                torch.where(f_hi.isnan(), f_ends[1], f_hi),
            )
            ok = (f_lo > 0) & (f_hi <= 0)
            if not bool(ok.all()):
                last = lower.gather(1, (lengths - 1)[:, None])
                lo = torch.where(ok, lo, last - 50.0 * tau)
                hi = torch.where(ok, hi, lower[:, :1] + 50.0 * tau)
                window = RampWindow(lower, c, w, lo, hi, tau, lengths)
                wide_lo, wide_hi = (window.terms(torch.cat([lo, hi], dim=1))[0] - vc).split(1, dim=1)
                f_lo, f_hi = torch.where(ok, f_lo, wide_lo), torch.where(ok, f_hi, wide_hi)
            else:
                first = (vol, dvol)
            again = None  # redo this iterate (with the wide window where it was widened)
            continue
        # Newton leaving the bracket: the secant of its ends, else the midpoint
        secant = lo + f_lo / (f_lo - f_hi) * (hi - lo)
        secant = torch.where((secant > lo) & (secant < hi), secant, 0.5 * (lo + hi))
        new = torch.where(inside, newton, secant)
        done = (inside & ((newton - x).abs() <= tol)) | collapsed
        x = new
        if bool(done.all()):
            break
    return x, window
