"""Batched dose metrics in torch (CPU or CUDA), the same definitions as ``metrics.py``.

``compute_metric_torch`` scores a batch of doses ``(B, Z, Y, X)`` (Gy) over one structure
mask ``(Z, Y, X)`` and returns ``(B,)``. It applies the rule of ``dvh.py`` exactly: ``D(v)``
interpolates linearly between knots ``(C_k, d_k)`` of the descending-sorted voxel doses and
their cumulative volumes; ``V(d)`` counts voxels with dose ``>= d``. The formulas of every
index come from :func:`dosegym.scorecards.metrics.evaluate_spec`, shared with numpy.
Accumulations (cumulative volumes, sums) run in ``float64``; results come back in the dose's
dtype. Gradients flow through the sort (exact metrics are piecewise differentiable); see
``soft.py`` for smooth versions.
"""

from __future__ import annotations

import math

import torch

from dosegym.errors import ScorecardError
from dosegym.scorecards.metrics import NEEDS_BODY, MetricSpec, evaluate_spec

Tensor = torch.Tensor


def torch_ratio(num: Tensor | float, den: Tensor | float) -> Tensor:
    """``num / den`` elementwise with ``0/0 = 0`` and ``x/0 = inf`` (as ``metrics.ratio``)."""
    num_t, den_t = torch.broadcast_tensors(torch.as_tensor(num), torch.as_tensor(den))
    if not torch.is_floating_point(num_t):
        num_t = num_t.double()
    den_t = den_t.to(num_t)
    safe = torch.where(den_t == 0, torch.ones_like(den_t), den_t)
    at_zero = torch.where(num_t == 0, torch.zeros_like(num_t), torch.full_like(num_t, math.inf))
    return torch.where(den_t == 0, at_zero, num_t / safe)


def as_batch(dose_gy: Tensor) -> tuple[Tensor, bool]:
    """``(dose (B, Z, Y, X) floating, was_batched)`` from a ``(B, Z, Y, X)`` or ``(Z, Y, X)`` dose."""
    if not isinstance(dose_gy, torch.Tensor):
        raise ScorecardError(f"dose must be a torch tensor, got {type(dose_gy).__name__}")
    if dose_gy.ndim not in (3, 4):
        raise ScorecardError(
            f"dose must be (B, Z, Y, X) or (Z, Y, X) in Gy, got shape {tuple(dose_gy.shape)}"
        )
    batched = dose_gy.ndim == 4
    dose = dose_gy if batched else dose_gy.unsqueeze(0)
    return (dose if torch.is_floating_point(dose) else dose.float()), batched


def gather(dose: Tensor, mask: Tensor, what: str = "mask") -> Tensor:
    """The doses ``(B, n)`` of a batch ``(B, Z, Y, X)`` inside a bool ``mask`` ``(Z, Y, X)``.

    Raises ``ScorecardError`` for a mask of another shape or dtype, an empty mask, or a NaN
    among the gathered doses (only the voxels a metric reads are checked, so that no pass
    over the whole grid, nor a device sync beyond one, is needed)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ScorecardError(f"{what} must be a bool torch tensor (Z, Y, X)")
    if tuple(mask.shape) != tuple(dose.shape[1:]):
        raise ScorecardError(
            f"{what} has shape {tuple(mask.shape)}; it must match the dose grid {tuple(dose.shape[1:])}"
        )
    idx = torch.nonzero(mask.to(dose.device).reshape(-1)).squeeze(1)
    if idx.numel() == 0:
        raise ScorecardError(f"{what} is empty (no voxel)")
    values = dose.reshape(dose.shape[0], -1).index_select(1, idx)
    if bool(torch.isnan(values).any()):
        raise ScorecardError(f"dose contains NaN: refusing to score ({what})")
    return values


def structure_values(
    dose: Tensor, mask: Tensor, occupancy: Tensor | None, voxel_volume_cc: float, what: str
) -> tuple[Tensor, Tensor | None]:
    """``(values (B, n), weights_cc (n,) or None)`` of a structure's voxels of positive weight;
    ``weights_cc`` is ``None`` when every voxel weighs ``voxel_volume_cc`` (no occupancy)."""
    values = gather(dose, mask, what)
    if occupancy is None:
        return values, None
    occ = torch.as_tensor(occupancy, device=dose.device)
    if tuple(occ.shape) != tuple(mask.shape):
        raise ScorecardError(
            f"occupancy has shape {tuple(occ.shape)}; it must match the mask {tuple(mask.shape)}"
        )
    w = occ[mask.to(dose.device)].double() * voxel_volume_cc
    keep = w > 0
    if not bool(keep.any()):
        raise ScorecardError(f"{what}: occupancy is zero on every voxel of the mask")
    return values[:, keep], w[keep]


class TorchDVH:
    """Exact DVHs of a batch over one structure (see the module docstring)."""

    def __init__(self, values: Tensor, weights_cc: Tensor | None, voxel_volume_cc: float):
        # values: (B, n) voxel doses (any order); weights_cc: (n,) or None
        self.values = values
        self.dtype = values.dtype
        n = values.shape[1]
        if weights_cc is None:
            self.total_volume_cc = float(n * voxel_volume_cc)
            self._w = None
            self._vox = float(voxel_volume_cc)
        else:
            self.total_volume_cc = float(weights_cc.sum())
            self._w = weights_cc
            self._vox = None
        self._sorted: tuple[Tensor, Tensor] | None = None

    def _sorted_knots(self) -> tuple[Tensor, Tensor]:
        """``(d, C)``: doses sorted descending ``(B, n)`` and cumulative volumes ``(B, n)``."""
        if self._sorted is None:
            d, order = torch.sort(self.values, dim=1, descending=True, stable=True)
            b, n = d.shape
            if self._w is None:
                c = torch.arange(1, n + 1, device=d.device, dtype=torch.float64) * self._vox
                c = c.expand(b, n)
            else:
                c = torch.cumsum(self._w[order], dim=1)
            self._sorted = (d, c.contiguous())
        return self._sorted

    def _volume_cc(self, volume: float, unit: str) -> float:
        if unit == "%":
            return float(volume) / 100.0 * self.total_volume_cc
        if unit == "cc":
            return float(volume)
        raise ScorecardError(f"volume unit {unit!r} is not valid; use '%' or 'cc'")

    @property
    def min_gy(self) -> Tensor:
        return self.values.amin(dim=1)

    @property
    def max_gy(self) -> Tensor:
        return self.values.amax(dim=1)

    @property
    def mean_gy(self) -> Tensor:
        v = self.values.double()
        if self._w is None:
            return v.mean(dim=1).to(self.dtype)
        return ((v * self._w).sum(dim=1) / self.total_volume_cc).to(self.dtype)

    @property
    def integral_dose_gy_l(self) -> Tensor:
        return self.mean_gy.double().mul(self.total_volume_cc / 1000.0).to(self.dtype)

    def dose_at_volume(self, volume: float, unit: str = "%") -> Tensor:
        v = self._volume_cc(volume, unit)
        d, c = self._sorted_knots()
        b, n = d.shape
        query = torch.full((b, 1), v, dtype=torch.float64, device=d.device)
        k = torch.searchsorted(c, query).squeeze(1)  # first k with C_k >= v
        hi = k.clamp(max=n - 1)
        lo = (k - 1).clamp(min=0, max=n - 1)
        rows = torch.arange(b, device=d.device)
        c_lo, c_hi = c[rows, lo], c[rows, hi]
        d_lo, d_hi = d[rows, lo].double(), d[rows, hi].double()
        span = c_hi - c_lo
        t = torch.where(span > 0, (v - c_lo) / torch.where(span > 0, span, 1.0), 1.0)
        t = t.clamp(0.0, 1.0)
        out = d_lo + t * (d_hi - d_lo)
        return out.to(self.dtype)

    def volume_at_dose(self, dose_gy: float, unit: str = "%") -> Tensor:
        hit = self.values >= dose_gy
        if self._w is None:
            vol = torch.count_nonzero(hit, dim=1).double() * self._vox
        else:
            vol = (hit.double() * self._w).sum(dim=1)
        if unit == "cc":
            return vol.to(self.dtype)
        if unit == "%":
            return (100.0 * vol / self.total_volume_cc).to(self.dtype)
        raise ScorecardError(f"volume unit {unit!r} is not valid; use '%' or 'cc'")


class TorchDVHCache:
    """Gathered doses and DVHs of one dose batch, computed once per mask object.

    Keys on the identity of the mask (and occupancy) tensors, holding references to them, so
    neither they nor the dose may be modified in place while the cache lives.
    """

    def __init__(self, dose_gy: Tensor, voxel_volume_cc: float) -> None:
        if not voxel_volume_cc > 0:
            raise ScorecardError(f"voxel_volume_cc must be > 0, got {voxel_volume_cc}")
        self.source = dose_gy
        self.dose, self.batched = as_batch(dose_gy)
        self.voxel_volume_cc = float(voxel_volume_cc)
        self._dvh: dict[tuple[int, int], tuple[Tensor, Tensor | None, TorchDVH]] = {}
        self._vals: dict[int, tuple[Tensor, Tensor]] = {}

    def values(self, mask: Tensor, what: str = "mask") -> Tensor:
        """The doses ``(B, n)`` inside ``mask`` (see :func:`gather`)."""
        hit = self._vals.get(id(mask))
        if hit is not None and hit[0] is mask:
            return hit[1]
        vals = gather(self.dose, mask, what)
        self._vals[id(mask)] = (mask, vals)
        return vals

    def dvh(self, mask: Tensor, occupancy: Tensor | None = None, what: str = "mask") -> TorchDVH:
        key = (id(mask), id(occupancy))
        hit = self._dvh.get(key)
        if hit is not None and hit[0] is mask and hit[1] is occupancy:
            return hit[2]
        if occupancy is None:
            out = TorchDVH(self.values(mask, what), None, self.voxel_volume_cc)
        else:
            vals, w = structure_values(self.dose, mask, occupancy, self.voxel_volume_cc, what)
            out = TorchDVH(vals, w, self.voxel_volume_cc)
        self._dvh[key] = (mask, occupancy, out)
        return out


def compute_metric_torch(
    spec: MetricSpec,
    dose_gy: Tensor,
    mask: Tensor,
    *,
    voxel_volume_cc: float,
    rx_gy: float | None = None,
    body: Tensor | None = None,
    occupancy: Tensor | None = None,
    cache: TorchDVHCache | None = None,
) -> Tensor:
    """``spec`` for each dose of a batch ``(B, Z, Y, X)`` (Gy) over ``mask`` ``(Z, Y, X)``.

    Returns ``(B,)`` (a 0-d tensor for a single ``(Z, Y, X)`` dose). Same arguments and errors
    as :func:`dosegym.scorecards.metrics.compute_metric`, except that only the doses the
    metric reads (structure and body) are checked for NaN. ``cache`` (a
    :class:`TorchDVHCache` built on this very ``dose_gy``) shares gathered and sorted doses
    across items.
    """
    where = spec.kind.value
    spec.validate(where)
    if cache is None:
        cache = TorchDVHCache(dose_gy, voxel_volume_cc)
    elif cache.source is not dose_gy:
        raise ScorecardError(f"{where}: the TorchDVHCache was built on another dose tensor")
    if not math.isclose(cache.voxel_volume_cc, voxel_volume_cc, rel_tol=1e-9):
        raise ScorecardError(
            f"{where}: voxel_volume_cc {voxel_volume_cc} differs from the cache's {cache.voxel_volume_cc}"
        )
    dvh = cache.dvh(mask, occupancy, f"{where}: structure mask")
    body_fn = None
    if body is not None and spec.kind in NEEDS_BODY:
        body_vals = cache.values(body, f"{where}: body mask")

        def body_fn(d: float) -> Tensor:
            return torch.count_nonzero(body_vals >= d, dim=1).double() * voxel_volume_cc

    out = evaluate_spec(spec, dvh, rx_gy=rx_gy, body_volume_cc=body_fn, ratio_fn=torch_ratio)
    dose = cache.dose
    out = torch.as_tensor(out, device=dose.device).to(dose.dtype)
    out = out.expand(dose.shape[0]) if out.ndim == 0 else out
    return out if cache.batched else out[0]
