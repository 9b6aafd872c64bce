"""Reference doses with pyradplan (a matRad reimplementation); imported only when used.

Pipeline per case: CT (HU) and structures -> pyradplan ``CT`` / ``StructureSet``; photon
pencil-beam dose influence (generic machine, ``bixel_width_mm`` bixels, ``dose_grid_mm`` dose
grid) for the case's coplanar gantry angles around ``case.beams.isocenter_mm``; fluence
optimisation (scipy L-BFGS-B) with the objectives of :func:`plan_objectives`. pyradplan works
per fraction: objectives are given per fraction and the optimised dose is multiplied by the
number of fractions. The total dose is then zeroed outside the body and **normalised so that
the primary (highest) PTV's D95 equals its prescription** (standard plan normalisation; D95 is
the 5th percentile of the PTV voxel doses). VMAT cases are planned as static beams at the
arc's control-point angles.

Needs the ``physics`` extra (``pip install 'dosegym[physics]'``: pyradplan 0.5.0 with
``pydantic<2.14``). Set ``TQDM_DISABLE=1`` to silence pyradplan's progress bars.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from dosegym.data.case import Case
from dosegym.errors import DataError

#: Distance (mm) beyond the PTVs where the normal-tissue objective starts.
RING_MARGIN_MM = 10.0


@dataclass(frozen=True)
class ObjectiveSpec:
    """One optimisation objective on total dose: ``kind`` is ``"deviation"`` (to ``dose_gy``)
    or ``"overdose"`` (above ``dose_gy``); ``priority`` is pyradplan's weight."""

    structure: str
    kind: str
    dose_gy: float
    priority: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "kind": self.kind,
            "dose_gy": round(self.dose_gy, 3),
            "priority": self.priority,
        }


#: OAR name -> (maximum total dose as a fraction of the primary Rx, or an absolute Gy value
#: when > 1, priority) for the squared-overdosing objective.
OAR_LIMITS: dict[str, tuple[float, float]] = {
    "SpinalCord": (40.0, 300.0),
    "Brainstem": (45.0, 200.0),
    "Parotid_L": (20.0, 60.0),
    "Parotid_R": (20.0, 60.0),
    "Larynx": (35.0, 50.0),
    "Esophagus": (0.55, 50.0),
    "Mandible": (0.95, 50.0),
    "Rectum": (0.55, 120.0),
    "Bladder": (0.55, 60.0),
    "FemoralHead_L": (0.45, 60.0),
    "FemoralHead_R": (0.45, 60.0),
    "Lung_L": (0.25, 60.0),
    "Lung_R": (0.25, 60.0),
    "Heart": (0.35, 60.0),
}
DEFAULT_OAR_LIMIT = (0.6, 50.0)
#: (maximum total dose as a fraction of the primary Rx, priority) of the two normal-tissue
#: helper structures: the shell up to RING_MARGIN_MM around the PTVs and the body beyond it.
SHELL_LIMIT = (1.03, 100.0)
RING_LIMIT = (0.5, 100.0)


def plan_objectives(case: Case) -> list[ObjectiveSpec]:
    """The objectives used for ``case``: squared deviation to Rx on each PTV (primary 1000,
    others 600), squared overdosing on each OAR (:data:`OAR_LIMITS`), on the body within
    :data:`RING_MARGIN_MM` of the PTVs (``TargetShell``, 103 % of the primary Rx) and on the
    body beyond it (``NormalTissue``, 50 % of the primary Rx)."""
    if not case.prescriptions:
        raise DataError(f"{case.source}: prescriptions: a reference dose needs at least one")
    rxs = sorted(case.prescriptions, key=lambda p: -p.dose_gy)
    top = rxs[0].dose_gy
    objs = [
        ObjectiveSpec(p.target, "deviation", p.dose_gy, 1000.0 if i == 0 else 600.0)
        for i, p in enumerate(rxs)
    ]
    for name in case.oars:
        frac, prio = OAR_LIMITS.get(name, DEFAULT_OAR_LIMIT)
        limit = frac if frac > 1.0 else frac * top
        objs.append(ObjectiveSpec(name, "overdose", limit, prio))
    objs.append(ObjectiveSpec("TargetShell", "overdose", SHELL_LIMIT[0] * top, SHELL_LIMIT[1]))
    objs.append(ObjectiveSpec("NormalTissue", "overdose", RING_LIMIT[0] * top, RING_LIMIT[1]))
    return objs


def _sitk_image(case: Case, array: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)  # (z, y, x) array -> (x, y, z) image
    g = case.grid
    img.SetSpacing(tuple(reversed(g.spacing_mm)))
    img.SetOrigin(tuple(reversed(g.origin_mm)))
    d = np.asarray(g.direction)[::-1, ::-1]  # (z, y, x) components/axes -> (x, y, z)
    img.SetDirection(tuple(d.ravel()))
    return img


def reference_dose(
    case: Case, *, bixel_width_mm: float = 5.0, dose_grid_mm: float = 4.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Optimised, normalised total dose (Gy, ``float32``, ``case.grid``) and a JSON-friendly
    record of how it was made (engine, version, settings, objectives, timings)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import pyRadPlan
        from pyRadPlan import PhotonPlan, calc_dose_influence, fluence_optimization, generate_stf
        from pyRadPlan.cst import create_cst, create_voi
        from pyRadPlan.ct import create_ct
        from pyRadPlan.optimization.objectives import SquaredDeviation, SquaredOverdosing
    except ImportError as exc:
        raise DataError(
            "reference doses need pyradplan: pip install 'dosegym[physics]' "
            f"(pyradplan 0.5.0 with pydantic<2.14); import failed: {exc}"
        ) from exc
    if case.ct is None or case.body is None or case.beams is None:
        raise DataError(f"{case.source}: a reference dose needs ct, body and beams")
    t0 = time.perf_counter()
    rxs = sorted(case.prescriptions, key=lambda p: -p.dose_gy)
    fractions = rxs[0].fractions
    if any(p.fractions != fractions for p in rxs):
        raise DataError(f"{case.source}: prescriptions: all targets must share the fractions")
    objs = plan_objectives(case)

    targets = np.zeros(case.grid.shape, bool)
    for p in rxs:
        targets |= case.structures[p.target]
    ring_dist = ndimage.distance_transform_edt(~targets, sampling=case.grid.spacing_mm)
    masks = dict(case.structures)
    masks["TargetShell"] = case.body & ~targets & (ring_dist <= RING_MARGIN_MM)
    masks["NormalTissue"] = case.body & (ring_dist > RING_MARGIN_MM)

    ct = create_ct(cube_hu=_sitk_image(case, case.ct.astype(np.float32)))
    vois = []
    target_names = {p.target for p in rxs}
    for name, mask in masks.items():
        if not mask.any():
            continue
        voi_type = "TARGET" if name in target_names else "OAR"
        voi = create_voi(
            voi_type=voi_type,
            name=name,
            ct_image=ct,
            mask=_sitk_image(case, mask.astype(np.uint8)),
        )
        per_fx = []
        for o in objs:
            if o.structure != name:
                continue
            if o.kind == "deviation":
                per_fx.append(SquaredDeviation(d_ref=o.dose_gy / fractions, priority=o.priority))
            else:
                per_fx.append(SquaredOverdosing(d_max=o.dose_gy / fractions, priority=o.priority))
        voi.objectives = per_fx
        vois.append(voi)
    vois.append(
        create_voi(
            voi_type="EXTERNAL",
            name="Body",
            ct_image=ct,
            mask=_sitk_image(case, case.body.astype(np.uint8)),
        )
    )
    cst = create_cst(vois, ct=ct)

    pln = PhotonPlan(machine="Generic")
    pln.num_of_fractions = fractions
    pln.prescribed_dose = rxs[0].dose_gy
    iso_xyz = list(reversed(case.beams.isocenter_mm))
    gantry = [float(a) for a in case.beams.gantry_deg]
    pln.prop_stf = {
        "gantry_angles": gantry,
        "couch_angles": [0.0] * len(gantry),
        "bixel_width": float(bixel_width_mm),
        "iso_center": iso_xyz,
    }
    res = float(dose_grid_mm)
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": res, "y": res, "z": res}}}
    pln.prop_opt = {"solver": "scipy"}

    stf = generate_stf(ct, cst, pln)
    t1 = time.perf_counter()
    dij = calc_dose_influence(ct, cst, stf, pln)
    t2 = time.perf_counter()
    weights = fluence_optimization(ct, cst, stf, dij, pln)
    t3 = time.perf_counter()
    import SimpleITK as sitk

    per_fx_img = dij.compute_result_ct_grid(weights)["physical_dose"]
    dose = sitk.GetArrayFromImage(per_fx_img).astype(np.float64) * fractions
    if dose.shape != case.grid.shape:
        raise DataError(
            f"{case.source}: pyradplan returned a dose of shape {dose.shape}, "
            f"expected the CT grid {case.grid.shape}"
        )
    dose = np.where(case.body, np.clip(dose, 0.0, None), 0.0)
    primary = case.structures[rxs[0].target]
    d95 = float(np.percentile(dose[primary], 5.0))
    if not np.isfinite(d95) or d95 <= 0:
        raise DataError(f"{case.source}: optimised dose gives the primary PTV a D95 of {d95} Gy")
    factor = rxs[0].dose_gy / d95
    dose *= factor
    n_bixels = int(np.asarray(weights).size)
    info = {
        "engine": "pyradplan",
        "version": getattr(pyRadPlan, "__version__", "unknown"),
        "machine": "Generic (photons, pencil beam)",
        "bixel_width_mm": float(bixel_width_mm),
        "dose_grid_mm": res,
        "gantry_deg": gantry,
        "solver": "scipy",
        "n_bixels": n_bixels,
        "objectives": [o.to_dict() for o in objs],
        "ring_margin_mm": RING_MARGIN_MM,
        "normalisation": f"primary PTV {rxs[0].target} D95 = {rxs[0].dose_gy:g} Gy",
        "normalisation_factor": round(factor, 5),
        "time_s": {
            "setup": round(t1 - t0, 2),
            "dose_influence": round(t2 - t1, 2),
            "optimisation": round(t3 - t2, 2),
        },
    }
    return dose.astype(np.float32), info
