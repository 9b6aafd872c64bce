"""Image stacks: planes of pixels in patient space, sampled onto grids and reoriented.

A stack is planes ``values[f, i, j]`` at LPS ``position + offsets[f] n + i dr c + j dc r``
(row cosine ``r``, column cosine ``c``, normal ``n = r × c``, ``PixelSpacing`` = (dr, dc)).
Its native index axes (plane, row, column) run along ``(n, c, r)``; :func:`canonical_grid`
reorders and flips them so that each runs along the positive patient axis nearest to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from dosegym.data.grid import Grid
from dosegym.errors import DataError


def uneven_gap(positions: np.ndarray) -> int | None:
    """Index of the first gap that differs from the median gap by over 1 % (or 0.01 mm)."""
    if len(positions) < 3:
        return None
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(0.01, 0.01 * abs(step)))
    return int(bad[0]) if bad.size else None


@dataclass(frozen=True)
class Stack:
    """Image planes ``values[f, i, j]`` at LPS ``position + offsets[f] n + i dr c + j dc r``."""

    values: np.ndarray
    position: np.ndarray
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    offsets: np.ndarray
    source: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    def native_grid(self, slice_thickness_mm: float | None = None) -> Grid:
        """The grid of ``values`` (index axes slice, row, column); needs uniform offsets."""
        n = len(self.offsets)
        if n > 1:
            step = (self.offsets[-1] - self.offsets[0]) / (n - 1)
            gap = uneven_gap(self.offsets)
            if gap is not None:
                raise DataError(
                    f"{self.source}: planes are not equally spaced (gap of "
                    f"{self.offsets[gap + 1] - self.offsets[gap]:.4g} mm after plane {gap}, "
                    f"expected {np.median(np.diff(self.offsets)):.4g} mm); read_dicom "
                    "resamples such a stack onto the case grid"
                )
        elif slice_thickness_mm:
            step = float(slice_thickness_mm)
        else:
            raise DataError(f"{self.source}: a single plane without SliceThickness has no 3-D grid")
        axes = np.column_stack([self.normal, self.col_cosine, self.row_cosine])  # LPS columns
        origin = self.position + self.offsets[0] * self.normal
        return Grid(
            self.values.shape,
            (step, self.pixel_spacing[0], self.pixel_spacing[1]),
            tuple(origin[::-1]),
            tuple(map(tuple, axes[::-1])),  # rows in (z, y, x) order, columns = index axes
        )

    def _index(self, axis: int, coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional index along ``axis`` (clipped into range) and where it is in range.

        ``coord`` is in mm along the normal for axis 0 (frames may be unequally spaced) and
        in pixels for the in-plane axes. Tolerance: 1e-4 of a voxel.
        """
        eps = 1e-4
        n = self.values.shape[axis]
        if axis > 0:
            return np.clip(coord, 0, n - 1), (coord >= -eps) & (coord <= n - 1 + eps)
        if n == 1:
            inside = np.abs(coord - self.offsets[0]) <= eps * max(self.pixel_spacing)
            return np.zeros_like(coord), inside
        tol = eps * float(np.diff(self.offsets).min())
        frames = np.interp(coord, self.offsets, np.arange(n, dtype=np.float64))
        return frames, (coord >= self.offsets[0] - tol) & (coord <= self.offsets[-1] + tol)

    def sample(self, grid: Grid, outside: float) -> np.ndarray:
        """Trilinear samples (``float32``) at the voxel centres of ``grid``; ``outside`` beyond.

        Points outside the span of the stack's voxel centres get ``outside``. Grids whose
        axes are parallel to the stack's are interpolated axis by axis (separably); others
        through ``scipy.ndimage.map_coordinates``. Both are exact for linear fields.
        """
        steps = (np.asarray(grid.direction) * np.asarray(grid.spacing_mm))[::-1]  # LPS per index
        base = np.asarray(grid.origin_mm)[::-1] - self.position
        axes = (self.normal, self.col_cosine, self.row_cosine)
        scale = (1.0, self.pixel_spacing[0], self.pixel_spacing[1])
        # stack coordinate a = coef[a, 0] + coef[a, 1:] . (k, i, j) of the grid
        coef = np.array([[base @ ax, *(steps.T @ ax)] for ax in axes]) / np.array(scale)[:, None]
        index = [np.arange(n, dtype=np.float64) for n in grid.shape]
        out = np.full(grid.shape, outside, dtype=np.float32)
        used = np.abs(coef[:, 1:]) > 1e-9 * np.abs(coef[:, 1:]).max(axis=1, keepdims=True)
        source = np.argmax(used, axis=1)  # the grid axis that drives each stack axis
        if np.all(used.sum(axis=1) == 1) and sorted(source.tolist()) == [0, 1, 2]:
            vals = self.values.astype(np.float64, copy=False)
            inside = []
            for a in range(3):
                pos, ok = self._index(a, coef[a, 0] + coef[a, 1 + source[a]] * index[source[a]])
                lo = np.clip(np.floor(pos).astype(np.int64), 0, max(vals.shape[a] - 2, 0))
                hi = np.minimum(lo + 1, vals.shape[a] - 1)
                w = (pos - lo).reshape([-1 if b == a else 1 for b in range(3)])
                vals = np.take(vals, lo, axis=a) * (1.0 - w) + np.take(vals, hi, axis=a) * w
                inside.append(ok)
            order = np.argsort(source)  # grid axis m is stack axis order[m]
            vals = np.transpose(vals, order)
            mask = np.ix_(*(np.flatnonzero(inside[o]) for o in order))
            out[mask] = vals[mask]
            return out
        k, i, j = index
        pts, inside = [], np.ones(grid.shape, dtype=bool)
        for a in range(3):
            coord = coef[a, 0] + coef[a, 1] * k[:, None, None] + coef[a, 2] * i[:, None] + coef[a, 3] * j
            pos, ok = self._index(a, coord)
            pts.append(pos)
            inside &= ok
        if inside.any():
            out[inside] = ndimage.map_coordinates(
                self.values.astype(np.float64, copy=False),
                np.stack([p[inside] for p in pts]),
                order=1,
                mode="nearest",
            )
        return out


def canonical_grid(grid: Grid) -> tuple[Grid, tuple[int, int, int], tuple[int, ...]]:
    """Reorder index axes so each runs along the positive patient axis nearest to it.

    Returns the new grid, the axis order (new axis p is old axis ``order[p]``) and the new
    axes that are flipped. Oblique grids whose axes do not map one-to-one stay as they are.
    """
    d = np.asarray(grid.direction)
    nearest = np.argmax(np.abs(d), axis=0)  # patient axis nearest to each index axis
    if sorted(nearest.tolist()) != [0, 1, 2]:
        return grid, (0, 1, 2), ()
    order = tuple(int(np.flatnonzero(nearest == p)[0]) for p in range(3))
    flips = tuple(p for p in range(3) if d[p, order[p]] < 0)
    corner = np.zeros(3)
    for p in flips:
        corner[order[p]] = grid.shape[order[p]] - 1
    new_d = d[:, list(order)] * np.array([-1.0 if p in flips else 1.0 for p in range(3)])
    out = Grid(
        tuple(grid.shape[o] for o in order),
        tuple(grid.spacing_mm[o] for o in order),
        tuple(grid.index_to_mm(corner)),
        tuple(map(tuple, new_d)),
    )
    return out, order, flips  # type: ignore[return-value]


def reorient(arr: np.ndarray, order: tuple[int, int, int], flips: tuple[int, ...]) -> np.ndarray:
    """``arr`` with the axes of :func:`canonical_grid`: transposed by ``order``, flipped on ``flips``."""
    return np.ascontiguousarray(np.flip(np.transpose(arr, order), axis=flips))


def pixel_array(ds: Dataset, path: Path) -> np.ndarray:
    """The decoded pixels of ``ds``; a decoder failure is a ``DataError`` naming ``path``."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise DataError(f"{path}: PixelData cannot be decoded ({type(exc).__name__}: {exc})") from exc


def slice_thickness(ds: Dataset) -> float | None:
    """``SliceThickness`` (mm) when present and positive, else ``None``."""
    value = ds.get("SliceThickness")
    try:
        return float(value) if value not in (None, "") and float(value) > 0 else None
    except (TypeError, ValueError):
        return None
