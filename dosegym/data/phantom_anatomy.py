"""Procedural phantom anatomy: CT, body, targets with prescriptions, organs at risk, beams.

Three sites (:data:`~dosegym.data.sites.SITES`: ``headneck``, ``prostate``, ``lung``) on a
``48 × 64 × 64`` grid (z, y, x) at 4 mm. Coordinates are DICOM LPS in mm, stored z-first,
with the grid centred on (0, 0, 0): ``+x`` is the patient's **left** (``Parotid_L`` has larger
x than ``Parotid_R``), ``+y`` is **posterior** (the spinal cord lies behind the vertebral
body), ``+z`` is **superior**. CT values are integer HU (air -1000, lung about -800, fat about
-100, soft tissue about 40, bone about 700) with mild Gaussian noise. Every random choice
comes from one ``numpy.random.Generator`` seeded by ``(seed, site, index)``, so a phantom is
a pure function of those three numbers. No dose here: see :mod:`dosegym.data.phantoms`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from dosegym.data.case import Beams, Case, Prescription, equispaced_gantry_deg
from dosegym.data.grid import Grid
from dosegym.data.sites import PHANTOM_FORMAT, SITES, PhantomId, check_site
from dosegym.errors import DataError

GRID_SHAPE: tuple[int, int, int] = (48, 64, 64)
SPACING_MM: tuple[float, float, float] = (4.0, 4.0, 4.0)
#: Version of the anatomy generator; bump when a seed would give other anatomy.
GENERATOR_VERSION = 1

HU_AIR = -1000.0
HU_LUNG = -800.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BONE = 700.0

_SITE_CODES = {site: i for i, site in enumerate(SITES)}


class _Canvas:
    """Coordinates (mm) of the voxel centres, broadcastable (z, 1, 1), (1, y, 1), (1, 1, x)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.z = grid.axis_coords_mm(0)[:, None, None]
        self.y = grid.axis_coords_mm(1)[None, :, None]
        self.x = grid.axis_coords_mm(2)[None, None, :]
        self.shape = grid.shape

    def ellipsoid(self, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
        cz, cy, cx = center
        rz, ry, rx = radii
        return ((self.z - cz) / rz) ** 2 + ((self.y - cy) / ry) ** 2 + ((self.x - cx) / rx) ** 2 <= 1.0

    def tube(
        self,
        z_range: tuple[float, float],
        cy: np.ndarray | float,
        cx: np.ndarray | float,
        ry: np.ndarray | float,
        rx: np.ndarray | float | None = None,
    ) -> np.ndarray:
        """An elliptic tube along z; centre and radii may vary with z (arrays of shape (nz,))."""

        def col(v):
            return np.broadcast_to(np.asarray(v, dtype=float), (self.shape[0],))[:, None, None]

        rx = ry if rx is None else rx
        inside = ((self.y - col(cy)) / col(ry)) ** 2 + ((self.x - col(cx)) / col(rx)) ** 2 <= 1.0
        return inside & (self.z >= z_range[0]) & (self.z <= z_range[1])

    def zcol(self) -> np.ndarray:
        return self.z[:, 0, 0]

    def dilate(self, mask: np.ndarray, margin_mm: float) -> np.ndarray:
        """Isotropic dilation by ``margin_mm`` (Euclidean distance on the voxel grid)."""
        if margin_mm <= 0:
            return mask.copy()
        dist = ndimage.distance_transform_edt(~mask, sampling=self.grid.spacing_mm)
        return dist <= margin_mm

    def erode(self, mask: np.ndarray, margin_mm: float) -> np.ndarray:
        dist = ndimage.distance_transform_edt(mask, sampling=self.grid.spacing_mm)
        return dist > margin_mm


def _phantom_grid() -> Grid:
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(GRID_SHAPE, SPACING_MM))
    return Grid(GRID_SHAPE, SPACING_MM, origin)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox)
    return field / (field.std() + 1e-12)


def _body_outline(
    cv: _Canvas,
    rng: np.random.Generator,
    cy: np.ndarray,
    rx: np.ndarray,
    ry_ant: np.ndarray,
    ry_post: np.ndarray,
) -> np.ndarray:
    """Body as an elliptic cylinder with separate anterior/posterior semi-axes per slice,
    kept at least 2 voxels inside the grid's y and x borders."""
    wobble = 1.0 + np.clip(0.025 * _smooth_noise(rng, (cv.shape[0],), 3.0), -0.05, 0.05)
    limit_y = (cv.grid.extent_mm[1] / 2.0) - 2.5 * cv.grid.spacing_mm[1]
    limit_x = (cv.grid.extent_mm[2] / 2.0) - 2.5 * cv.grid.spacing_mm[2]
    ry_ant = np.minimum(ry_ant * wobble, limit_y + cy)
    ry_post = np.minimum(ry_post * wobble, limit_y - cy)
    rx = np.minimum(rx * wobble, limit_x)
    ry = np.where(cv.y - cy[:, None, None] < 0, ry_ant[:, None, None], ry_post[:, None, None])
    return ((cv.y - cy[:, None, None]) / ry) ** 2 + (cv.x / rx[:, None, None]) ** 2 <= 1.0


def _finish_ct(
    cv: _Canvas, rng: np.random.Generator, body: np.ndarray, ct: np.ndarray, noise_hu: float
) -> np.ndarray:
    """Add mild noise inside the body and set air outside; integer HU as float32."""
    ct = ct + noise_hu * rng.standard_normal(cv.shape)
    ct = np.where(body, ct, HU_AIR + 5.0 * rng.standard_normal(cv.shape))
    return np.clip(np.round(ct), -1024, 3000).astype(np.float32)


def _spine(
    cv: _Canvas, z_top: float, body_y: float, canal_y: float, vb_r: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bone, canal, cord) of a vertebral column from the bottom of the grid to ``z_top``."""
    zr = (-1e9, z_top)
    vbody = cv.tube(zr, body_y, 0.0, vb_r[0], vb_r[1])
    canal = cv.tube(zr, canal_y, 0.0, 7.5)
    arch = cv.tube(zr, canal_y, 0.0, 13.0) & ~canal & (cv.y > body_y)
    spinous = cv.tube(zr, canal_y + 14.0, 0.0, 9.0, 4.0)
    cord = cv.tube(zr, canal_y, 0.0, 5.0)
    bone = (vbody | arch | spinous) & ~canal
    return bone, canal, cord


def _headneck(cv: _Canvas, rng: np.random.Generator) -> dict[str, Any]:
    u = rng.uniform
    s = u(0.92, 1.08)
    z = cv.zcol()
    z_head = u(18.0, 30.0)  # skull base level
    z_sh = u(-75.0, -62.0)  # top of the shoulders
    # body outline: neck, widening into head above z_head, shoulders below z_sh
    t_head = np.clip((z - (z_head - 20.0)) / 30.0, 0.0, 1.0)
    t_sh = np.clip((z_sh - z) / 18.0, 0.0, 1.0)
    rx = (58 + 14 * t_head + 48 * t_sh) * s
    ry_ant = (52 + 40 * t_head + 10 * t_sh) * s
    ry_post = (58 + 22 * t_head + 14 * t_sh) * s
    cy = (6 - 12 * t_head) * s
    body = _body_outline(cv, rng, cy, np.minimum(rx, 118.0), ry_ant, ry_post)
    fat = body & ~cv.erode(body, u(5.0, 10.0))

    bone, canal, cord = _spine(cv, z_head + 10.0, 14.0 * s, 33.0 * s, (11.0 * s, 13.0 * s))
    cord &= cv.z <= z_head + 8.0
    brainstem = cv.ellipsoid((z_head + 30.0, 22.0 * s, 0.0), (20.0, 12.0, 13.0))
    # cranium shell and a bony skull base plate
    inner = cv.erode(body, 6.0)
    skull = (cv.z > z_head + 8.0) & body & ~cv.erode(body, 12.0) & inner
    skull |= (np.abs(cv.z - (z_head + 10.0)) <= 4.0) & cv.erode(body, 20.0) & (cv.y > -20.0 * s)
    skull &= ~cv.dilate(brainstem, 4.0)
    # mandible: horseshoe ring, body low and anterior, rami up and posterior
    ring = cv.tube((z_head - 38.0, z_head + 2.0), -8.0 * s, 0.0, 50.0 * s, 44.0 * s)
    ring &= ~cv.tube((-1e9, 1e9), -8.0 * s, 0.0, 43.0 * s, 37.0 * s)
    mandible = ring & (cv.y < 14.0 * s) & ((cv.z < z_head - 22.0) | (cv.y > -22.0 * s)) & body

    # airway: pharynx -> larynx -> trachea, moving anteriorly going down
    z_lar = z_head - u(62.0, 72.0)
    ay = np.interp(z, [z_lar - 10.0, z_lar + 25.0], [-30.0 * s, -8.0 * s])
    airway = cv.tube((-1e9, z_head + 10.0), ay, 0.0, 8.0, 9.0)
    larynx = cv.ellipsoid((z_lar, -30.0 * s, 0.0), (20.0, 17.0 * s, 19.0 * s)) & body
    cartilage = cv.tube((-1e9, z_lar), -30.0 * s, 0.0, 12.0) & ~airway
    esophagus = cv.tube((-1e9, z_lar - 12.0), -10.0 * s, 3.0, 6.5)
    parotid = {}
    zp = z_head + u(-2.0, 8.0)
    for name, side in (("Parotid_L", 1.0), ("Parotid_R", -1.0)):
        c = (zp + u(-3, 3), u(6.0, 14.0) * s, side * u(44.0, 50.0) * s)
        parotid[name] = cv.ellipsoid(c, (u(17, 22), u(14, 18) * s, u(9, 12) * s)) & ~mandible & body

    # targets: oropharynx primary, ipsilateral high-risk nodes, bilateral elective neck
    side = rng.choice([-1.0, 1.0])
    body_in = cv.erode(body, 4.0)
    c70 = (z_head - u(20.0, 38.0), u(-14.0, -2.0) * s, side * u(6.0, 16.0))
    ptv70 = cv.ellipsoid(c70, (u(20, 28), u(15, 21) * s, u(16, 22) * s)) & body_in
    nodes_ipsi = cv.ellipsoid(
        (c70[0] - u(20, 30), u(-2, 6) * s, side * u(34, 40) * s), (u(26, 34), 15.0 * s, 13.0 * s)
    )
    neck = np.zeros(cv.shape, bool)
    for sd in (-1.0, 1.0):
        neck |= cv.ellipsoid(
            (z_head - u(50, 60), u(-2, 6) * s, sd * u(34, 40) * s), (u(38, 46), 15.0 * s, 13.0 * s)
        )
    airway &= ~cv.erode(ptv70, 5.0)  # the tumour fills part of the lumen
    three_levels = bool(rng.random() < 0.6)
    ptvs: dict[str, np.ndarray] = {"PTV70": ptv70}
    if three_levels:
        ptv63 = (cv.dilate(ptv70, 8.0) | nodes_ipsi) & body_in & ~ptv70
        ptv56 = (neck & body_in) & ~(ptv70 | ptv63)
        ptvs.update(PTV63=ptv63, PTV56=ptv56)
        rx = [("PTV70", 70.0), ("PTV63", 63.0), ("PTV56", 56.0)]
    else:
        ptv56 = ((neck | nodes_ipsi | cv.dilate(ptv70, 8.0)) & body_in) & ~ptv70
        ptvs["PTV56"] = ptv56
        rx = [("PTV70", 70.0), ("PTV56", 56.0)]

    ct = np.full(cv.shape, HU_SOFT, np.float32)
    ct[fat] = HU_FAT
    ct[parotid["Parotid_L"] | parotid["Parotid_R"]] = -10.0
    ct[(cv.z > z_head + 8.0) & inner] = 35.0  # brain
    ct[cartilage | (larynx & ~airway & ~cv.erode(larynx, 4.0))] = 180.0
    ct[bone | skull | mandible] = HU_BONE
    ct[airway & body] = HU_AIR
    nasal = cv.ellipsoid((z_head + 22.0, -62.0 * s, 0.0), (16.0, 18.0, 12.0)) & body
    ct[nasal] = HU_AIR
    ct[(cord | canal) & ~bone] = 30.0

    oars = {
        "SpinalCord": cord,
        "Brainstem": brainstem & body,
        "Parotid_L": parotid["Parotid_L"],
        "Parotid_R": parotid["Parotid_R"],
        "Larynx": larynx,
        "Esophagus": esophagus & body,
        "Mandible": mandible,
    }
    gantry = _beam_arrangement(rng, 9, side)
    return dict(
        body=body,
        ct=ct,
        ptvs=ptvs,
        rx=rx,
        fractions=35,
        oars=oars,
        gantry=gantry,
    )


def _prostate(cv: _Canvas, rng: np.random.Generator) -> dict[str, Any]:
    u = rng.uniform
    s = u(0.92, 1.06)
    z = cv.zcol()
    nz = cv.shape[0]
    rx = np.full(nz, min(110.0 * s, 118.0)) * (1 + 0.04 * np.clip((z + 20) / 80, -1, 1))
    body = _body_outline(cv, rng, np.zeros(nz), rx, np.full(nz, 80.0 * s), np.full(nz, 84.0 * s))
    fat_mm = u(10.0, 24.0)
    fat = body & ~cv.erode(body, fat_mm)

    zp, yp = u(-30.0, -14.0), u(0.0, 8.0) * s
    pr = (u(16, 22), u(14, 19), u(19, 25))
    prostate = cv.ellipsoid((zp, yp, u(-2, 2)), pr)
    sv = np.zeros(cv.shape, bool)
    for sd in (-1.0, 1.0):
        sv |= cv.ellipsoid((zp + pr[0] + 6.0, yp + pr[1] * 0.6, sd * 14.0), (9.0, 7.0, 14.0))
    # rectum posterior to the prostate, narrower anal canal below
    yr = yp + pr[1] + u(10.0, 14.0)
    rr = np.where(z < zp - 30.0, 9.0, u(13.0, 16.0))
    rectum = cv.tube((zp - 48.0, zp + 55.0), yr + 0.15 * np.clip(z - zp, 0, None), 0.0, rr) & body
    rectum &= ~prostate
    gas = cv.ellipsoid((zp + u(0, 30), yr, 0.0), (12.0, 6.0, 7.0)) & rectum
    has_gas = bool(rng.random() < 0.4)
    bl = (u(25, 38), u(26, 38), u(34, 48))
    bladder = cv.ellipsoid((zp + pr[0] + bl[0] * 0.75, yp - u(18, 26), 0.0), bl) & body
    bladder &= ~(prostate | sv | rectum)

    fem = {}
    bone = np.zeros(cv.shape, bool)
    fr = 21.0 * s
    for name, sd in (("FemoralHead_L", 1.0), ("FemoralHead_R", -1.0)):
        c = (zp + u(-2, 6), u(-6, 2) * s, sd * u(66, 72) * s)
        fem[name] = cv.ellipsoid(c, (fr, fr, fr))
        neck = np.zeros(cv.shape, bool)
        for t in np.linspace(0.0, 1.0, 9):  # femoral neck and shaft, lateral and inferior
            neck |= cv.ellipsoid((c[0] - 45.0 * t, c[1], c[2] + sd * 24.0 * t), (12.0, 13.0, 12.0))
        acetab = cv.ellipsoid(c, (fr + 8, fr + 8, fr + 8)) & ~cv.ellipsoid(c, (fr + 2,) * 3)
        acetab &= sd * (cv.x - c[2]) < 4.0
        ischium = cv.ellipsoid((c[0] - 22.0, 28.0 * s, sd * 50.0 * s), (20.0, 12.0, 9.0))
        ilium = cv.ellipsoid((c[0] + 58.0, 14.0 * s, sd * 72.0 * s), (45.0, 40.0, 9.0))
        bone |= fem[name] | neck | acetab | ischium | ilium
        fem[name] &= body
    pubis = cv.ellipsoid((zp - 6.0, yp - pr[1] - u(28, 36), 0.0), (16.0, 9.0, 26.0))
    sacrum = cv.tube((zp + 35.0, 1e9), np.interp(z, [zp + 35, zp + 120], [64, 48]) * s, 0.0, 15.0, 40.0)
    bone = (bone | pubis | sacrum) & body

    regime = rng.choice(["70/28", "60/20"])
    high, low, fx = (70.0, 56.0, 28) if regime == "70/28" else (60.0, 48.0, 20)
    body_in = cv.erode(body, 5.0)
    ptv_hi = cv.ellipsoid((zp, yp - 0.5, 0.0), (pr[0] + 7, pr[1] + 6, pr[2] + 7)) & body_in
    ptvs = {f"PTV{high:g}": ptv_hi}
    rx = [(f"PTV{high:g}", high)]
    if rng.random() < 0.5:
        ptvs[f"PTV{low:g}"] = cv.dilate(sv, 8.0) & body_in & ~ptv_hi
        rx.append((f"PTV{low:g}", low))

    ct = np.full(cv.shape, HU_SOFT, np.float32)
    ct[fat] = HU_FAT
    inner_fat = cv.ellipsoid((zp, yp, 0.0), (70.0, 45.0, 45.0)) & ~(prostate | rectum | bladder)
    ct[inner_fat & body] = -80.0  # pelvic fat around the organs
    ct[prostate | sv] = 35.0
    ct[rectum] = 25.0
    ct[bladder] = 8.0
    ct[bone] = HU_BONE
    if has_gas:
        ct[gas] = HU_AIR
    oars = {
        "Rectum": rectum,
        "Bladder": bladder,
        "FemoralHead_L": fem["FemoralHead_L"],
        "FemoralHead_R": fem["FemoralHead_R"],
    }
    gantry = _beam_arrangement(rng, 7, 1.0)
    return dict(
        body=body,
        ct=ct,
        ptvs=ptvs,
        rx=rx,
        fractions=fx,
        oars=oars,
        gantry=gantry,
    )


def _lung(cv: _Canvas, rng: np.random.Generator) -> dict[str, Any]:
    u = rng.uniform
    s = u(0.92, 1.05)
    z = cv.zcol()
    nz = cv.shape[0]
    rx = np.full(nz, min(116.0 * s, 120.0)) * (1 - 0.06 * np.clip((z - 40) / 60, 0, 1))
    body = _body_outline(cv, rng, np.zeros(nz), rx, np.full(nz, 82.0 * s), np.full(nz, 92.0 * s))
    fat = body & ~cv.erode(body, u(7.0, 14.0))
    wall = cv.erode(body, u(16.0, 22.0))  # inside the chest wall

    heart = cv.ellipsoid((u(-45, -30), u(-30, -18) * s, u(10, 20) * s), (45.0, 42 * s, 52 * s))
    heart &= body
    bone, canal, cord = _spine(cv, 1e9, 38.0 * s, 57.0 * s, (14.0 * s, 17.0 * s))
    lungs = {}
    for name, sd in (("Lung_L", 1.0), ("Lung_R", -1.0)):
        cx = sd * 56.0 * s
        dome = -62.0 + (0.0 if sd > 0 else 10.0) + 28.0 * (1 - ((cv.x - cx) / 55.0) ** 2 - (cv.y / 75.0) ** 2)
        lung = cv.ellipsoid((10.0, 6.0 * s, cx), (100.0, 70.0 * s, 46.0 * s)) & wall
        lung &= cv.z > dome
        lung &= ~cv.dilate(heart, 4.0)
        lung &= ~((np.abs(cv.x) < 26.0) & (cv.y > 8.0 * s))  # posterior mediastinum, spine
        lung &= sd * cv.x > 12.0
        lungs[name] = lung
    # ribs (axial slabs), sternum
    ribs = body & ~cv.erode(body, 24.0) & cv.erode(body, 14.0) & ((z[:, None, None] % 24.0) < 9.0)
    ribs &= (cv.y > -60.0 * s) & (np.abs(cv.x) > 28.0)
    sternum = (np.abs(cv.x) < 16.0) & body & ~cv.erode(body, 24.0) & cv.erode(body, 10.0)
    sternum &= (cv.y < 0) & (cv.z > -55.0)
    bone = (bone | ribs | sternum) & body
    trachea = cv.tube((8.0, 1e9), -4.0 * s, 0.0, 9.0)
    for sd in (-1.0, 1.0):
        bx = np.interp(z, [-20.0, 10.0], [sd * 32.0, 0.0])
        trachea |= cv.tube((-20.0, 10.0), -4.0 * s, bx, 6.0)
    esophagus = cv.tube((-70.0, 1e9), 14.0 * s, 4.0, 7.0) & body

    side = rng.choice([-1.0, 1.0])
    lname = "Lung_L" if side > 0 else "Lung_R"
    r_gtv = u(12.0, 24.0)
    candidates = np.argwhere(cv.erode(lungs[lname], 0.6 * r_gtv))
    if len(candidates) == 0:
        candidates = np.argwhere(lungs[lname])
    centre_idx = candidates[rng.integers(len(candidates))]
    c = cv.grid.index_to_mm(centre_idx)
    gtv = cv.ellipsoid(c, (r_gtv * u(0.8, 1.2), r_gtv * u(0.8, 1.1), r_gtv * u(0.8, 1.1)))
    for _ in range(int(rng.integers(1, 3))):  # lobulated
        off = rng.normal(0.0, r_gtv * 0.45, 3)
        gtv |= cv.ellipsoid(c + off, (r_gtv * 0.6,) * 3)
    gtv &= cv.erode(body, 20.0)
    body_in = cv.erode(body, 4.0)
    ptv = cv.dilate(gtv, u(7.0, 10.0)) & body_in
    for name in lungs:
        lungs[name] &= ~gtv

    ct = np.full(cv.shape, HU_SOFT, np.float32)
    ct[fat] = HU_FAT
    lung_all = lungs["Lung_L"] | lungs["Lung_R"]
    ct[lung_all] = HU_LUNG + 40.0 * _smooth_noise(rng, cv.shape, 1.5)[lung_all]
    ct[heart] = 45.0
    ct[gtv] = 35.0
    ct[bone] = HU_BONE
    ct[trachea & body] = HU_AIR
    oars = {
        "Lung_L": lungs["Lung_L"],
        "Lung_R": lungs["Lung_R"],
        "Heart": heart,
        "Esophagus": esophagus,
        "SpinalCord": cord & body,
    }
    gantry = _beam_arrangement(rng, 7, side)
    return dict(
        body=body,
        ct=ct,
        ptvs={"PTV60": ptv},
        rx=[("PTV60", 60.0)],
        fractions=30,
        oars=oars,
        gantry=gantry,
    )


def _beam_arrangement(rng: np.random.Generator, n_imrt: int, side: float) -> tuple[str, tuple]:
    """7-9 equispaced coplanar IMRT beams (random start), or, one case in six, a VMAT arc
    sampled by 12 control-point gantry angles."""
    if rng.random() < 1.0 / 6.0:
        return "VMAT", equispaced_gantry_deg(12, float(rng.uniform(0.0, 30.0)))
    n = int(np.clip(n_imrt + rng.integers(-1, 2), 7, 9))
    start = float(rng.choice([0.0, 180.0 / n])) if side > 0 else 0.0
    return "IMRT", equispaced_gantry_deg(n, start)


_SITE_BUILDERS: dict[str, Callable[[_Canvas, np.random.Generator], dict[str, Any]]] = {
    "headneck": _headneck,
    "prostate": _prostate,
    "lung": _lung,
}


def phantom_rng(site: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of phantom ``index`` of ``site`` for ``seed`` (independent streams)."""
    check_site(site)
    return np.random.default_rng([int(seed), _SITE_CODES[site], int(index), GENERATOR_VERSION])


def generate_anatomy(
    site: str, rng: np.random.Generator | None = None, *, index: int = 0, seed: int = 0
) -> Case:
    """Build one phantom (CT, body, PTVs with prescriptions, OARs, beams; no dose).

    ``rng`` defaults to :func:`phantom_rng` ``(site, index, seed)``. Returns a validated
    :class:`Case` with ``meta`` holding ``site``, ``seed``, ``index`` and ``generator_version``.
    The isocenter is the centroid of the union of the PTVs.
    """
    check_site(site)
    rng = phantom_rng(site, index, seed) if rng is None else rng
    grid = _phantom_grid()
    cv = _Canvas(grid)
    parts = _SITE_BUILDERS[site](cv, rng)
    body = parts["body"]
    ct = _finish_ct(cv, rng, body, parts["ct"], noise_hu=float(rng.uniform(8.0, 14.0)))
    structures: dict[str, np.ndarray] = {}
    for name, mask in parts["ptvs"].items():
        structures[name] = mask & body
    for name, mask in parts["oars"].items():
        structures[name] = mask & body
    empty = [n for n, m in structures.items() if not m.any()]
    if empty:
        raise DataError(
            f"phantom {site}/{index} (seed {seed}): generated empty structures {empty}; "
            "this is a generator bug, please report the site, index and seed"
        )
    fractions = int(parts["fractions"])
    prescriptions = [Prescription(t, d, fractions) for t, d in parts["rx"]]
    target_union = np.zeros(grid.shape, bool)
    for name in parts["ptvs"]:
        target_union |= structures[name]
    iso = tuple(float(v) for v in grid.index_to_mm(np.argwhere(target_union).mean(axis=0)))
    technique, gantry = parts["gantry"]
    case_id = PhantomId(site, int(index)).case_id
    meta = {
        "source": f"phantom {case_id} (seed {seed})",
        "format": PHANTOM_FORMAT,
        "site": site,
        "seed": int(seed),
        "index": int(index),
        "generator_version": GENERATOR_VERSION,
        "dose_engine": None,
    }
    return Case(
        case_id=case_id,
        grid=grid,
        ct=ct,
        structures=structures,
        prescriptions=prescriptions,
        beams=Beams(iso, gantry, technique),
        dose=None,
        body=body,
        meta=meta,
    )
