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
that decode path can score better than it does. A checkpoint with a native-resolution
refiner (``CHECKPOINT/refiner/``) decodes through it; ``--without-refiner`` adds, from the same
samples, the rows of the plain trilinear decode ("coarse decode"), so what the refiner buys is
measured in one run. ``s/sample`` includes the decode (the refiner's share is printed beside).
``--flip-tta`` adds test-time flips (``DosePolicy.predict(flip_tta=True)``: each of the K doses
the mean of the input's sample and the mirrored input's, from 2K samples; its s/sample is the
unflipped one's, the flips double it).
Never pass OpenKBP test patients to tune anything; validation-pats is what this script is for.
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


def _reference_x(policy, case) -> torch.Tensor:
    """The reference dose on ``policy``'s model grid, ``(1, 1, Z, Y, X)`` (normalised)."""
    from dosegym.diffusion import to_model

    return policy.conditions(to_model(case, policy.spec)[0]).tensors["dose"]


@torch.no_grad()
def _decoded(policy, case, x0: torch.Tensor, coarse: bool) -> np.ndarray:
    """Model-grid samples ``(K, 1, Z, Y, X)`` decoded onto the case grid (Gy, ``(K, Z, Y, X)``):
    through the policy's decode, or (``coarse``) the plain trilinear one."""
    from dosegym.diffusion import make_resampler

    if coarse:
        return make_resampler(case, policy.spec).decode(x0[:, 0]).float().cpu().numpy()
    return policy.case_decoder(case).decode(x0[:, 0]).float().cpu().numpy()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _parameters(policy, coarse: bool) -> int:
    """Parameters of the model, plus its refiner's unless ``coarse``."""
    modules = [policy.model] + ([] if coarse or policy.refiner is None else [policy.refiner])
    return int(sum(p.numel() for m in modules for p in m.parameters()))


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
    ap.add_argument(
        "--without-refiner", action="store_true", help="also the plain trilinear decode of the same samples"
    )
    ap.add_argument(
        "--flip-tta", action="store_true", help="also test-time flips (each dose the mean with its mirror)"
    )
    args = ap.parse_args()

    from dosegym.diffusion import load_pretrained, seeded_generator
    from dosegym.diffusion.chain import frozen
    from dosegym.diffusion.sample import sample
    from dosegym.scorecards.challenge import openkbp_scores

    policies = {}
    for item in args.model:
        label, path = item.split("=", 1)
        policies[label] = load_pretrained(path, device=args.device)
    preds: dict[tuple[str, str], list] = {}
    times: dict[tuple[str, str], list[float]] = {}
    decode_times: dict[tuple[str, str], list[float]] = {}
    maes: dict[tuple[str, str], list[float]] = {}
    for source, case in _cases(args):
        for label, policy in policies.items():
            regression = policy.model.config.objective == "regression"
            k = 1 if regression else args.samples
            cond = policy.conditions(case).expand(k)
            _sync(args.device)
            t0 = time.perf_counter()
            with frozen(policy.model):
                x0 = sample(policy.model, cond, policy.sampler, args.steps, seeded_generator(0), 0.0)
            _sync(args.device)
            t_sample = (time.perf_counter() - t0) / k
            mirrored = None
            if args.flip_tta:  # the mirrored input's samples, flipped back (predict(flip_tta=True))
                with frozen(policy.model):
                    m = sample(
                        policy.model, cond.mirrored(), policy.sampler, args.steps, seeded_generator(0), 0.0
                    )
                mirrored = 0.5 * (m[:k] + m[k:].flip(-1))
            decodes = [(label, False)]
            if args.without_refiner and policy.refiner is not None:
                decodes.append((f"{label} (coarse decode)", True))
            for name, coarse in decodes:
                t0 = time.perf_counter()
                out = _decoded(policy, case, x0, coarse)
                _sync(args.device)
                t_decode = (time.perf_counter() - t0) / k
                floor = _decoded(policy, case, _reference_x(policy, case), coarse)[0]
                variants = (
                    {name: out[0]}
                    if regression
                    else {f"{name} (1 sample)": out[0], f"{name} (mean of {k})": out.mean(axis=0)}
                )
                if mirrored is not None:
                    flipped = _decoded(policy, case, mirrored, coarse)
                    variants[f"{name} (flip TTA{'' if regression else f', mean of {k}'})"] = flipped.mean(
                        axis=0
                    )
                for vname, pred in variants.items():
                    key = (source, vname)
                    times.setdefault(key, []).append(t_sample + t_decode)
                    decode_times.setdefault(key, []).append(t_decode)
                    preds.setdefault(key, []).append((case, pred))
                    maes.setdefault(key, []).append(_mae_in_body(case, pred))
                key = (source, f"{name} floor (reference round trip)")
                times.setdefault(key, []).append(0.0)
                decode_times.setdefault(key, []).append(0.0)
                preds.setdefault(key, []).append((case, floor))
                maes.setdefault(key, []).append(_mae_in_body(case, floor))
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
            "decode_sec_per_sample": float(np.median(decode_times[(source, name)])),
            "parameters": _parameters(policies[label], coarse="(coarse decode)" in name),
            "device": args.device,
        }
        if source == "openkbp":
            s = openkbp_scores(pairs)
            row["dose_score_gy"], row["dvh_score_gy"] = s.dose_score, s.dvh_score
        results.append(row)
    header = (
        f"{'source':9} {'model':56} {'n':>3} {'dose score':>10} {'DVH score':>9} {'MAE body':>8} "
        f"{'s/sample':>8} {'decode s':>8} {'params':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r['source']:9} {r['model']:56} {r['cases']:3d} {r.get('dose_score_gy', float('nan')):10.3f} "
            f"{r.get('dvh_score_gy', float('nan')):9.3f} {r['mae_body_gy']:8.3f} {r['sec_per_sample']:8.3f} "
            f"{r['decode_sec_per_sample']:8.3f} {r['parameters']:9d}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
