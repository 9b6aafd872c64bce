#!/usr/bin/env python3
"""Dose-prediction quality of checkpoints on OpenKBP validation patients and held-out phantoms.

    python benchmarks/model_quality.py --model diffusion=runs/gpu/diffusion/checkpoint \
        --model regression=runs/gpu/regression/checkpoint \
        --openkbp ~/.cache/dosegym/openkbp/validation-pats --phantoms --out quality.json

For each case the prediction is mapped back onto the case's full grid (OpenKBP: 128³) and
scored there: OpenKBP dose score and DVH score (the organisers' definitions,
``dosegym.scorecards.challenge``), MAE inside the body / possible-dose mask, and the sampling
time per case. A diffusion model is reported twice: its first sample ("1 sample") and the
voxel-wise mean of ``--samples`` samples ("mean of K"). Beside each model, its **floor**: the
case's reference dose mapped onto that model's grid (``to_model``, the dose slot) and decoded
back with the model's own ``DosePolicy.decode``, scored the same way; no prediction through
that decode path can score better than it does. Never pass OpenKBP test patients to
tune anything; validation-pats is what this script is for.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _cases(args):
    from dosegym.data import read_case

    if args.openkbp:
        root = Path(args.openkbp).expanduser()
        folders = sorted(
            (p for p in root.iterdir() if (p / "dose.csv").is_file()),
            key=lambda p: int(p.name.split("_")[-1]),
        )
        for f in folders[: args.max_cases or None]:
            yield "openkbp", read_case(f)
    if args.phantoms:
        from dosegym.data import phantoms
        from dosegym.data.sites import PhantomId

        for pid in phantoms.shipped_phantom_ids(split="test")[: args.max_cases or None]:
            p = PhantomId.parse(pid)
            yield "phantoms", phantoms.load_shipped_phantom(p.site, p.index)


def _mae_in_body(case, pred) -> float:
    body = case.body if case.body is not None else np.ones(case.grid.shape, bool)
    return float(np.abs(pred[body] - case.dose[body]).mean())


def _floor(policy, case) -> np.ndarray:
    """The reference dose through ``policy``'s grid and back with its own decode (Gy, case grid)."""
    from dosegym.diffusion import to_model

    cond = policy.conditions(to_model(case, policy.spec)[0])
    return policy.decode(cond.tensors["dose"], cond, to_case=case)[0].float().cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT_DIR (repeatable)")
    ap.add_argument("--openkbp", help="an OpenKBP validation-pats folder")
    ap.add_argument("--phantoms", action="store_true", help="also the shipped phantoms' held-out split")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (eta 0)")
    ap.add_argument("--samples", type=int, default=4, help="samples per case for the mean")
    ap.add_argument("--max-cases", type=int, default=0, help="at most this many cases per source (0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    from dosegym.diffusion import load_pretrained
    from dosegym.scorecards.challenge import openkbp_scores

    policies = {}
    for item in args.model:
        label, path = item.split("=", 1)
        policies[label] = load_pretrained(path, device=args.device)
    preds: dict[tuple[str, str], list] = {}
    times: dict[tuple[str, str], list[float]] = {}
    maes: dict[tuple[str, str], list[float]] = {}
    for source, case in _cases(args):
        for label, policy in policies.items():
            regression = policy.model.config.objective == "regression"
            k = 1 if regression else args.samples
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = policy.predict(case, steps=args.steps, seed=0, samples=k)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / k
            if not regression and out.ndim == 3:  # predict gives (Z, Y, X) for samples=1
                out = out[None]
            variants = (
                {label: (out, dt)}
                if regression
                else {f"{label} (1 sample)": (out[0], dt), f"{label} (mean of {k})": (out.mean(axis=0), dt)}
            )
            variants[f"{label} floor (reference round trip)"] = (_floor(policy, case), 0.0)
            for name, (pred, seconds) in variants.items():
                key = (source, name)
                preds.setdefault(key, []).append((case, pred))
                times.setdefault(key, []).append(seconds)
                maes.setdefault(key, []).append(_mae_in_body(case, pred))
        print(f"{source} {case.case_id} done", flush=True)

    results = []
    for (source, name), pairs in preds.items():
        label = name.split(" ")[0]
        row = {
            "source": source,
            "model": name,
            "cases": len(pairs),
            "mae_body_gy": float(np.mean(maes[(source, name)])),
            "sec_per_sample": float(np.median(times[(source, name)])),
            "parameters": int(sum(p.numel() for p in policies[label].model.parameters())),
            "device": args.device,
        }
        if source == "openkbp":
            s = openkbp_scores(pairs)
            row["dose_score_gy"], row["dvh_score_gy"] = s.dose_score, s.dvh_score
        results.append(row)
    header = (
        f"{'source':9} {'model':40} {'n':>3} {'dose score':>10} {'DVH score':>9} {'MAE body':>8} "
        f"{'s/sample':>8} {'params':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r['source']:9} {r['model']:40} {r['cases']:3d} {r.get('dose_score_gy', float('nan')):10.3f} "
            f"{r.get('dvh_score_gy', float('nan')):9.3f} {r['mae_body_gy']:8.3f} {r['sec_per_sample']:8.3f} "
            f"{r['parameters']:9d}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
