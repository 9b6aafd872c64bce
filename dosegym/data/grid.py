"""The voxel grid: shape, spacing, origin and direction, all in (z, y, x) order.

Conventions:

* ``shape`` is ``(nz, ny, nx)``; arrays on the grid are indexed ``a[z, y, x]``.
* ``spacing_mm`` and ``origin_mm`` are ``(z, y, x)`` triples in mm.
* ``origin_mm`` is the patient position (DICOM LPS, stored z-first) of the **centre** of voxel
  ``(0, 0, 0)``.
* ``direction`` is a 3×3 matrix whose **columns** are the unit vectors, in (z, y, x) patient
  components, of the index axes (z, y, x). The identity means index axes run along +z
  (superior), +y (posterior), +x (patient left).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dosegym.errors import DataError

Triple = tuple[float, float, float]


def _triple(value, name: str) -> Triple:
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape != (3,):
        raise DataError(f"Grid.{name} must have 3 values (z, y, x), got {list(arr)}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True)
class Grid:
    """An immutable voxel grid in (z, y, x) order (see module docstring)."""

    shape: tuple[int, int, int]
    spacing_mm: Triple
    origin_mm: Triple = (0.0, 0.0, 0.0)
    direction: tuple[Triple, Triple, Triple] = field(
        default=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    )

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in np.asarray(self.shape).reshape(-1))
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"Grid.shape must be 3 positive sizes (z, y, x), got {self.shape}")
        spacing = _triple(self.spacing_mm, "spacing_mm")
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise DataError(f"Grid.spacing_mm must be finite and > 0 mm, got {spacing}")
        origin = _triple(self.origin_mm, "origin_mm")
        if not all(np.isfinite(origin)):
            raise DataError(f"Grid.origin_mm must be finite, got {origin}")
        direction = np.asarray(self.direction, dtype=float)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise DataError(f"Grid.direction must be a finite 3x3 matrix, got {direction.tolist()}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise DataError(f"Grid.direction must be orthonormal, got {direction.tolist()}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", origin)
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in r) for r in direction))

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cc (cm³)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def size(self) -> int:
        """Number of voxels."""
        return int(np.prod(self.shape))

    @property
    def extent_mm(self) -> Triple:
        """Physical size of the grid along each index axis, in mm (voxel edges to edges)."""
        return tuple(float(n * s) for n, s in zip(self.shape, self.spacing_mm))  # type: ignore[return-value]

    def index_to_mm(self, index) -> np.ndarray:
        """Map (..., 3) voxel indices (z, y, x), fractional allowed, to patient mm (z, y, x)."""
        idx = np.asarray(index, dtype=float)
        scaled = idx * np.asarray(self.spacing_mm)
        return scaled @ np.asarray(self.direction).T + np.asarray(self.origin_mm)

    def mm_to_index(self, point_mm) -> np.ndarray:
        """Map (..., 3) patient positions in mm (z, y, x) to fractional voxel indices (z, y, x)."""
        p = np.asarray(point_mm, dtype=float) - np.asarray(self.origin_mm)
        return (p @ np.asarray(self.direction)) / np.asarray(self.spacing_mm)

    def axis_coords_mm(self, axis: int) -> np.ndarray:
        """Positions in mm of voxel centres along one index axis (identity direction only)."""
        return self.origin_mm[axis] + np.arange(self.shape[axis]) * self.spacing_mm[axis]

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "origin_mm": list(self.origin_mm),
            "direction": [list(r) for r in self.direction],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(
            tuple(d["shape"]),
            tuple(d["spacing_mm"]),
            tuple(d.get("origin_mm", (0.0, 0.0, 0.0))),
            tuple(tuple(r) for r in d.get("direction", np.eye(3).tolist())),
        )
