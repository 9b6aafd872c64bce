"""Planar polygons <-> voxel planes: supersampled even-odd fill and iso-contour extraction.

Coordinates here are fractional indices of one 2-D plane, ``(i, j)`` = (row, column): the
centre of pixel ``(i, j)`` is at ``(i, j)`` and the pixel covers ``[i - 0.5, i + 0.5)`` ×
``[j - 0.5, j + 0.5)``. Patient coordinates and DICOM are the callers' business.
"""

from __future__ import annotations

from collections.abc import Sequence

import contourpy
import numpy as np


def fill_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int], supersample: int = 4) -> np.ndarray:
    """Fractional occupancy (``float32`` in [0, 1], ``shape``) of polygons on one plane.

    Each polygon is an ``(N, 2)`` array of ``(i, j)`` vertices, implicitly closed. All polygons
    of the plane combine by the even-odd rule (XOR), so a contour inside another is a hole.
    Each pixel row is sampled on ``supersample`` scanlines (at ``i + (k + 0.5) / s - 0.5``);
    along a scanline the covered length of each pixel is exact, so the occupancy is the mean
    over the scanlines of the covered fraction. Vectorised: the crossings of all edges with all
    scanlines are sorted per scanline and alternate between entering (+) and leaving (-).
    """
    ni, nj = (int(v) for v in shape)
    s = int(supersample)
    out = np.zeros((ni, nj), dtype=np.float32)
    edges = [
        np.concatenate([p, np.roll(p, -1, axis=0)], axis=1)
        for p in (np.asarray(q, dtype=np.float64).reshape(-1, 2) for q in polygons)
        if len(p) >= 3
    ]
    if not edges:
        return out
    e = np.concatenate(edges)  # (E, 4): i0, j0, i1, j1
    e = e[e[:, 0] != e[:, 2]]  # horizontal edges never cross a scanline
    if not len(e):
        return out
    # Pixel window covering the polygons; crossings left of it still count (clipped to 0).
    pi0 = max(0, int(np.floor(e[:, [0, 2]].min() + 0.5)))
    pi1 = min(ni, int(np.floor(e[:, [0, 2]].max() + 0.5)) + 1)
    pj0 = max(0, int(np.floor(e[:, [1, 3]].min() + 0.5)))
    pj1 = min(nj, int(np.floor(e[:, [1, 3]].max() + 0.5)) + 1)
    if pi0 >= pi1 or pj0 >= pj1:
        return out
    rows, cols = (pi1 - pi0) * s, pj1 - pj0
    # Scanline r sits at i = pi0 + (r + 0.5) / s - 0.5; an edge crosses the scanlines with
    # min(i0, i1) <= i < max(i0, i1) (half-open, so a shared vertex counts once).
    ya, yb = np.minimum(e[:, 0], e[:, 2]), np.maximum(e[:, 0], e[:, 2])
    r_lo = np.clip(np.ceil((ya - pi0 + 0.5) * s - 0.5), 0, rows).astype(np.int64)
    r_hi = np.clip(np.ceil((yb - pi0 + 0.5) * s - 0.5), 0, rows).astype(np.int64)
    counts = r_hi - r_lo
    total = int(counts.sum())
    if total == 0:
        return out
    edge = np.repeat(np.arange(len(e)), counts)
    r = r_lo[edge] + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    i0, j0, i1, j1 = e[edge].T
    y = pi0 + (r + 0.5) / s - 0.5
    u = np.clip(j0 + (y - i0) * (j1 - j0) / (i1 - i0) - pj0 + 0.5, 0.0, cols)  # pixel p: [p, p+1)
    order = np.lexsort((u, r))
    r, u = r[order], u[order]
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    rank = np.arange(total) - np.repeat(first, np.diff(np.r_[first, total]))
    sign = np.where(rank % 2 == 0, 1.0, -1.0)
    p = np.floor(u).astype(np.int64)
    width = cols + 2
    # The crossing's pixel gets the part right of it; every pixel after it the whole.
    partial = np.bincount(r * width + p, weights=sign * (p + 1 - u), minlength=rows * width)
    step = np.bincount(r * width + p + 1, weights=sign, minlength=rows * width)
    cover = partial.reshape(rows, width) + np.cumsum(step.reshape(rows, width), axis=1)
    frac = cover[:, :cols].reshape(pi1 - pi0, s, cols).mean(axis=1)
    out[pi0:pi1, pj0:pj1] = np.clip(frac, 0.0, 1.0)
    return out


def select_planes(plane_mm: np.ndarray, slice_mm: np.ndarray, half_thickness_mm: float) -> np.ndarray:
    """For each slice, the index of the nearest contour plane, or -1 where none is near.

    A plane at ``w`` represents the slab ``[w - h, w + h)`` (``h = half_thickness_mm``); a slice
    at ``s`` takes the nearest plane with ``-h <= w - s < h``. With slices on the planes'
    own spacing (``2h``) every plane goes to exactly one slice: its nearest one.
    """
    planes = np.asarray(plane_mm, dtype=np.float64).reshape(1, -1)
    slices = np.asarray(slice_mm, dtype=np.float64).reshape(-1, 1)
    if planes.size == 0:
        return np.full(slices.shape[0], -1, dtype=np.int64)
    d = planes - slices
    tol = 1e-6 * max(1.0, float(half_thickness_mm))  # a plane exactly between two slices
    valid = (d >= -half_thickness_mm - tol) & (d < half_thickness_mm - tol)  # goes up, once
    dist = np.where(valid, np.abs(d), np.inf)
    best = np.argmin(dist, axis=1)
    return np.where(np.isfinite(dist[np.arange(len(best)), best]), best, -1)


def plane_contours(plane: np.ndarray, level: float = 0.5) -> list[np.ndarray]:
    """Closed iso-contours at ``level`` of one 2-D plane, as ``(N, 2)`` ``(i, j)`` polygons.

    ``plane`` is a mask or a fractional occupancy; it is padded with zeros so that every
    contour closes, also at the border. Holes come out as separate polygons (even-odd rule).
    """
    padded = np.pad(np.asarray(plane, dtype=np.float64), 1)
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(level):
        pts = np.asarray(line)[:-1]  # closed lines repeat their first point
        if len(pts) >= 3:
            out.append(np.column_stack([pts[:, 1] - 1.0, pts[:, 0] - 1.0]))
    return out
