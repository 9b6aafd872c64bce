"""Every soft item of a binding at once, with closed-form gradients (:class:`SoftItems`).

What :meth:`~dosegym.scorecards.soft_card.SoftScorecard.metrics` runs at a temperature: the
values of :func:`~dosegym.scorecards.soft.soft_metric_torch` (the same definitions, equal to
float rounding), for all items together. An item is
:func:`~dosegym.scorecards.metrics.evaluate_spec` over *primitives* of its structure's soft DVH,
the columns of one ``(B, n_primitives)`` float64 table: ``D(v)`` (the soft Dx root), ``V(d)``
(the sigmoid count; also the body's), the softmax max and min, and ``sum w d`` (mean and
integral dose). Items on one structure share its primitives.

Layout: the voxels of positive weight of every structure are gathered once into a padded
``(S, L)`` index (padding repeats a voxel of the structure and weighs 0) and sorted once for
``D(v)``; all ``D(v)`` roots are searched together by :func:`~dosegym.scorecards.soft.soft_root`,
one row per batch element and primitive.

Gradients of the primitives with respect to their structure's voxel doses are closed-form,
``(B, n_primitives, L)``: ``D(v)``: the implicit-function one, ``-(dV_soft/dd_i) /
V_soft'(root)`` (:func:`~dosegym.scorecards.soft.soft_ramp_gradients`, through the sort),
which is what autograd gives through :class:`~dosegym.scorecards.soft.SoftDVH`'s Newton step;
``V(d)``: ``w sigmoid'``; a softmax mean ``m``: ``p_i (1 +- (d_i - m) / tau)``; ``sum w d``:
``w``. :class:`SoftPrimitives` (an autograd Function) scatters them onto the grid in its
backward, so that autograd through the items needs no graph over the search; the items'
formulas on top are ordinary autograd on ``(B,)`` tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from dosegym.errors import ScorecardError
from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.metrics import NEEDS_BODY, evaluate_spec
from dosegym.scorecards.metrics_torch import torch_ratio
from dosegym.scorecards.soft import check_temperature, volume_in, volume_or_end
from dosegym.scorecards.soft_root import soft_root_window

Tensor = torch.Tensor
Key = tuple[str, int, float]  # (primitive kind, structure index, argument: cc for dx, Gy for vx)
KINDS = ("dx", "vx", "max", "min", "wsum")  # the primitive kinds, in their column order
_TOLERANCE = 1e-2  # the D(v) search's last Newton step (tau): two more square its error


class _ItemDVH:
    """The DVH an item's :func:`evaluate_spec` reads: each primitive one column (``column(key)``
    gives it in float64), returned in ``dtype`` as :class:`~dosegym.scorecards.soft.SoftDVH`
    returns them."""

    def __init__(self, column: Callable[[Key], Tensor], s: int, total_cc: float, dtype: torch.dtype):
        self.column, self.s, self.total_volume_cc, self.dtype = column, s, total_cc, dtype

    def _get(self, kind: str, arg: float = 0.0) -> Tensor:
        return self.column((kind, self.s, float(arg)))

    @property
    def max_gy(self) -> Tensor:
        return self._get("max").to(self.dtype)

    @property
    def min_gy(self) -> Tensor:
        return self._get("min").to(self.dtype)

    @property
    def mean_gy(self) -> Tensor:
        return (self._get("wsum") / self.total_volume_cc).to(self.dtype)

    @property
    def integral_dose_gy_l(self) -> Tensor:
        return (self._get("wsum") / 1000.0).to(self.dtype)

    def volume_at_dose(self, dose_gy: float, unit: str = "%") -> Tensor:
        return volume_in(self._get("vx", dose_gy), unit, self.total_volume_cc).to(self.dtype)

    def dose_at_volume(self, volume: float, unit: str = "%") -> Tensor:
        v, end = volume_or_end(volume, unit, self.total_volume_cc, self.max_gy, self.min_gy)
        return end if end is not None else self._get("dx", v).to(self.dtype)


class SoftItems:
    """The soft primitives and items of one binding on one device (see the module docstring).

    ``index`` ``(S, L)``: flat grid indices of each structure's voxels (padded), ``weight``
    ``(S, L)`` their volumes in cc (0 on padding); ``columns``: each primitive's column;
    ``union``: the flat indices of all structures' voxels."""

    def __init__(self, bound: BoundScorecard, device: torch.device) -> None:
        case = bound.case
        self.shape = tuple(case.grid.shape)
        self.rx_gy = bound.reference_gy
        self.what = [item.describe(i) for i, item in enumerate(bound.card.items)]
        self.specs = [
            item.spec if r.mask is not None else None for item, r in zip(bound.card.items, bound.resolved)
        ]
        structures: list[tuple[np.ndarray, np.ndarray]] = []  # (flat voxel indices, weights cc)
        self.structure: list[int | None] = []  # each item's structure (None: unmatched)
        self.body: list[int | None] = []  # each item's body, where it needs one
        for i, r in enumerate(bound.resolved):
            if r.mask is None:
                self.structure.append(None)
                self.body.append(None)
                continue
            try:
                self.structure.append(_structure(structures, r.mask, r.occupancy, case.voxel_volume_cc))
                needs_body = r.body is not None and self.specs[i].kind in NEEDS_BODY
                self.body.append(
                    _structure(structures, r.body, None, case.voxel_volume_cc) if needs_body else None
                )
            except ScorecardError as exc:
                raise ScorecardError(f"{self.what[i]}: {exc}") from None
        length = max(len(ix) for ix, _ in structures) if structures else 1
        index = np.zeros((len(structures), length), dtype=np.int64)
        weight = np.zeros((len(structures), length))
        for s, (ix, w) in enumerate(structures):
            index[s] = ix[0]
            index[s, : len(ix)] = ix
            weight[s, : len(w)] = w
        self.index = torch.from_numpy(index).to(device)
        self.weight = torch.from_numpy(weight).to(device)
        self.log_weight = torch.log(self.weight)  # -inf on padding: the softmax max / min skip it
        self.count = torch.tensor([len(ix) for ix, _ in structures], dtype=torch.int64, device=device)
        self.valid = torch.arange(length, device=device)[None, :] < self.count[:, None]
        self.total_cc = [float(w.sum()) for w in self.weight]
        # record the primitives each item reads (evaluate_spec on placeholder columns)
        recorded: dict[Key, int] = {}

        def record(key: Key) -> Tensor:
            recorded.setdefault(key, len(recorded))
            return torch.zeros(1, dtype=torch.float64)

        for i in range(len(self.specs)):
            if self.specs[i] is not None:
                self._item(i, record, torch.float64)
        keys = sorted(recorded, key=lambda k: (KINDS.index(k[0]), recorded[k]))
        self.columns = {k: j for j, k in enumerate(keys)}
        self.rows = {kind: [k for k in keys if k[0] == kind] for kind in KINDS}
        struct = torch.tensor([k[1] for k in keys], dtype=torch.int64, device=device)
        self.assign = torch.zeros((len(keys), len(structures)), dtype=torch.float64, device=device)
        self.assign[torch.arange(len(keys), device=device), struct] = 1.0  # primitive -> structure
        self.voxel_slot = torch.nonzero(self.valid.reshape(-1))[:, 0]  # the unpadded (S, L) slots
        self.voxels = self.index.reshape(-1)[self.voxel_slot]  # their flat grid indices
        self.union = torch.unique(self.index)  # every voxel some primitive reads, ascending
        self.voxel_union = torch.searchsorted(self.union, self.voxels)  # their place there
        dx = self.rows["dx"]
        self.dx_sorted = sorted({k[1] for k in dx})  # the structures sorted for D(v)
        self.dx_pos = torch.tensor([self.dx_sorted.index(k[1]) for k in dx], dtype=torch.int64, device=device)
        self.args = {
            kind: torch.tensor([k[2] for k in rows], dtype=torch.float64, device=device)
            for kind, rows in self.rows.items()
        }
        self.structs = {
            kind: torch.tensor([k[1] for k in rows], dtype=torch.int64, device=device)
            for kind, rows in self.rows.items()
        }

    def _item(self, i: int, column: Callable[[Key], Tensor], dtype: torch.dtype) -> Any:
        """Item ``i``'s value from the primitive columns (``evaluate_spec`` as the soft engine)."""
        spec, s, b = self.specs[i], self.structure[i], self.body[i]
        body_fn = None if b is None else (lambda d: column(("vx", b, float(d))))
        try:
            return evaluate_spec(
                spec,
                _ItemDVH(column, s, self.total_cc[s], dtype),
                rx_gy=self.rx_gy,
                body_volume_cc=body_fn,
                ratio_fn=torch_ratio,
            )
        except ScorecardError as exc:
            raise ScorecardError(f"{self.what[i]}: {exc}") from None

    # -- primitives -------------------------------------------------------------------------
    def gather(self, flat: Tensor) -> Tensor:
        """The structures' voxel doses ``(B, S, L)`` of flat doses ``(B, N)`` (Gy); a NaN among
        them raises ``ScorecardError`` naming the first item that reads it."""
        vals = flat.detach().index_select(1, self.index.reshape(-1)).reshape(flat.shape[0], *self.index.shape)
        if bool(torch.isnan(vals).any()):
            self._raise_nan(vals)
        return vals

    def primitives(self, gathered: Tensor, tau: float, *, jacobian: bool) -> tuple[Tensor, Tensor | None]:
        """The primitives ``(B, n_primitives)`` (float64) of gathered doses ``(B, S, L)``
        (:meth:`gather`), and with ``jacobian`` their gradients ``(B, n_primitives, L)`` on
        their structure's voxels."""
        b = gathered.shape[0]
        vals = gathered.double()
        parts = [(vals.new_zeros((b, 0)), vals.new_zeros((b, 0, vals.shape[2])) if jacobian else None)]
        if self.rows["dx"]:
            parts.append(self._dose_at_volume(vals, tau, jacobian))
        if self.rows["vx"]:
            s = self.structs["vx"]
            sg = torch.sigmoid((vals[:, s] - self.args["vx"][None, :, None]) / tau)
            w = self.weight[s]
            parts.append(((sg * w).sum(dim=2), w * sg * (1.0 - sg) / tau if jacobian else None))
        for kind, sign in (("max", 1.0), ("min", -1.0)):
            if self.rows[kind]:
                s = self.structs[kind]
                x = vals[:, s]
                p = torch.softmax(sign * x / tau + self.log_weight[s], dim=2)
                m = (p * x).sum(dim=2)
                parts.append((m, p * (1.0 + sign * (x - m[..., None]) / tau) if jacobian else None))
        if self.rows["wsum"]:
            w = self.weight[self.structs["wsum"]]
            parts.append(
                ((vals[:, self.structs["wsum"]] * w).sum(dim=2), w.expand(b, -1, -1) if jacobian else None)
            )
        values = torch.cat([v for v, _ in parts], dim=1)
        return values, (torch.cat([j for _, j in parts], dim=1) if jacobian else None)

    def _dose_at_volume(self, vals: Tensor, tau: float, jacobian: bool) -> tuple[Tensor, Tensor | None]:
        """Soft ``D(v)`` of every dx primitive, ``(B, R)``, and its gradient ``(B, R, L)``: the
        structures sorted once, all roots in one search, then the Newton step of
        :meth:`SoftDVH.dose_at_volume` (the value) and its implicit-function gradient, both on
        the search's window (the ramps it leaves out are saturated to ``e^-36``)."""
        u = torch.tensor(self.dx_sorted, dtype=torch.int64, device=vals.device)
        b, length = vals.shape[0], vals.shape[2]
        valid = self.valid[u]
        d, order = torch.sort(torch.where(valid, vals[:, u], -torch.inf), dim=2, descending=True, stable=True)
        d = torch.where(
            valid, d, d.gather(2, (self.count[u] - 1)[None, :, None].expand(b, -1, 1))
        )  # pad: min
        w = self.weight[u].expand(b, -1, -1).gather(2, order)
        r = len(self.dx_pos)
        lower, ww, od = (t[:, self.dx_pos].reshape(b * r, length) for t in (d, w, order))
        lengths = self.count[u][self.dx_pos].repeat(b)
        v = self.args["dx"].repeat(b)[:, None]
        root, window = soft_root_window(v, lower, ww, tau, lengths=lengths, tolerance=_TOLERANCE)
        terms = window.terms(root, gradients=jacobian)
        slope = torch.where(terms[1] < 0, terms[1], torch.full_like(terms[1], -1e-300))
        value = (root - (terms[0] - v) / slope).view(b, r)
        if not jacobian:
            return value, None
        voxel = window.row * length + od.reshape(-1)[window.knot]
        jac = torch.zeros(b * r * length, dtype=vals.dtype, device=vals.device)
        jac.index_add_(0, voxel, (-terms[2] / slope[window.row])[:, 0])
        return value, jac.view(b, r, length)

    def _raise_nan(self, vals: Tensor) -> None:
        bad = torch.isnan(vals).any(dim=2).any(dim=0).tolist()
        for i, spec in enumerate(self.specs):
            for s, what in ((self.structure[i], "structure mask"), (self.body[i], "body mask")):
                if s is not None and bad[s]:
                    raise ScorecardError(
                        f"{self.what[i]}: dose contains NaN: refusing to score ({spec.kind.value}: {what})"
                    )

    def _voxel_terms(self, weights: Tensor, jac: Tensor) -> Tensor:
        """``sum_p weights[b, k, p] * jac[b, p]`` per structure voxel, ``(B * K, V)`` on the
        voxels of :attr:`voxels` (``weights`` ``(B, K, P)``, ``jac`` ``(B, P, L)``)."""
        per_structure = weights[..., None] * self.assign  # (B, K, P, S)
        terms = torch.einsum("bkps,bpl->bksl", per_structure, jac)
        return terms.reshape(terms.shape[0] * terms.shape[1], -1)[:, self.voxel_slot]

    def scatter(self, weights: Tensor, jac: Tensor) -> Tensor:
        """``sum_p weights[:, p] * jac[:, p]`` on flat grids ``(B, N)`` (``weights`` ``(B, P)``,
        ``jac`` ``(B, P, L)``)."""
        terms = self._voxel_terms(weights[:, None], jac)
        out = torch.zeros((terms.shape[0], math.prod(self.shape)), dtype=terms.dtype, device=terms.device)
        return out.index_add_(1, self.voxels, terms)

    def compact(self, weights: Tensor, jac: Tensor) -> Tensor:
        """``sum_p weights[b, :, p] * jac[b, p]`` on the voxels of :attr:`union`, ``(B, K, U)``
        (``weights`` ``(B, K, P)``, ``jac`` ``(B, P, L)``)."""
        terms = self._voxel_terms(weights, jac)
        out = torch.zeros((terms.shape[0], self.union.numel()), dtype=terms.dtype, device=terms.device)
        return out.index_add_(1, self.voxel_union, terms).view(*weights.shape[:2], -1)

    # -- items ------------------------------------------------------------------------------
    def item_values(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """Item metrics ``(B, n_items)`` in ``dtype`` from the primitives ``(B, n_primitives)``
        (differentiable in them); NaN columns for unmatched items."""
        cols = []
        for i in range(len(self.specs)):
            if self.specs[i] is None:
                cols.append(torch.full(values.shape[:1], torch.nan, dtype=dtype, device=values.device))
                continue
            out = torch.as_tensor(self._item(i, lambda key: values[:, self.columns[key]], dtype)).to(dtype)
            cols.append(out.expand(values.shape[0]) if out.ndim == 0 else out)
        return torch.stack(cols, dim=1)

    def check(self, dose_gy: Tensor, temperature: float) -> Tensor:
        """``dose_gy`` ``(B, Z, Y, X)`` as a floating tensor; ``ScorecardError`` for another grid
        or a temperature that is not a finite number > 0."""
        check_temperature(temperature, "soft metrics")
        if (
            not isinstance(dose_gy, torch.Tensor)
            or dose_gy.ndim != 4
            or tuple(dose_gy.shape[1:]) != self.shape
        ):
            shape = tuple(dose_gy.shape) if isinstance(dose_gy, torch.Tensor) else type(dose_gy).__name__
            raise ScorecardError(f"dose has shape {shape}; need (B, *{self.shape}) in Gy")
        return dose_gy if torch.is_floating_point(dose_gy) else dose_gy.float()

    def metrics(self, dose_gy: Tensor, temperature: float) -> Tensor:
        """Soft item metrics ``(B, n_items)`` of doses ``(B, Z, Y, X)`` (Gy), differentiable."""
        dose = self.check(dose_gy, temperature)
        values = SoftPrimitives.apply(dose.reshape(dose.shape[0], -1), self, float(temperature))
        return self.item_values(values, dose.dtype)


class SoftPrimitives(torch.autograd.Function):
    """:meth:`SoftItems.primitives` as an autograd op, flat doses ``(B, N)`` -> ``(B,
    n_primitives)``; its backward scatters the closed-form gradients (once differentiable)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, items: SoftItems, tau: float) -> Tensor:
        values, jac = items.primitives(items.gather(flat), tau, jacobian=bool(ctx.needs_input_grad[0]))
        ctx.items, ctx.jac, ctx.dtype = items, jac, flat.dtype
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.items.scatter(grad, ctx.jac).to(ctx.dtype), None, None


def _structure(
    structures: list[tuple[np.ndarray, np.ndarray]],
    mask: np.ndarray,
    occupancy: np.ndarray | None,
    vox: float,
) -> int:
    """The index of ``mask``'s voxels (weighted by ``occupancy``) in ``structures``, added once."""
    ix = np.flatnonzero(mask)
    w = np.full(ix.shape, float(vox)) if occupancy is None else np.asarray(occupancy).reshape(-1)[ix] * vox
    if ix.size == 0:
        raise ScorecardError("structure mask is empty (no voxel)")
    if occupancy is not None:
        keep = w > 0
        if not keep.any():
            raise ScorecardError("structure mask: occupancy is zero on every voxel of the mask")
        ix, w = ix[keep], w[keep]
    for s, (jx, v) in enumerate(structures):
        if np.array_equal(ix, jx) and np.array_equal(w, v):
            return s
    structures.append((ix, w))
    return len(structures) - 1
