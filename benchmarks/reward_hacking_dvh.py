#!/usr/bin/env python3
"""DVHs of a case under aligned agents against the pretrained model and the reference plan.

For reward hacking (issue 17): the agents of ``dosegym align`` runs (``RUN/checkpoint``, e.g.
``configs/align/reward_hacking/off.yaml`` and ``on.yaml``) and the pretrained model each
predict the case (eval seed 0, as ``dosegym align`` evaluates); the figure draws, per
structure, the cumulative DVH (volume % receiving at least D Gy, from the voxel doses) of each
prediction and of the reference dose; the table prints each one's mean dose in the body
outside the targets, the MAE to the reference (body) and the card score.

    PYTHONPATH=. python benchmarks/reward_hacking_dvh.py ~/runs/hack/off ~/runs/hack/on \
        --labels "terms off,terms on" --case phantoms:headneck/28 --png dvh.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dosegym.agents import registry
from dosegym.agents.evaluate import mae_to_reference_gy, outside_targets_mask
from dosegym.data import read_case
from dosegym.diffusion import load_pretrained
from dosegym.scorecards.dvh import compute_dvh
from dosegym.scorecards.registry import load_card


def cumulative_dvh(case, dose_gy: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(dose Gy, volume %)`` of the project's DVH engine: the share of ``mask`` receiving at
    least each dose."""
    dvh = compute_dvh(np.asarray(dose_gy), mask, voxel_volume_cc=case.voxel_volume_cc)
    return dvh.doses_gy, 100.0 * dvh.cum_volume_cc / dvh.total_volume_cc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="dosegym align run folders")
    ap.add_argument("--labels", default=None, help="comma-separated labels of the runs")
    ap.add_argument("--case", default="phantoms:headneck/28")
    ap.add_argument("--scorecard", default="phantom_headneck")
    ap.add_argument("--structures", default="PTV70,PTV56,SpinalCord,Parotid_L,Mandible")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    labels = args.labels.split(",") if args.labels else [p.name for p in args.runs]
    case = read_case(args.case)
    card = load_card(args.scorecard)
    policy = load_pretrained()
    doses = {"pretrained": policy.predict(case, steps=args.steps, seed=0, eta=0.0)}
    for label, run in zip(labels, args.runs, strict=True):
        agent = registry.load(run.expanduser() / "checkpoint", policy=policy)
        doses[label] = agent.predict(case, seed=0)
    doses["reference"] = case.dose
    outside = outside_targets_mask(case)
    print(f"{args.case}, card {args.scorecard}, eval seed 0\n")
    print(
        "| dose | score | MAE Gy | outside targets Gy | "
        + " | ".join(f"{s} mean Gy" for s in ("PTV70",))
        + " |"
    )
    print("|---|---|---|---|---|")
    for name, dose in doses.items():
        score = card.score(case, dose).normalised
        mae = mae_to_reference_gy(case, dose)
        print(
            f"| {name} | {score:.3f} | {mae:.2f} | {dose[outside].mean():.2f} | "
            f"{dose[case.structures['PTV70']].mean():.2f} |"
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [s for s in args.structures.split(",") if s in case.structures]
        panels = [("body outside the targets", outside)] + [(s, case.structures[s]) for s in names]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
        for ax, (title, mask) in zip(axes[0], panels):
            for k, (name, dose) in enumerate(doses.items()):
                style = {"color": "k", "ls": "--"} if name == "reference" else {"color": f"C{k}"}
                ax.plot(*cumulative_dvh(case, dose, mask), lw=1.3, label=name, **style)
            ax.set(title=title, xlabel="dose (Gy)", ylabel="volume (%)", ylim=(0, 101))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{args.case}: DVHs, eval seed 0", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
