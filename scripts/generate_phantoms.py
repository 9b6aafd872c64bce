"""Regenerate the shipped phantom set (dosegym/assets/phantoms) with pyradplan doses.

Cases run in interleaved site order (headneck 0, prostate 0, lung 0, headneck 1, ...) so a
partial set stays balanced. The run is resumable: a case whose ``.npz`` exists is skipped, and
files are written atomically. ``--shard I/K`` runs every K-th case starting at I, so K
processes can share the work. Each process rewrites ``manifest.json`` from the files present
when it finishes; ``--manifest-only`` just rewrites it.

The shipped set was made with (pyradplan needs the physics extra, e.g. a separate venv)::

    for i in 0 1; do
      TQDM_DISABLE=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=. nohup nice -n 15 \\
        /work/venv-physics/bin/python -W ignore scripts/generate_phantoms.py --shard $i/2 \\
        > /work/phantom_gen_$i.log 2>&1 &
    done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dosegym.data.atomic import atomic_path  # noqa: E402
from dosegym.data.phantoms import (  # noqa: E402
    FORMAT_VERSION,
    GENERATOR_VERSION,
    GRID_SHAPE,
    SITES,
    SPACING_MM,
    make_phantom,
    read_phantom,
    write_phantom,
)
from dosegym.data.sites import PhantomId  # noqa: E402
from dosegym.errors import DataError  # noqa: E402

SEED = 0
N_PER_SITE = 32
N_TRAIN = 28  # indices 0..27 train, 28..31 held out (test), the same for every site
DEFAULT_OUT = REPO / "dosegym" / "assets" / "phantoms"


def case_order(sites: list[str], n: int) -> list[tuple[str, int]]:
    """Interleaved order: (site0, 0), (site1, 0), (site2, 0), (site0, 1), ..."""
    return [(site, i) for i in range(n) for site in sites]


def case_path(out: Path, site: str, index: int) -> Path:
    return out / site / f"{PhantomId(site, index).case_id}.npz"


def write_manifest(out: Path, seed: int, n: int, n_train: int) -> Path:
    """Rewrite ``out/manifest.json`` from the case files present in ``out``."""
    from dosegym.data._physics import OAR_LIMITS, RING_LIMIT, RING_MARGIN_MM, SHELL_LIMIT

    cases = []
    engine = None
    for site in SITES:
        for f in sorted((out / site).glob(f"{site}_*.npz")):
            try:
                pid = PhantomId.parse(f.stem)
            except DataError:
                continue
            case = read_phantom(f)
            info = case.meta.get("dose_engine") or {}
            if engine is None and info:
                engine = {
                    k: info[k]
                    for k in (
                        "engine",
                        "version",
                        "machine",
                        "bixel_width_mm",
                        "dose_grid_mm",
                        "solver",
                        "ring_margin_mm",
                    )
                    if k in info
                }
            cases.append(
                {
                    "id": str(pid),
                    "file": f"{site}/{f.name}",
                    "site": site,
                    "index": pid.index,
                    "bytes": f.stat().st_size,
                    "technique": case.beams.technique if case.beams else None,
                    "gantry_deg": list(case.beams.gantry_deg) if case.beams else None,
                    "prescriptions": [
                        {"target": p.target, "dose_gy": p.dose_gy, "fractions": p.fractions}
                        for p in case.prescriptions
                    ],
                    "normalisation_factor": info.get("normalisation_factor"),
                    "time_s": case.meta.get("generation_time_s"),
                    "plan_quality": case.meta.get("plan_quality"),
                }
            )
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "settings": {
            "seed": seed,
            "seeding": "numpy.random.default_rng([seed, site_code, index, generator_version]),"
            " site_code = position in sites",
            "sites": list(SITES),
            "n_per_site": n,
            "grid_shape_zyx": list(GRID_SHAPE),
            "spacing_mm_zyx": list(SPACING_MM),
            "orientation": "DICOM LPS, z-first: +x patient left, +y posterior, +z superior",
            "beams": "7-9 equispaced coplanar IMRT beams (9 +-1 head and neck, 7..8 otherwise); "
            "one case in six VMAT, planned as 12 static beams at the arc's control points; "
            "isocenter at the centroid of the PTV union",
            "dose_engine": engine,
            "objectives": {
                "targets": "squared deviation to Rx: primary (highest) PTV priority 1000, other PTVs 600",
                "oars": {k: {"max": v[0], "priority": v[1]} for k, v in OAR_LIMITS.items()},
                "oar_max_rule": "max <= 1: fraction of the primary Rx; > 1: Gy",
                "target_shell": {
                    "margin_mm": RING_MARGIN_MM,
                    "max_fraction_rx": SHELL_LIMIT[0],
                    "priority": SHELL_LIMIT[1],
                },
                "normal_tissue": {
                    "beyond_mm": RING_MARGIN_MM,
                    "max_fraction_rx": RING_LIMIT[0],
                    "priority": RING_LIMIT[1],
                },
            },
            "normalisation": "total dose = per-fraction dose x fractions, zero outside the "
            "body, scaled so that the primary PTV's D95 (5th percentile) equals its Rx",
            "dose_storage": "uint16 x power-of-two step (<= 0.001 Gy error)",
            "command": "scripts/generate_phantoms.py --shard I/2 (two processes)",
        },
        "split": {
            "train": list(range(min(n_train, n))),
            "test": list(range(min(n_train, n), n)),
            "rule": "by index, the same for every site; models train on 'train' only",
        },
        "cases": cases,
    }
    path = out / "manifest.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n", type=int, default=N_PER_SITE, help="cases per site")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--train", type=int, default=N_TRAIN, help="indices below go to 'train'")
    ap.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    ap.add_argument("--shard", default="0/1", help="I/K: run cases I, I+K, I+2K, ...")
    ap.add_argument("--manifest-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not args.manifest_only:
        i, k = (int(v) for v in args.shard.split("/"))
        todo = case_order(args.sites, args.n)[i::k]
        for site, index in todo:
            path = case_path(args.out, site, index)
            if path.exists():
                print(f"skip {path.name} (exists)", flush=True)
                continue
            t0 = time.perf_counter()
            case = make_phantom(site, index, args.seed, dose="pyradplan")
            case.meta["generation_time_s"] = round(time.perf_counter() - t0, 1)
            write_phantom(case, path)
            q = case.meta["plan_quality"]
            primary = case.prescriptions[0].target
            print(
                f"{path.name}: {case.meta['generation_time_s']:.1f} s, "
                f"{path.stat().st_size / 1e3:.0f} kB, {case.beams.technique} "
                f"{len(case.beams.gantry_deg)} beams, {primary} D95 "
                f"{q['targets'][primary]['d95_gy']} Gy V95 {q['targets'][primary]['v95_pct']} %, "
                f"max {q['max_pct_rx']} % Rx",
                flush=True,
            )
    path = write_manifest(args.out, args.seed, args.n, args.train)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
