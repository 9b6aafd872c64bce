"""Speed of scoring a 20-item metric list, numpy (one case) and torch (a batch).

1. numpy, one OpenKBP case at 128^3 (pt_108), masks already built: ``compute_metric`` over 20
   items (Dx, Vx, mean, max on the OpenKBP structures) sharing one ``DVHCache``, against a
   straightforward baseline measured in the same run that, per item, gathers
   ``dose[mask]`` and uses ``np.sort`` (Dx, same interpolation rule), ``np.count_nonzero``
   (Vx), ``mean`` or ``max``. The two must agree (checked).
2. torch, a batch of B doses at 64^3 (pt_108 subsampled by 2, each sample perturbed):
   ``compute_metric_torch`` over the same 20 items with one ``TorchDVHCache``, against a
   numpy loop of ``compute_metric`` over the B samples.

Timings: one untimed warm-up, then the median of ``--repeats`` runs.

    python benchmarks/score_speed.py [--repeats 15] [--batch 16] [--device cpu|cuda] [--threads N]
        [--case PATIENT_FOLDER]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from data_paths import PT_108

from dosegym.data import read_case
from dosegym.scorecards.dvh import DVHCache
from dosegym.scorecards.metrics import MetricKind, MetricSpec, compute_metric
from dosegym.scorecards.metrics_torch import TorchDVHCache, compute_metric_torch

CASE = PT_108
K = MetricKind

#: (structure, spec): a 20-item card on the structures of pt_108
ITEMS: list[tuple[str, MetricSpec]] = [
    ("PTV70", MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy")),
    ("PTV70", MetricSpec(K.DOSE_AT_VOLUME, 99, "%", "Gy")),
    ("PTV70", MetricSpec(K.DOSE_AT_VOLUME, 2, "%", "Gy")),
    ("PTV70", MetricSpec(K.VOLUME_AT_DOSE, 66.5, "Gy", "%")),
    ("PTV70", MetricSpec(K.MAX_DOSE, output_unit="Gy")),
    ("PTV63", MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy")),
    ("PTV56", MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy")),
    ("PTV56", MetricSpec(K.VOLUME_AT_DOSE, 53.2, "Gy", "%")),
    ("PTV56", MetricSpec(K.MEAN_DOSE, output_unit="Gy")),
    ("SpinalCord", MetricSpec(K.MAX_DOSE, output_unit="Gy")),
    ("SpinalCord", MetricSpec(K.DOSE_AT_VOLUME, 0.1, "cc", "Gy")),
    ("Brainstem", MetricSpec(K.MAX_DOSE, output_unit="Gy")),
    ("Brainstem", MetricSpec(K.DOSE_AT_VOLUME, 1, "%", "Gy")),
    ("LeftParotid", MetricSpec(K.MEAN_DOSE, output_unit="Gy")),
    ("LeftParotid", MetricSpec(K.VOLUME_AT_DOSE, 30, "Gy", "%")),
    ("RightParotid", MetricSpec(K.MEAN_DOSE, output_unit="Gy")),
    ("RightParotid", MetricSpec(K.VOLUME_AT_DOSE, 30, "Gy", "%")),
    ("Esophagus", MetricSpec(K.MEAN_DOSE, output_unit="Gy")),
    ("Larynx", MetricSpec(K.MEAN_DOSE, output_unit="Gy")),
    ("Larynx", MetricSpec(K.VOLUME_AT_DOSE, 50, "Gy", "cc")),
]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def score_ours(dose: np.ndarray, masks: dict[str, np.ndarray], vox: float) -> list[float]:
    cache = DVHCache(dose, vox)
    return [compute_metric(spec, dose, masks[s], voxel_volume_cc=vox, cache=cache) for s, spec in ITEMS]


def score_baseline(dose: np.ndarray, masks: dict[str, np.ndarray], vox: float) -> list[float]:
    """Per item: gather, then np.sort / count / mean / max (the same definitions)."""
    out = []
    for s, spec in ITEMS:
        vals = dose[masks[s]].astype(np.float64)
        if spec.kind is K.MEAN_DOSE:
            out.append(float(vals.mean()))
        elif spec.kind is K.MAX_DOSE:
            out.append(float(vals.max()))
        elif spec.kind is K.VOLUME_AT_DOSE:
            n = np.count_nonzero(vals >= spec.value)
            out.append(100.0 * n / vals.size if spec.output_unit == "%" else n * vox)
        else:
            desc = np.sort(vals)[::-1]
            cum = np.arange(1, desc.size + 1) * vox
            v = spec.value / 100.0 * cum[-1] if spec.input_unit == "%" else spec.value
            out.append(float(np.interp(v, cum, desc)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--case", type=Path, default=CASE, help="an OpenKBP patient folder")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    case = read_case(args.case)
    dose, vox = case.dose, case.voxel_volume_cc
    masks = {name: case.structures[name] for name, _ in ITEMS}
    ours, base = score_ours(dose, masks, vox), score_baseline(dose, masks, vox)
    np.testing.assert_allclose(ours, base, rtol=1e-9, atol=1e-6)
    t_ours = median_ms(lambda: score_ours(dose, masks, vox), args.repeats)
    t_base = median_ms(lambda: score_baseline(dose, masks, vox), args.repeats)
    print(
        f"numpy, {len(ITEMS)} items on {case.case_id} {dose.shape}, torch threads {torch.get_num_threads()}"
    )
    print(f"  compute_metric + DVHCache : {t_ours:8.2f} ms")
    print(f"  per-item np.sort baseline : {t_base:8.2f} ms   (ratio baseline/ours {t_base / t_ours:.2f}x)")

    # -- torch batch at 64^3 --------------------------------------------------------------
    rng = np.random.default_rng(0)
    small = dose[::2, ::2, ::2]
    vox_small = vox * 8
    masks_small = {k: np.ascontiguousarray(m[::2, ::2, ::2]) for k, m in masks.items()}
    batch = np.stack(
        [small * rng.uniform(0.95, 1.05, small.shape).astype(np.float32) for _ in range(args.batch)]
    )
    device = torch.device(args.device)
    batch_t = torch.from_numpy(batch).to(device)
    masks_t = {k: torch.from_numpy(m).to(device) for k, m in masks_small.items()}

    def score_torch() -> torch.Tensor:
        cache = TorchDVHCache(batch_t, vox_small)
        out = torch.stack(
            [
                compute_metric_torch(spec, batch_t, masks_t[s], voxel_volume_cc=vox_small, cache=cache)
                for s, spec in ITEMS
            ],
            dim=1,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def score_loop() -> np.ndarray:
        return np.array([score_ours(b, masks_small, vox_small) for b in batch])

    np.testing.assert_allclose(score_torch().cpu().numpy(), score_loop(), rtol=1e-5, atol=1e-4)
    t_torch = median_ms(score_torch, args.repeats)
    t_loop = median_ms(score_loop, args.repeats)
    b = args.batch
    print(f"torch ({device}), B={b} doses of {small.shape}, {len(ITEMS)} items")
    print(f"  compute_metric_torch batch: {t_torch:8.2f} ms/batch  {t_torch / b:7.3f} ms/sample")
    print(
        f"  numpy loop over samples   : {t_loop:8.2f} ms/batch  {t_loop / b:7.3f} ms/sample"
        f"   (ratio loop/torch {t_loop / t_torch:.2f}x)"
    )


if __name__ == "__main__":
    main()
