"""Procedural phantoms: anatomy, targets, organs at risk, beams and a reference dose.

Three sites (``headneck``, ``prostate``, ``lung``) on a ``48 × 64 × 64`` grid (z, y, x) at
4 mm. Coordinates are DICOM LPS in mm, stored z-first, with the grid centred on (0, 0, 0):
``+x`` is the patient's **left** (``Parotid_L`` has larger x than ``Parotid_R``), ``+y`` is
**posterior** (the spinal cord lies behind the vertebral body), ``+z`` is **superior**.
CT values are integer HU (air -1000, lung about -800, fat about -100, soft tissue about 40,
bone about 700) with mild Gaussian noise. Every random choice comes from one
``numpy.random.Generator`` seeded by ``(seed, site, index)``, so a phantom is a pure function
of those three numbers.

Reference doses come from pyradplan (``dose="pyradplan"``, the ``physics`` extra, see
:mod:`dosegym.data._physics`); the package ships a pre-computed set (``phantoms:SITE/N``,
:func:`load_shipped_phantom`) that reads with numpy alone.

File format (``.npz``, plain arrays, no pickle; :func:`write_phantom` / :func:`read_phantom`):
``dosegym_phantom`` (format version), ``case_id``, ``grid_shape``, ``spacing_mm``,
``origin_mm``, ``direction``, ``ct_hu`` (int16), ``body_packed`` and ``masks_packed``
(``np.packbits`` of the flattened boolean masks), ``structure_names``, ``rx_target``,
``rx_dose_gy``, ``rx_fractions``, beam arrays (``beam_*``), ``dose_u16`` with
``dose_step_gy`` (dose = ``dose_u16 * dose_step_gy``, the step a power of two so that a
decoded dose re-encodes identically; error at most half a step, < 0.001 Gy up to 128 Gy),
optional ``occupancy_u8`` (occupancy = value / 255) and ``meta_json``.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import itertools
import json
import math
import re
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dosegym.data.atomic import atomic_folder, atomic_path, json_text
from dosegym.data.case import Beams, Case, Prescription, equispaced_gantry_deg
from dosegym.data.grid import Grid
from dosegym.errors import DataError

SITES: tuple[str, ...] = ("headneck", "prostate", "lung")
GRID_SHAPE: tuple[int, int, int] = (48, 64, 64)
SPACING_MM: tuple[float, float, float] = (4.0, 4.0, 4.0)
FORMAT_VERSION = 1
#: Version of the anatomy generator; bump when a seed would give other anatomy.
GENERATOR_VERSION = 1
DOSE_MODES = ("auto", "pyradplan", "shipped", "none")
SET_WRITER = "dosegym phantom set"  # the writer name in the output marker (see dosegym.data.atomic)

HU_AIR = -1000.0
HU_LUNG = -800.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BONE = 700.0

_SITE_CODES = {site: i for i, site in enumerate(SITES)}
_SHIPPED_ID = re.compile(r"^phantoms:(?P<site>[a-z]+)(?:/(?P<index>\d+))?$")


# --------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------
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
    _check_site(site)
    return np.random.default_rng([int(seed), _SITE_CODES[site], int(index), GENERATOR_VERSION])


def _check_site(site: str) -> None:
    if site not in _SITE_BUILDERS:
        raise DataError(f"phantom site {site!r} is unknown; valid sites: {list(SITES)}")


def generate_anatomy(
    site: str, rng: np.random.Generator | None = None, *, index: int = 0, seed: int = 0
) -> Case:
    """Build one phantom (CT, body, PTVs with prescriptions, OARs, beams; no dose).

    ``rng`` defaults to :func:`phantom_rng` ``(site, index, seed)``. Returns a validated
    :class:`Case` with ``meta`` holding ``site``, ``seed``, ``index`` and ``generator_version``.
    The isocenter is the centroid of the union of the PTVs.
    """
    _check_site(site)
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
    case_id = f"{site}_{index:03d}"
    meta = {
        "source": f"phantom {case_id} (seed {seed})",
        "format": "phantom",
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


# --------------------------------------------------------------------------------------
# Dose bookkeeping
# --------------------------------------------------------------------------------------
def d95_gy(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """D95: the dose (Gy) received by at least 95 % of ``mask``, i.e. the 5th percentile of
    its voxel doses (linear interpolation between voxels, numpy's default)."""
    return float(np.percentile(dose_gy[mask], 5.0))


def plan_quality(case: Case) -> dict[str, Any]:
    """Plan metrics of ``case.dose``: per prescription D95 (Gy), V95% (% of the target
    receiving >= 95 % of its Rx), mean and max (Gy); global max (Gy, and % of the highest Rx);
    OAR mean and max doses (Gy)."""
    if case.dose is None:
        raise DataError(f"{case.source}: dose: plan_quality needs a dose, the case has none")
    dose = case.dose
    out: dict[str, Any] = {"targets": {}, "oars": {}}
    for rx in case.prescriptions:
        m = case.structures[rx.target]
        out["targets"][rx.target] = {
            "rx_gy": rx.dose_gy,
            "d95_gy": round(d95_gy(dose, m), 3),
            "v95_pct": round(float((dose[m] >= 0.95 * rx.dose_gy).mean() * 100.0), 2),
            "mean_gy": round(float(dose[m].mean()), 3),
            "max_gy": round(float(dose[m].max()), 3),
        }
    for name in case.oars:
        m = case.structures[name]
        out["oars"][name] = {
            "mean_gy": round(float(dose[m].mean()), 3),
            "max_gy": round(float(dose[m].max()), 3),
        }
    top = case.max_prescription_gy or 1.0
    out["max_gy"] = round(float(dose.max()), 3)
    out["max_pct_rx"] = round(float(dose.max()) / top * 100.0, 2)
    return out


def _dose_step_gy(max_gy: float) -> float:
    """The smallest power-of-two step (Gy) with ``max_gy`` <= 65535 steps."""
    return float(2.0 ** math.ceil(math.log2(max(max_gy, 1e-6) / 65535.0)))


def quantize_dose(dose_gy: np.ndarray) -> np.ndarray:
    """``dose_gy`` rounded to the lattice the file format stores (float32, exact round trip)."""
    step = _dose_step_gy(float(np.max(dose_gy)))
    return (np.round(np.asarray(dose_gy, dtype=np.float64) / step) * step).astype(np.float32)


# --------------------------------------------------------------------------------------
# File format
# --------------------------------------------------------------------------------------
def _pack(masks: list[np.ndarray]) -> np.ndarray:
    if not masks:
        return np.zeros(0, np.uint8)
    return np.packbits(np.stack(masks).reshape(-1))


def write_phantom(case: Case, path: str | Path) -> Path:
    """Write ``case`` as a dosegym phantom ``.npz`` (compressed, no pickle), atomically.

    CT is stored as int16 HU (values rounded to whole HU, clipped to the int16 range), masks
    bit-packed, dose as uint16 on a power-of-two step (see module docstring). Returns the path.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"{path}: a phantom file must end in .npz")
    g = case.grid
    names = list(case.structures)
    arrays: dict[str, np.ndarray] = {
        "dosegym_phantom": np.array(FORMAT_VERSION, np.int32),
        "case_id": np.array(case.case_id),
        "grid_shape": np.array(g.shape, np.int32),
        "spacing_mm": np.array(g.spacing_mm, np.float64),
        "origin_mm": np.array(g.origin_mm, np.float64),
        "direction": np.array(g.direction, np.float64),
        "structure_names": np.array(names, dtype=str),
        "masks_packed": _pack([case.structures[n] for n in names]),
        "rx_target": np.array([p.target for p in case.prescriptions], dtype=str),
        "rx_dose_gy": np.array([p.dose_gy for p in case.prescriptions], np.float64),
        "rx_fractions": np.array([p.fractions for p in case.prescriptions], np.int32),
        "meta_json": np.array(json_text(case.meta, indent=None, default=str, sort_keys=True)),
    }
    if case.ct is not None:
        arrays["ct_hu"] = np.clip(np.round(case.ct), -32768, 32767).astype(np.int16)
    if case.body is not None:
        arrays["body_packed"] = _pack([case.body])
    if case.dose is not None:
        step = _dose_step_gy(float(case.dose.max()))
        arrays["dose_u16"] = np.round(case.dose.astype(np.float64) / step).astype(np.uint16)
        arrays["dose_step_gy"] = np.array(step, np.float64)
    if case.occupancy:
        onames = list(case.occupancy)
        arrays["occupancy_names"] = np.array(onames, dtype=str)
        arrays["occupancy_u8"] = np.stack(
            [np.round(case.occupancy[n] * 255.0).astype(np.uint8) for n in onames]
        )
    if case.beams is not None:
        b = case.beams
        arrays["beam_isocenter_mm"] = np.array(b.isocenter_mm, np.float64)
        arrays["beam_gantry_deg"] = np.array(b.gantry_deg, np.float64)
        arrays["beam_technique"] = np.array(b.technique)
        if b.couch_deg is not None:
            arrays["beam_couch_deg"] = np.array(b.couch_deg, np.float64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


#: The largest phantom grid read (voxels); a header claiming more is refused before allocating.
MAX_PHANTOM_VOXELS = 256**3
_VOLUME_KEYS = ("ct_hu", "dose_u16", "occupancy_u8", "masks_packed", "body_packed")
_SMALL_BYTES = 1 << 20


def _declared(z: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of member ``key`` from its npy header, without reading its data."""
    with z.zip.open(f"{key}.npy") as fh:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(shape), dtype


def _check_declared_sizes(z: Any, path: Path) -> None:
    """Every member but the volumes declares at most ``_SMALL_BYTES`` (checked from headers)."""
    for key in z.files:
        if key in _VOLUME_KEYS:
            continue
        shape, dtype = _declared(z, key)
        if math.prod(shape) * dtype.itemsize > _SMALL_BYTES:
            raise DataError(f"{path}: array {key!r} claims shape {shape} of {dtype}; it should be small")


def _check_volume_sizes(z: Any, path: Path, grid: Grid, n_structures: int) -> None:
    """The volumes' declared shapes fit ``grid`` (checked from headers, before any is read)."""
    n_vox = grid.size
    expected = {
        "ct_hu": [grid.shape],
        "dose_u16": [grid.shape],
        "masks_packed": [((n_vox * n_structures + 7) // 8,)],
        "body_packed": [((n_vox + 7) // 8,)],
        "occupancy_u8": [(k, *grid.shape) for k in range(n_structures + 1)],
    }
    for key, valid in expected.items():
        if key in z.files:
            shape, _ = _declared(z, key)
            if shape not in valid:
                need = valid[0] if len(valid) == 1 else f"(k, *{grid.shape}) with k <= {n_structures}"
                raise DataError(
                    f"{path}: array {key!r} claims shape {shape}; the grid {grid.shape} (z, y, x) with "
                    f"{n_structures} structures needs {need}"
                )


def _require(z: Any, key: str, path: Any) -> np.ndarray:
    if key not in z.files:
        raise DataError(f"{path}: phantom file lacks the array {key!r}; is it a dosegym phantom?")
    return z[key]


def read_phantom(path: str | Path) -> Case:
    """Read a phantom ``.npz`` (see module docstring) or a shipped id ``phantoms:SITE/N``
    (``phantoms:SITE`` means index 0) into a validated :class:`Case`."""
    text = str(path)
    match = _SHIPPED_ID.match(text)
    if text.startswith("phantoms:"):
        if not match:
            raise DataError(
                f"{text!r}: a shipped phantom id is 'phantoms:SITE/N' with SITE one of "
                f"{list(SITES)} and N an index, e.g. 'phantoms:headneck/0'"
            )
        return load_shipped_phantom(match["site"], int(match["index"] or 0))
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{p}: no such phantom file") from exc
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable npz
        raise DataError(f"{p}: not a readable .npz file ({exc})") from exc
    try:
        with z:
            _check_declared_sizes(z, p)
            version = int(_require(z, "dosegym_phantom", p))
            if version > FORMAT_VERSION:
                raise DataError(
                    f"{p}: phantom format version {version} is newer than this dosegym reads "
                    f"({FORMAT_VERSION}); upgrade dosegym"
                )
            grid = Grid(
                tuple(int(v) for v in _require(z, "grid_shape", p)),
                tuple(_require(z, "spacing_mm", p)),
                tuple(_require(z, "origin_mm", p)),
                tuple(map(tuple, _require(z, "direction", p))),
            )
            n_vox = grid.size
            if n_vox > MAX_PHANTOM_VOXELS:
                raise DataError(
                    f"grid_shape {grid.shape} has {n_vox} voxels; a phantom has at most {MAX_PHANTOM_VOXELS}"
                )
            names = [str(n) for n in _require(z, "structure_names", p)]
            _check_volume_sizes(z, p, grid, len(names))
            packed = _require(z, "masks_packed", p)
            if packed.size * 8 < n_vox * len(names):
                raise DataError(f"{p}: masks_packed holds too few bits for {len(names)} masks")
            bits = np.unpackbits(packed, count=n_vox * len(names)).astype(bool)
            structures = {n: m.reshape(grid.shape) for n, m in zip(names, bits.reshape(-1, n_vox))}
            body = None
            if "body_packed" in z.files:
                body = np.unpackbits(z["body_packed"], count=n_vox).astype(bool).reshape(grid.shape)
            ct = z["ct_hu"].astype(np.float32) if "ct_hu" in z.files else None
            dose = None
            if "dose_u16" in z.files:
                step = float(_require(z, "dose_step_gy", p))
                dose = (z["dose_u16"].astype(np.float64) * step).astype(np.float32)
            occupancy = {}
            if "occupancy_u8" in z.files:
                onames = [str(n) for n in _require(z, "occupancy_names", p)]
                occupancy = {n: (o.astype(np.float32) / 255.0) for n, o in zip(onames, z["occupancy_u8"])}
            prescriptions = [
                Prescription(str(t), float(d), int(f))
                for t, d, f in zip(
                    _require(z, "rx_target", p),
                    _require(z, "rx_dose_gy", p),
                    _require(z, "rx_fractions", p),
                )
            ]
            beams = None
            if "beam_gantry_deg" in z.files:
                beams = Beams(
                    tuple(_require(z, "beam_isocenter_mm", p)),
                    tuple(z["beam_gantry_deg"]),
                    str(_require(z, "beam_technique", p)),
                    tuple(z["beam_couch_deg"]) if "beam_couch_deg" in z.files else None,
                )
            meta = json.loads(str(z["meta_json"])) if "meta_json" in z.files else {}
            case_id = str(_require(z, "case_id", p))
    except DataError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise DataError(f"{p}: {exc}") from exc
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{p}: damaged phantom file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    meta["source"] = str(p)
    meta["format"] = "phantom"
    return Case(
        case_id=case_id,
        grid=grid,
        ct=ct,
        structures=structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=dose,
        body=body,
        occupancy=occupancy,
        meta=meta,
    )


# --------------------------------------------------------------------------------------
# Shipped set
# --------------------------------------------------------------------------------------
def shipped_phantom_dir() -> Path:
    """Folder of the shipped phantom set inside the installed package."""
    return Path(str(importlib.resources.files("dosegym") / "assets" / "phantoms"))


def shipped_manifest() -> dict[str, Any]:
    """The shipped set's ``manifest.json`` (settings, seeds, split, per-case plan quality)."""
    path = shipped_phantom_dir() / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: the shipped phantom manifest is missing; reinstall dosegym")
    return json.loads(path.read_text())


def shipped_phantom_ids(site: str | None = None, split: str | None = None) -> list[str]:
    """Ids ``phantoms:SITE/N`` of the shipped cases (as listed in the manifest), by site and
    index; ``site`` limits to one site, ``split`` to ``"train"`` or ``"test"`` (held out)."""
    if site is not None:
        _check_site(site)
    manifest = shipped_manifest()
    if split is not None and split not in manifest["split"]:
        raise DataError(f"split {split!r} is unknown; valid: {sorted(manifest['split'])}")
    ids = []
    for entry in manifest["cases"]:
        if site is not None and entry["site"] != site:
            continue
        if split is not None and entry["index"] not in manifest["split"][split]:
            continue
        ids.append((SITES.index(entry["site"]), entry["index"], entry["site"]))
    return [f"phantoms:{s}/{i}" for _, i, s in sorted(ids)]


def _shipped_file(site: str, index: int) -> Path:
    return shipped_phantom_dir() / site / f"{site}_{index:03d}.npz"


def load_shipped_phantom(site: str, index: int) -> Case:
    """Read shipped phantom ``index`` of ``site`` (numpy only; no pyradplan needed)."""
    _check_site(site)
    path = _shipped_file(site, int(index))
    if not path.is_file():
        have = sorted(int(f.stem.split("_")[-1]) for f in path.parent.glob(f"{site}_*.npz"))
        valid = f"{have[0]}..{have[-1]}" if have else "none shipped"
        raise DataError(f"phantoms:{site}/{index}: no such shipped phantom; indices: {valid}")
    case = read_phantom(path)
    case.meta["source"] = f"phantoms:{site}/{index}"
    return case


# --------------------------------------------------------------------------------------
# Sets
# --------------------------------------------------------------------------------------
def _pyradplan_available() -> bool:
    return importlib.util.find_spec("pyRadPlan") is not None


def make_phantom(site: str, index: int, seed: int = 0, dose: str = "pyradplan", **physics: Any) -> Case:
    """One phantom with its reference dose: ``dose="pyradplan"`` (computed, see
    :func:`dosegym.data._physics.reference_dose`) or ``"none"`` (anatomy only)."""
    if dose not in ("pyradplan", "none"):
        raise DataError(f"make_phantom: dose must be 'pyradplan' or 'none', got {dose!r}")
    case = generate_anatomy(site, index=index, seed=seed)
    if dose == "none":
        return case
    from dosegym.data import _physics

    dose_gy, info = _physics.reference_dose(case, **physics)
    case.dose = quantize_dose(dose_gy)
    case.meta["dose_engine"] = info
    case.validate()
    case.meta["plan_quality"] = plan_quality(case)
    return case


def generate_phantom_set(
    out: str | Path,
    sites: Sequence[str] = ("headneck",),
    n: int = 4,
    seed: int = 0,
    dose: str = "auto",
) -> list[Path]:
    """Write ``n`` phantoms per site to ``out/<site>_<index:03d>.npz``; return the paths.

    The set is one folder output (see :mod:`dosegym.data.atomic`): ``out`` may be new, empty
    or a set written here before, whose files it replaces (files others added are kept).

    ``dose``: ``"pyradplan"`` computes reference doses (needs the ``physics`` extra);
    ``"shipped"`` copies the shipped files (the set was made with the manifest's seed, so only
    that seed and its indices exist); ``"none"`` writes anatomy only; ``"auto"`` uses
    pyradplan when importable, else the shipped file when it exists for (site, seed, index),
    else anatomy only, with a warning.
    """
    if dose not in DOSE_MODES:
        raise DataError(f"dose={dose!r} is not valid; choose one of {list(DOSE_MODES)}")
    for site in sites:
        _check_site(site)
    if n < 1:
        raise DataError(f"n must be >= 1 phantoms per site, got {n}")
    if not 0 <= seed < 2**64:
        raise DataError(f"seed must be an integer in [0, 2**64), got {seed}")
    if dose == "pyradplan" and not _pyradplan_available():
        raise DataError(
            "dose='pyradplan' needs pyradplan: pip install 'dosegym[physics]' "
            "(or use dose='shipped' / 'none')"
        )
    out = Path(out)
    shipped_seed = None
    if dose in ("shipped", "auto"):
        try:
            shipped_seed = int(shipped_manifest()["settings"]["seed"])
        except DataError:
            shipped_seed = None
    paths = []
    missing_dose = []
    with atomic_folder(out, SET_WRITER) as tmp:
        for site, index in itertools.product(sites, range(n)):
            name = f"{site}_{index:03d}.npz"
            shipped = _shipped_file(site, index)
            has_shipped = shipped_seed == seed and shipped.is_file()
            if dose == "shipped" or (dose == "auto" and not _pyradplan_available()):
                if has_shipped:
                    shutil.copyfile(shipped, tmp / name)
                    paths.append(out / name)
                    continue
                if dose == "shipped":
                    raise DataError(
                        f"phantoms:{site}/{index} with seed {seed} is not shipped; the shipped "
                        f"set has seed {shipped_seed} and indices listed by "
                        "dosegym.data.phantoms.shipped_phantom_ids(); use dose='pyradplan' or 'none'"
                    )
                missing_dose.append(f"{site}/{index}")
                mode = "none"
            else:
                mode = "pyradplan" if dose in ("pyradplan", "auto") else "none"
            write_phantom(make_phantom(site, index, seed, dose=mode), tmp / name)
            paths.append(out / name)
    if missing_dose:
        warnings.warn(
            f"no reference dose for {len(missing_dose)} phantom(s) "
            f"({', '.join(missing_dose[:6])}): pyradplan is not installed and the shipped set "
            f"has no case for seed {seed} at these indices; wrote anatomy only. Install the "
            "physics extra (pip install 'dosegym[physics]') for doses.",
            UserWarning,
            stacklevel=2,
        )
    return paths
