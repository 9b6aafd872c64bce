"""The report's pictures (matplotlib, Agg), each returned as PNG bytes.

Slices are drawn in (z, y, x) arrays: axial = a z index (rows y, columns x), coronal = a y
index (rows z from the top of the volume, columns x), sagittal = an x index (rows z, columns
y); pixel aspect from ``spacing_mm``. Doses in Gy; the colour wash runs from 0 to 1.1 x the
highest prescription and leaves out doses under :data:`WASH_FLOOR` of it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Doses under this share of the highest prescription are left out of the colour wash.
WASH_FLOOR = 0.1
#: Top of the colour scale, as a share of the highest prescription.
WASH_TOP = 1.1
#: Line style of each dose in the DVH plot (others solid).
DVH_STYLES = {"before": "--", "after": "-", "reference": ":"}
PLANES = ("axial", "coronal", "sagittal")
_DPI = 90


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def slice_centre(mask: np.ndarray | None, dose_gy: np.ndarray) -> tuple[int, int, int]:
    """The (z, y, x) voxel the slices go through: the centroid of ``mask`` (the main target),
    else the hottest voxel of ``dose_gy``."""
    if mask is not None and mask.any():
        return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(dose_gy)), dose_gy.shape))  # type: ignore[return-value]


def _plane(volume: np.ndarray, plane: str, centre: tuple[int, int, int]) -> np.ndarray:
    z, y, x = centre
    if plane == "axial":
        return volume[z]
    if plane == "coronal":
        return volume[::-1, y, :]
    return volume[::-1, :, x]


def _aspect(spacing_mm: Sequence[float], plane: str) -> float:
    dz, dy, dx = (float(s) for s in spacing_mm)
    return {"axial": dy / dx, "coronal": dz / dx, "sagittal": dz / dy}[plane]


def dose_wash(
    doses: Mapping[str, np.ndarray],
    structures: Mapping[str, np.ndarray],
    spacing_mm: Sequence[float],
    rx_gy: float,
    *,
    ct: np.ndarray | None = None,
    body: np.ndarray | None = None,
    centre: tuple[int, int, int] | None = None,
) -> bytes:
    """Axial, coronal and sagittal slices (rows) of each dose (columns, ``doses`` order) as an
    isodose colour wash over the CT (the body in grey without one), with the outline of
    every structure of ``structures``."""
    plt = _plt()
    first = next(iter(doses.values()))
    centre = centre or slice_centre(None, first)
    top = WASH_TOP * rx_gy
    colours = plt.get_cmap("tab10")
    col_w = 3.2
    ratios = []
    for plane in PLANES:
        rows, cols = _plane(first, plane, centre).shape
        ratios.append(rows * _aspect(spacing_mm, plane) / cols)
    fig, axes = plt.subplots(
        len(PLANES),
        len(doses),
        figsize=(col_w * len(doses) + 1.2, col_w * sum(ratios) + 0.9),
        squeeze=False,
        gridspec_kw={"height_ratios": ratios, "hspace": 0.04, "wspace": 0.04},
    )
    image = None
    for col, (label, dose) in enumerate(doses.items()):
        for row, plane in enumerate(PLANES):
            ax = axes[row][col]
            aspect = _aspect(spacing_mm, plane)
            if ct is not None:
                ax.imshow(_plane(ct, plane, centre), cmap="gray", vmin=-400, vmax=600, aspect=aspect)
            elif body is not None:
                ax.imshow(
                    _plane(body.astype(np.float32), plane, centre), cmap="gray", vmin=0, vmax=3, aspect=aspect
                )
            d = _plane(dose, plane, centre)
            image = ax.imshow(
                np.ma.masked_less(d, WASH_FLOOR * rx_gy),
                cmap="jet",
                vmin=0.0,
                vmax=top,
                alpha=0.5,
                aspect=aspect,
            )
            for k, mask in enumerate(structures.values()):
                m = _plane(mask.astype(np.float32), plane, centre)
                if m.any() and m.min() < 0.5:
                    ax.contour(m, levels=[0.5], colors=[colours(k % 10)], linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label)
            if col == 0:
                ax.set_ylabel(plane)
    handles = [plt.Line2D([], [], color=colours(k % 10), lw=1.5) for k in range(len(structures))]
    ncol = min(5, max(1, len(structures)))
    fig.legend(
        handles, list(structures), loc="upper center", bbox_to_anchor=(0.45, 0.08), ncol=ncol, fontsize=8
    )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="dose [Gy]")
    return _png(fig)


def dvh_plot(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """Cumulative DVHs: ``curves[structure][dose label] = (dose_gy, volume_pct)``; one colour
    per structure, one line style per dose (:data:`DVH_STYLES`)."""
    plt = _plt()
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    labels: list[str] = []
    for k, (_name, by_label) in enumerate(curves.items()):
        for label, (dose, volume) in by_label.items():
            ax.plot(dose, volume, DVH_STYLES.get(label, "-"), color=colours(k % 10), lw=1.2)
            if label not in labels:
                labels.append(label)
    ax.set_xlabel("dose [Gy]")
    ax.set_ylabel("volume [%]")
    ax.set_ylim(0, 101)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    structure_handles = [plt.Line2D([], [], color=colours(k % 10), lw=2) for k in range(len(curves))]
    style_handles = [plt.Line2D([], [], color="k", ls=DVH_STYLES.get(s, "-")) for s in labels]
    ax.legend(
        structure_handles + style_handles,
        [*curves, *labels],
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1, 0.5),
    )
    return _png(fig)


def run_curves(curves: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]]) -> bytes:
    """The training reward (mean per iteration) and the eval score (mean normalised exact card
    score) against samples trained."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    rows = [c for c in curves if _finite(c.get("reward_mean"))]
    left.plot([c["samples"] for c in rows], [c["reward_mean"] for c in rows], "-", color="tab:blue", lw=1)
    left.set_title("training reward")
    left.set_xlabel("samples")
    rows = [e for e in evals if _finite(e.get("score_mean"))]
    right.plot([e["samples"] for e in rows], [e["score_mean"] for e in rows], "o-", color="tab:green")
    right.set_title("eval score (normalised)")
    right.set_xlabel("samples")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def score_vs_fidelity(evals: Sequence[Mapping[str, Any]]) -> bytes:
    """Each evaluation's mean score against its MAE to the reference (Gy), in order, labelled
    by samples trained."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    rows = [e for e in evals if _finite(e.get("mae_gy")) and _finite(e.get("score_mean"))]
    ax.plot([e["mae_gy"] for e in rows], [e["score_mean"] for e in rows], "o-", color="tab:purple")
    for e in rows:
        ax.annotate(
            str(e["samples"]),
            (e["mae_gy"], e["score_mean"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("MAE to the reference [Gy]")
    ax.set_ylabel("eval score (normalised)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))
