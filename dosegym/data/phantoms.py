"""Phantoms: the shipped set, generating sets, reading any phantom reference, plan quality.

The shipped set (``phantoms:SITE/N``, :func:`load_shipped_phantom`, listed by the manifest)
reads with numpy alone. New phantoms: anatomy from :mod:`dosegym.data.phantom_anatomy`,
reference doses from pyradplan (``dose="pyradplan"``, the ``physics`` extra, see
:mod:`dosegym.data._physics`), written in the file format of :mod:`dosegym.data.phantom_file`.
Ids and sites: :mod:`dosegym.data.sites`. The names of those modules that callers take from
here are re-exported.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import itertools
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dosegym.data.atomic import atomic_folder
from dosegym.data.case import Case
from dosegym.data.phantom_anatomy import (
    GENERATOR_VERSION,
    GRID_SHAPE,
    SPACING_MM,
    generate_anatomy,
    phantom_rng,
)
from dosegym.data.phantom_file import (
    FORMAT_VERSION,
    MAX_PHANTOM_VOXELS,
    quantize_dose,
    read_phantom_file,
    write_phantom,
)
from dosegym.data.sites import PHANTOM_PREFIX, SITES, PhantomId, check_site, parse_phantom_ref
from dosegym.errors import DataError

__all__ = [
    "DOSE_MODES",
    "FORMAT_VERSION",
    "GENERATOR_VERSION",
    "GRID_SHAPE",
    "MAX_PHANTOM_VOXELS",
    "SET_WRITER",
    "SITES",
    "SPACING_MM",
    "d95_gy",
    "generate_anatomy",
    "generate_phantom_set",
    "load_shipped_phantom",
    "make_phantom",
    "phantom_rng",
    "plan_quality",
    "quantize_dose",
    "read_phantom",
    "shipped_manifest",
    "shipped_phantom_dir",
    "shipped_phantom_ids",
    "write_phantom",
]

DOSE_MODES = ("auto", "pyradplan", "shipped", "none")
SET_WRITER = "dosegym phantom set"  # the writer name in the output marker (see dosegym.data.atomic)


def read_phantom(path: str | Path) -> Case:
    """Read a phantom ``.npz`` (:mod:`dosegym.data.phantom_file`) or a shipped id
    ``phantoms:SITE/N`` (``phantoms:SITE`` means index 0) into a validated :class:`Case`."""
    text = str(path)
    if text.startswith(PHANTOM_PREFIX + ":"):
        ref = parse_phantom_ref(text)
        if ref is None:
            raise DataError(
                f"{text!r}: a shipped phantom id is 'phantoms:SITE/N' with SITE one of "
                f"{list(SITES)} and N an index, e.g. 'phantoms:headneck/0'"
            )
        return load_shipped_phantom(ref[0], ref[1] or 0)
    return read_phantom_file(path)


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
        check_site(site)
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
    return [str(PhantomId(s, i)) for _, i, s in sorted(ids)]


def _shipped_file(site: str, index: int) -> Path:
    return shipped_phantom_dir() / site / f"{PhantomId(site, index).case_id}.npz"


def load_shipped_phantom(site: str, index: int) -> Case:
    """Read shipped phantom ``index`` of ``site`` (numpy only; no pyradplan needed)."""
    check_site(site)
    path = _shipped_file(site, int(index))
    if not path.is_file():
        have = sorted(PhantomId.parse(f.stem).index for f in path.parent.glob(f"{site}_*.npz"))
        valid = f"{have[0]}..{have[-1]}" if have else "none shipped"
        raise DataError(f"phantoms:{site}/{index}: no such shipped phantom; indices: {valid}")
    case = read_phantom_file(path)
    case.meta["source"] = str(PhantomId(site, int(index)))
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
        check_site(site)
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
            name = f"{PhantomId(site, index).case_id}.npz"
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
