"""A case's structures on another grid (the model grid), for scoring doses on that grid."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dosegym.data.case import Case
from dosegym.data.grid import Grid


def model_grid_case(case: Case, grid: Grid, resample: Callable[[np.ndarray], np.ndarray]) -> Case:
    """``case``'s structures, body and prescriptions on ``grid``, for soft (differentiable)
    scoring of doses on that grid.

    ``resample`` maps a ``float32`` array on the case grid to ``grid`` (linear interpolation,
    ``(z, y, x)``), e.g. the diffusion ``Resampler``'s ``to_model(a, "linear")``. A structure
    is the voxels it covers at least half of (resampled occupancy >= 0.5), at least its
    best-covered voxel; a non-target structure entirely outside ``grid`` is left out (its
    items become unmatched). The body is the voxels it covers at least half of (none if empty).
    """
    targets = {rx.target for rx in case.prescriptions}
    structures: dict[str, np.ndarray] = {}
    for name, mask in case.structures.items():
        occ = resample(mask.astype(np.float32))
        if occ.max() <= 0 and name not in targets:
            continue
        m = occ >= 0.5
        if not m.any():
            m.flat[int(occ.argmax())] = True
        structures[name] = m
    body = None
    if case.body is not None:
        body = resample(case.body.astype(np.float32)) >= 0.5
        body = body if body.any() else None
    return Case(
        case_id=case.case_id,
        grid=grid,
        ct=None,
        structures=structures,
        prescriptions=list(case.prescriptions),
        beams=case.beams,
        dose=None,
        body=body,
        meta={**case.meta, "model_grid": True},
    )
