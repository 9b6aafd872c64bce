"""Differentiable (soft) dose metrics and the torch piecewise-linear scoring curve.

Soft metrics smooth the exact DVH of ``dvh.py`` with a temperature ``tau`` in Gy and
converge to the exact metric as ``tau -> 0``:

* ``V(d)`` (volume receiving ``>= d``): ``sum_k w_k * sigmoid((d_k - d) / tau)``.
* ``D(v)`` (dose at volume): the exact rule interpolates linearly between knots
  ``(C_k, d_k)`` of the descending-sorted doses, which is the same as saying that voxel ``k``
  spreads its volume ``w_k`` uniformly over the dose interval ``[d_k, d_{k-1}]`` (voxel 1 sits
  as a step at ``d_1``). The soft DVH convolves each such ramp with a logistic kernel of
  scale ``tau``:
  ``R_k(x) = tau / h_k * [softplus((d_{k-1} - x) / tau) - softplus((d_k - x) / tau)]``,
  ``h_k = d_{k-1} - d_k``, and ``V_soft(x) = sum_k w_k R_k(x)`` (strictly decreasing in x).
  ``D_soft(v)`` solves ``V_soft(x) = v`` without gradient (a safeguarded Newton search in a
  bracket around the exact root, :func:`~dosegym.scorecards.soft_root.soft_root_window`), then
  takes one Newton step ``x - (V_soft(x) - v) / V_soft'(x)`` inside autograd: the value is the root and the
  gradient is exactly the implicit-function one,
  ``dD/dd_i = -(dV_soft/dd_i) / V_soft'(x)``, spread over the voxels whose doses lie within a
  few ``tau`` of the root. ``D(0) = max`` and ``D(V) = min`` use the soft max / min below.
* max / min: softmax-weighted mean dose ``sum w_i e^{d_i/tau} d_i / sum w_i e^{d_i/tau}``
  (and with ``-d``), which lies inside ``[min, max]`` and converges to the extreme.
* mean dose and integral dose: exact.

Every index (CI, HI, GI, ...) is built from these by the formulas of
:func:`dosegym.scorecards.metrics.evaluate_spec`, shared with the exact engines. Work is done
in ``float64``; results come back in the dose's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dosegym.errors import ScorecardError
from dosegym.scorecards.curve import check_curve
from dosegym.scorecards.metrics import NEEDS_BODY, MetricSpec, evaluate_spec
from dosegym.scorecards.metrics_torch import as_batch, gather, structure_values, torch_ratio
from dosegym.scorecards.soft_root import RAMP_AS_STEP, soft_root_window

Tensor = torch.Tensor


def soft_volume(x: Tensor, lower: Tensor, upper: Tensor, w: Tensor, tau: float) -> Tensor:
    """``V_soft(x)`` for ``x`` ``(B, 1)``: sum of logistic-smoothed ramps, ``(B,)``."""
    h = upper - lower
    step = h < RAMP_AS_STEP * tau
    h_safe = torch.where(step, torch.ones_like(h), h)
    xu = (upper - x) / tau
    xl = (lower - x) / tau
    # below the ramp (xl >= 0) use sp(a) - sp(b) = (a - b) + sp(-a) - sp(-b): no cancellation
    below = 1.0 + tau / h_safe * (F.softplus(-xu) - F.softplus(-xl))
    above = tau / h_safe * (F.softplus(xu) - F.softplus(xl))
    ramp = torch.where(xl >= 0, below, above)
    ramp = torch.where(step, torch.sigmoid(0.5 * (xu + xl)), ramp)
    return (ramp * w).sum(dim=1)


def volume_or_end(
    volume: float, unit: str, total_cc: float, max_gy: Tensor, min_gy: Tensor
) -> tuple[float, Tensor | None]:
    """``(v, end)``: the volume in cc and, where D(v) needs no search, its dose: the maximum at
    ``v <= 0``, the minimum at ``v >=`` the structure's volume (else ``None``)."""
    v = volume_cc(volume, unit, total_cc)
    if v <= 0.0:
        return v, max_gy
    if v >= total_cc:
        return v, min_gy
    return v, None


def volume_cc(volume: float, unit: str, total_cc: float) -> float:
    """A volume in ``unit`` (``"%"`` of ``total_cc`` or ``"cc"``) in cc."""
    if unit == "%":
        return float(volume) / 100.0 * total_cc
    if unit == "cc":
        return float(volume)
    raise ScorecardError(f"volume unit {unit!r} is not valid; use '%' or 'cc'")


def volume_in(vol_cc: Tensor, unit: str, total_cc: float) -> Tensor:
    """Volumes ``vol_cc`` (cc) in ``unit`` (``"%"`` of ``total_cc`` or ``"cc"``)."""
    if unit == "cc":
        return vol_cc
    if unit == "%":
        return 100.0 * vol_cc / total_cc
    raise ScorecardError(f"volume unit {unit!r} is not valid; use '%' or 'cc'")


def soft_volume_slope(x: Tensor, lower: Tensor, upper: Tensor, w: Tensor, tau: float) -> Tensor:
    """``dV_soft/dx`` (negative), ``(B,)``."""
    h = upper - lower
    step = h < RAMP_AS_STEP * tau
    h_safe = torch.where(step, torch.ones_like(h), h)
    xu = (upper - x) / tau
    xl = (lower - x) / tau
    slope = -(torch.sigmoid(xu) - torch.sigmoid(xl)) / h_safe
    mid = torch.sigmoid(0.5 * (xu + xl))
    slope = torch.where(step, -mid * (1.0 - mid) / tau, slope)
    return (slope * w).sum(dim=1)


class SoftDVH:
    """Smoothed DVHs of a batch over one structure (see the module docstring)."""

    def __init__(
        self,
        values: Tensor,
        weights_cc: Tensor | None,
        voxel_volume_cc: float,
        temperature_gy: float,
    ) -> None:
        self.dtype = values.dtype
        self.values = values.double()  # (B, n)
        n = values.shape[1]
        self.w = (
            torch.full((n,), float(voxel_volume_cc), dtype=torch.float64, device=values.device)
            if weights_cc is None
            else weights_cc.double()
        )
        self.total_volume_cc = float(self.w.sum())
        self.tau = float(temperature_gy)
        self._ramps: tuple[Tensor, Tensor, Tensor] | None = None

    # -- smooth extremes and exact mean -------------------------------------------------
    def _softmax_mean(self, sign: float) -> Tensor:
        logits = sign * self.values / self.tau + torch.log(self.w)
        return (torch.softmax(logits, dim=1) * self.values).sum(dim=1).to(self.dtype)

    @property
    def max_gy(self) -> Tensor:
        return self._softmax_mean(1.0)

    @property
    def min_gy(self) -> Tensor:
        return self._softmax_mean(-1.0)

    @property
    def mean_gy(self) -> Tensor:
        return ((self.values * self.w).sum(dim=1) / self.total_volume_cc).to(self.dtype)

    @property
    def integral_dose_gy_l(self) -> Tensor:
        return ((self.values * self.w).sum(dim=1) / 1000.0).to(self.dtype)

    # -- volume at dose -----------------------------------------------------------------
    def volume_at_dose(self, dose_gy: float, unit: str = "%") -> Tensor:
        vol = (torch.sigmoid((self.values - dose_gy) / self.tau) * self.w).sum(dim=1)
        return volume_in(vol, unit, self.total_volume_cc).to(self.dtype)

    # -- dose at volume -----------------------------------------------------------------
    def _ramp_bounds(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(lower d_k, upper d_{k-1}, w_k)`` of every voxel's ramp, sorted, ``(B, n)``."""
        if self._ramps is None:
            d, order = torch.sort(self.values, dim=1, descending=True, stable=True)
            upper = torch.cat([d[:, :1], d[:, :-1]], dim=1)
            self._ramps = (d, upper, self.w[order])
        return self._ramps

    def _soft_volume(self, x: Tensor, lower: Tensor, upper: Tensor, w: Tensor) -> Tensor:
        return soft_volume(x, lower, upper, w, self.tau)

    def _soft_volume_slope(self, x: Tensor, lower: Tensor, upper: Tensor, w: Tensor) -> Tensor:
        return soft_volume_slope(x, lower, upper, w, self.tau)

    def _root(self, v: float, lower: Tensor, upper: Tensor, w: Tensor) -> Tensor:
        """The root of ``V_soft = v`` (:func:`~dosegym.scorecards.soft_root.soft_root_window`)."""
        return soft_root_window(v, lower, w, self.tau)[0]

    def dose_at_volume(self, volume: float, unit: str = "%") -> Tensor:
        v, end = volume_or_end(volume, unit, self.total_volume_cc, self.max_gy, self.min_gy)
        if end is not None:
            return end
        lower, upper, w = self._ramp_bounds()
        with torch.no_grad():
            ld, ud = lower.detach(), upper.detach()
            root = self._root(v, ld, ud, w)
            slope = self._soft_volume_slope(root, ld, ud, w)
            slope = torch.where(slope < 0, slope, torch.full_like(slope, -1e-300))
        v_at_root = self._soft_volume(root, lower, upper, w)  # carries the graph to the doses
        out = root.squeeze(1) - (v_at_root - v) / slope
        return out.to(self.dtype)


def check_temperature(temperature: float, where: str) -> None:
    """Raise ``ScorecardError`` naming ``where`` unless ``temperature`` is a finite number > 0 (Gy)."""
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise ScorecardError(f"{where}: temperature must be a finite number of Gy > 0, got {temperature!r}")


def soft_metric_torch(
    spec: MetricSpec,
    dose_gy: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    voxel_volume_cc: float,
    rx_gy: float | None = None,
    body: Tensor | None = None,
    occupancy: Tensor | None = None,
) -> Tensor:
    """A differentiable version of ``spec`` for a batch ``(B, Z, Y, X)`` (Gy) over ``mask``.

    ``temperature`` (Gy, > 0) sets the smoothing; as it goes to 0 the value converges to
    :func:`~dosegym.scorecards.metrics_torch.compute_metric_torch`. Returns ``(B,)``
    (0-d for a single ``(Z, Y, X)`` dose).
    """
    where = spec.kind.value
    spec.validate(where)
    check_temperature(temperature, where)
    if not voxel_volume_cc > 0:
        raise ScorecardError(f"{where}: voxel_volume_cc must be > 0, got {voxel_volume_cc}")
    dose, batched = as_batch(dose_gy)
    values, w = structure_values(dose, mask, occupancy, voxel_volume_cc, f"{where}: structure mask")
    dvh = SoftDVH(values, w, voxel_volume_cc, temperature)
    body_fn = None
    if body is not None and spec.kind in NEEDS_BODY:
        body_vals = gather(dose, body, f"{where}: body mask").double()

        def body_fn(d: float) -> Tensor:
            return torch.sigmoid((body_vals - d) / temperature).sum(dim=1) * voxel_volume_cc

    out = evaluate_spec(spec, dvh, rx_gy=rx_gy, body_volume_cc=body_fn, ratio_fn=torch_ratio)
    out = torch.as_tensor(out, device=dose.device).to(dose.dtype)
    out = out.expand(dose.shape[0]) if out.ndim == 0 else out
    return out if batched else out[0]


# -- piecewise-linear scoring curves ------------------------------------------------------
def curve_tensors(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Checked curves ``(xs, ys)`` as rows ``(K, P)`` (padded with their last point; a one-point
    curve twice) and each row's last segment end ``(K, 1)``, for :func:`piecewise_linear_rows`."""
    checked = [check_curve(xs, ys) for xs, ys in curves]
    checked = [(np.repeat(px, 2), np.repeat(py, 2)) if px.size == 1 else (px, py) for px, py in checked]
    width = max(px.size for px, _ in checked)
    pad = [
        (np.pad(px, (0, width - px.size), mode="edge"), np.pad(py, (0, width - py.size), mode="edge"))
        for px, py in checked
    ]
    tx = torch.as_tensor(np.stack([px for px, _ in pad]), dtype=dtype, device=device)
    ty = torch.as_tensor(np.stack([py for _, py in pad]), dtype=dtype, device=device)
    last = torch.tensor([[px.size - 1] for px, _ in checked], device=device)
    return tx, ty, last


def piecewise_linear_rows(x: Tensor, tx: Tensor, ty: Tensor, last: Tensor) -> Tensor:
    """Each row of ``x`` ``(K, B)`` along its curve (:func:`curve_tensors`), ``(K, B)``: the rule
    of :func:`~dosegym.scorecards.curve.piecewise_linear`, differentiable in ``x`` almost
    everywhere (the segment's slope inside, 0 where clamped)."""
    xc = torch.clamp(x, tx[:, :1], tx.gather(1, last))
    i = torch.minimum(torch.searchsorted(tx, xc.detach().contiguous(), right=True).clamp(min=1), last)
    x0, x1, y0, y1 = tx.gather(1, i - 1), tx.gather(1, i), ty.gather(1, i - 1), ty.gather(1, i)
    h = x1 - x0
    t = torch.where(h > 0, (xc - x0) / torch.where(h > 0, h, torch.ones_like(h)), torch.ones_like(h))
    return y0 + t * (y1 - y0) + 0.0 * xc  # 0 * xc: a NaN x stays NaN on a one-point curve


def soft_piecewise_linear(x: Tensor, xs: Sequence[float], ys: Sequence[float]) -> Tensor:
    """The torch twin of :func:`~dosegym.scorecards.curve.piecewise_linear` (same rule),
    differentiable in ``x`` almost everywhere (slope of the segment inside, 0 where clamped)."""
    if not isinstance(x, torch.Tensor):
        check_curve(xs, ys)
        raise ScorecardError(f"x must be a torch tensor, got {type(x).__name__}")
    xt = x if torch.is_floating_point(x) else x.double()
    curve = curve_tensors([(xs, ys)], xt.dtype, xt.device)
    return piecewise_linear_rows(xt.reshape(1, -1), *curve).reshape(xt.shape)
