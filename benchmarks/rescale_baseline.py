#!/usr/bin/env python3
"""The rescale baseline of ``../shared/BASELINES.md``: one global dose factor, chosen on the
training cases to maximise the card, applied unchanged to the evaluation cases.

    python benchmarks/rescale_baseline.py --train phantoms:headneck --split-train train \
        --eval phantoms:headneck --split-eval test --card phantom_headneck [--steps 10] [--out b.json]
    python benchmarks/rescale_baseline.py --train ~/.cache/dosegym/openkbp/train-pats --max-train 32 \
        --eval ~/.cache/dosegym/openkbp/validation-pats --card headneck_rtog

For every case: one pretrained sample (``DosePolicy.predict``, seed 0, DDIM ``--steps``,
``--eta``), then its mean normalised card score and its MAE to the reference dose inside the
body (Gy) at each factor of ``--factors``. The factor with the best mean training score is
the baseline; the table shows every factor on the evaluation cases, the chosen one marked,
the pretrained one (1.00) and the reference plans. Never pass OpenKBP test patients.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dosegym.data import phantoms, read_case
from dosegym.diffusion import load_pretrained
from dosegym.envs.sources import CaseSource
from dosegym.scorecards import load_card


def case_ids(source: str, split: str | None, limit: int) -> list:
    """The cases of ``source`` (a shipped site's ``split`` when given), the first ``limit``."""
    if split:
        site = source.split(":", 1)[1]
        refs: list = phantoms.shipped_phantom_ids(site, split)
    else:
        refs = list(CaseSource(source).refs)
    return refs[:limit] if limit else refs


def sweep(policy, card, refs, factors, steps: int, eta: float, what: str) -> dict:
    """Per factor: mean normalised score and mean MAE (Gy) over ``refs``; the references' score."""
    scores = np.zeros((len(refs), len(factors)))
    maes = np.zeros_like(scores)
    reference = []
    for i, ref in enumerate(tqdm(refs, desc=what, unit="case")):
        case = read_case(ref) if not hasattr(ref, "grid") else ref
        dose = policy.predict(case, steps=steps, sampler="ddim", seed=0, eta=eta)
        body = case.body if case.body is not None else np.ones(case.grid.shape, bool)
        for j, f in enumerate(factors):
            scores[i, j] = card.score(case, dose * f).normalised
            maes[i, j] = float(np.abs(dose * f - case.dose)[body].mean())
        reference.append(card.score(case, case.dose).normalised)
    return {
        "score": scores.mean(0).tolist(),
        "mae_gy": maes.mean(0).tolist(),
        "reference_score": float(np.mean(reference)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="case source of the training cases")
    ap.add_argument("--split-train", default=None, help="shipped phantom split of --train (train/test)")
    ap.add_argument("--max-train", type=int, default=0, help="first N training cases (0: all)")
    ap.add_argument("--eval", required=True, help="case source of the evaluation cases")
    ap.add_argument("--split-eval", default=None, help="shipped phantom split of --eval")
    ap.add_argument("--max-eval", type=int, default=0)
    ap.add_argument("--card", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--factors", default="0.95,1.0,1.05,1.1,1.15,1.2,1.25")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    factors = [float(f) for f in args.factors.split(",")]
    policy, card = load_pretrained(), load_card(args.card)
    t0 = time.perf_counter()
    train = sweep(
        policy,
        card,
        case_ids(args.train, args.split_train, args.max_train),
        factors,
        args.steps,
        args.eta,
        "train",
    )
    best = int(np.argmax(train["score"]))
    ev = sweep(
        policy,
        card,
        case_ids(args.eval, args.split_eval, args.max_eval),
        factors,
        args.steps,
        args.eta,
        "eval",
    )
    print(f"\ncard {args.card}, DDIM {args.steps} steps, eta {args.eta}, one sample (seed 0)")
    print(f"{'factor':>8} {'train score':>12} {'eval score':>11} {'eval MAE Gy':>12}")
    for j, f in enumerate(factors):
        mark = "  <- chosen on train" if j == best else ("  (pretrained)" if f == 1.0 else "")
        print(f"{f:8.2f} {train['score'][j]:12.3f} {ev['score'][j]:11.3f} {ev['mae_gy'][j]:12.2f}{mark}")
    print(f"{'ref':>8} {train['reference_score']:12.3f} {ev['reference_score']:11.3f} {0.0:12.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        doc = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "factors": factors,
            "chosen_factor": factors[best],
            "train": train,
            "eval": ev,
        }
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
