#!/usr/bin/env python3
"""Table and curve of ``dosegym align`` runs: every ``result.json`` under the given folders.

    python benchmarks/align_summary.py ~/runs/align --png curves.png [--json summary.json]

Runs are grouped by task (the run folder's parent name, e.g. ``phantoms`` / ``openkbp``) and
agent; each group shows the mean and the spread (min..max) over its seeds of: the eval
score (mean normalised card total of the eval cases) before and after, its gain, the gap to
the reference plans closed (``--reference TASK=SCORE``), the MAE to the reference dose
(Gy) before and after, the mean dose in the body outside the targets (Gy; what reward
hacking raises) before and after, with the reference plans' own, the last iteration's KL to
the reference, wall time and training samples/s. The PNG plots each run's eval score
against samples trained (``eval_history``),
one colour per agent, one panel per task; an agent that trains nothing (Best-of-N) is a
dotted level at its score.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from dosegym.agents.result import read_result


def runs(folders: list[Path]) -> dict[tuple[str, str], list[tuple[Path, dict]]]:
    """``(task, agent) -> [(run folder, result document)]`` of every result.json found."""
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = defaultdict(list)
    for folder in folders:
        for path in sorted(Path(folder).expanduser().rglob("result.json")):
            doc = read_result(path)
            groups[(path.parent.parent.name, doc["agent"])].append((path.parent, doc))
    return groups


def _last(doc: dict, key: str) -> float:
    vals = [c.get(key) for c in doc["curves"] if c.get(key) is not None]
    return float(vals[-1]) if vals else float("nan")


def row(docs: list[dict], reference: float | None) -> dict[str, list[float]]:
    """Per-seed values of the table's columns."""
    out: dict[str, list[float]] = defaultdict(list)
    for d in docs:
        before, after = d["before"]["summary"], d["after"]["summary"]
        out["score_before"].append(before["score_mean"])
        out["score_after"].append(after["score_mean"])
        out["gain"].append(after["score_mean"] - before["score_mean"])
        if reference is not None:
            gap = reference - before["score_mean"]
            out["gap_closed"].append(
                (after["score_mean"] - before["score_mean"]) / gap if gap > 0 else np.nan
            )
        out["mae_before"].append(before["mae_gy"] if before["mae_gy"] is not None else np.nan)
        out["mae_after"].append(after["mae_gy"] if after["mae_gy"] is not None else np.nan)
        for key, summ in (("outside_before", before), ("outside_after", after), ("outside_ref", after)):
            value = summ.get("reference_outside_targets_gy" if key == "outside_ref" else "outside_targets_gy")
            out[key].append(np.nan if value is None else value)
        out["kl"].append(_last(d, "kl_mean"))
        out["wall_s"].append(d["wall_s"])
        out["samples_per_s"].append(d["samples_trained"] / d["wall_s"] if d["wall_s"] else np.nan)
    return out


def fmt(values: list[float], digits: int) -> str:
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.nanmean(v):.{digits}f} [{np.nanmin(v):.{digits}f}..{np.nanmax(v):.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--reference", action="append", default=[], help="TASK=SCORE of the reference plans")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    refs = {k: float(v) for k, v in (r.split("=", 1) for r in args.reference)}
    groups = runs(args.folders)
    cols = [
        ("score_before", 3),
        ("score_after", 3),
        ("gain", 3),
        ("gap_closed", 2),
        ("mae_before", 2),
        ("mae_after", 2),
        ("outside_before", 2),
        ("outside_after", 2),
        ("outside_ref", 2),
        ("kl", 4),
        ("wall_s", 0),
        ("samples_per_s", 3),
    ]
    print("| task | agent | seeds | samples | " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * (4 + len(cols)))
    summary = {}
    for (task, agent), items in sorted(groups.items()):
        docs = [d for _, d in items]
        r = row(docs, refs.get(task))
        samples = sorted({d["samples_trained"] for d in docs})
        cells = " | ".join(fmt(r.get(c, [np.nan]), n) for c, n in cols)
        print(f"| {task} | {agent} | {len(docs)} | {','.join(map(str, samples))} | {cells} |")
        summary[f"{task}/{agent}"] = {
            "runs": [str(p) for p, _ in items],
            **{k: list(v) for k, v in r.items()},
        }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = sorted({t for t, _ in groups})
        agents = sorted({a for _, a in groups})
        colours = {a: f"C{i}" for i, a in enumerate(agents)}
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for (t, agent), items in groups.items():
                if t != task:
                    continue
                for k, (_, d) in enumerate(items):
                    if d["iterations"] == 0:  # trains nothing (Best-of-N): a level, not a curve
                        ax.axhline(d["after"]["summary"]["score_mean"], color=colours[agent], ls=":",
                                   lw=1.2, label=f"{agent} (no training)" if k == 0 else None)  # fmt: skip
                        continue
                    hist = [(0, d["before"]["summary"]["score_mean"])]
                    hist += [(h["samples"], h["score_mean"]) for h in d["eval_history"] if "samples" in h]
                    hist.append((d["samples_trained"], d["after"]["summary"]["score_mean"]))
                    xs, ys = zip(*sorted(set(hist)))
                    ax.plot(
                        xs, ys, "-o", ms=3, color=colours[agent], alpha=0.8, label=agent if k == 0 else None
                    )
            if task in refs:
                ax.axhline(refs[task], color="k", ls="--", lw=1, label="reference plans")
            ax.set(title=task, xlabel="training samples", ylabel="eval score (normalised card total)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
