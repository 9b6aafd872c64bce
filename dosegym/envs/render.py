"""Pictures and text of an environment's current dose (matplotlib Agg, no display needed).

:func:`rgb_array`: axial, coronal and sagittal slices through the isocenter (the beams'
isocenter, else the targets' centroid, else the grid centre) with the CT in grey, an
isodose colour wash (levels in % of the highest prescription) and structure outlines;
returned as an ``(H, W, 3)`` ``uint8`` array. :func:`ansi`: a score report as plain text.
"""

from __future__ import annotations

import io

import numpy as np

from dosegym.data.case import Case
from dosegym.scorecards.report import ScoreReport

#: Isodose levels in % of the highest prescription.
ISODOSE_PCT: tuple[float, ...] = (30, 50, 70, 90, 95, 100, 105, 110)
_OUTLINE_COLOURS = (
    "#ff4040",
    "#40ff40",
    "#4080ff",
    "#ffff40",
    "#ff40ff",
    "#40ffff",
    "#ff9933",
    "#b366ff",
    "#ffffff",
    "#99cc00",
)


def isocenter_index(case: Case) -> tuple[int, int, int]:
    """Voxel (z, y, x) the slices pass through (see the module docstring)."""
    shape = np.asarray(case.grid.shape)
    if case.beams is not None:
        idx = np.rint(case.grid.mm_to_index(np.asarray(case.beams.isocenter_mm, dtype=float)))
    elif case.targets:
        union = np.logical_or.reduce([case.structures[t] for t in case.targets])
        idx = np.rint(np.argwhere(union).mean(axis=0))
    else:
        idx = (shape - 1) / 2
    return tuple(int(v) for v in np.clip(np.asarray(idx, dtype=float), 0, shape - 1).astype(int))


def _slices(vol: np.ndarray, c: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial (y, x), coronal (z, x) and sagittal (z, y) planes; z drawn upwards."""
    return [vol[c[0]], vol[:, c[1], :][::-1], vol[:, :, c[2]][::-1]]


def rgb_array(case: Case, dose_gy: np.ndarray, title: str = "", width_px: int = 960) -> np.ndarray:
    """The picture of ``dose_gy`` (Gy, ``case.grid.shape``) on ``case`` (see module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure

    rx = case.max_prescription_gy or float(np.max(dose_gy)) or 1.0
    c = isocenter_index(case)
    sz, sy, sx = case.grid.spacing_mm
    aspects = [sy / sx, sz / sx, sz / sy]
    names = ("axial", "coronal", "sagittal")
    fig = Figure(figsize=(width_px / 100, width_px / 300 + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    levels = [rx * p / 100 for p in ISODOSE_PCT] + [max(float(dose_gy.max()), rx * 1.2) + 1e-6]
    norm = BoundaryNorm(levels, 256)
    ct = case.ct if case.ct is not None else None
    structures = list(case.structures.items())
    for k, ax in enumerate(axes):
        if ct is not None:
            ax.imshow(_slices(ct, c)[k], cmap="gray", vmin=-500, vmax=500, aspect=aspects[k])
        else:
            ax.imshow(np.zeros_like(_slices(dose_gy, c)[k]), cmap="gray", vmin=0, vmax=1, aspect=aspects[k])
        d = np.ma.masked_less(_slices(dose_gy, c)[k], levels[0])
        ax.imshow(d, cmap="jet", norm=norm, alpha=0.45, aspect=aspects[k], interpolation="nearest")
        for j, (_, mask) in enumerate(structures):
            plane = _slices(mask.astype(np.float32), c)[k]
            if plane.any() and plane.min() < 0.5:
                ax.contour(
                    plane, levels=[0.5], colors=_OUTLINE_COLOURS[j % len(_OUTLINE_COLOURS)], linewidths=0.8
                )
        ax.set_title(names[k], fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(
            f"{title}; isodoses {', '.join(f'{p:g}' for p in ISODOSE_PCT)} % of {rx:g} Gy", fontsize=9
        )
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def ansi(report: ScoreReport) -> str:
    """``report``'s score table as plain text (no colour codes)."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(report.table())
    return buf.getvalue()
