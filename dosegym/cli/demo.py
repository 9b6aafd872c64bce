"""``dosegym demo``: the whole idea in one command, on a laptop CPU, in minutes.

The shipped model predicts doses for held-out cases, a scorecard scores them, an agent
aligns the model to that card on other cases, and the held-out cases are predicted and
scored again; a summary table and ``OUT/report.html`` (``dosegym report``) show what moved.

Defaults: the shipped model; the shipped head-and-neck phantoms, their ``train`` split to
align on and their ``test`` split to show; the built-in card of the site
(``phantom_headneck``); the agent :data:`DEMO_AGENT` with its shipped config
(``dosegym/agents/configs/``) at :data:`DEMO_SAMPLES` samples, evaluated before and after only.
``--cases`` other than ``phantoms:SITE``: the source's last quarter of cases (at least one)
is shown and the rest aligned on; a single case is both (said so: nothing is held out).

``--out`` gets a ``dosegym align`` run folder (``result.json``, ``doses/``, ``checkpoint/``,
``tb/``) plus ``report.html`` and ``report.json``. The run is made in a temporary folder and
moved into ``--out`` only once complete: a folder holding an earlier demo is replaced only
with ``--force``, and then only what the earlier demo wrote.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dosegym.cli._common import console, friendly_errors
from dosegym.errors import AgentError

DEMO_WRITER = "dosegym demo"
#: The agent that showed a clear gain fastest (docs/decisions.md, "dosegym demo").
DEMO_AGENT = "ppo_guided"
#: The demo's training budget in samples (8 iterations of the shipped ppo_guided config).
DEMO_SAMPLES = 64
#: Iterations between evaluations during the demo: none between the before and the after.
NO_MIDWAY_EVAL = 10**6


def split_cases(spec: str) -> tuple[str | list[str], str | list[str], bool]:
    """``(align on, show, held out)`` for a ``--cases`` source (see the module docstring)."""
    from dosegym.cli.align import case_refs
    from dosegym.data.sites import parse_phantom_ref

    parsed = parse_phantom_ref(spec)
    if parsed is not None and parsed[1] is None:
        return f"{spec}/train", f"{spec}/test", True
    refs = case_refs(spec, "--cases")
    if len(refs) == 1:
        return refs, refs, False
    shown = max(1, len(refs) // 4)
    return refs[:-shown], refs[-shown:], True


@friendly_errors
def demo(
    agent: str = typer.Option(DEMO_AGENT, "--agent", help="Agent name (see dosegym.agents.available())."),
    scorecard: str | None = typer.Option(
        None, "--scorecard", help="Built-in card name or card file, MAAS JSON included (default: the site's)."
    ),
    cases: str = typer.Option(
        "phantoms:headneck",
        "--cases",
        help="phantoms:SITE (train split to align on, test split to show), an OpenKBP or DICOM RT folder.",
    ),
    samples: int = typer.Option(DEMO_SAMPLES, "--samples", min=1, help="Training budget in samples."),
    config: Path | None = typer.Option(
        None, "--config", help="Agent config YAML (default: the shipped one)."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:N, mps)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Model checkpoint folder (default: the shipped model)."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Overrides the config's sample_num_steps."),
    out: Path = typer.Option(
        Path("dosegym-demo"), "--out", help="Output folder (new, or an earlier demo with --force)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the training run (evaluation seeds stay 0)."),
    force: bool = typer.Option(
        False, "--force", help="Replace an earlier demo in --out (once the new one is complete)."
    ),
    allow_card_mismatch: bool = typer.Option(
        False, "--allow-card-mismatch", help="Use a card that matches under half of a case's points."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bars."),
) -> None:
    """Predict, score, align and evaluate on the shipped defaults; a summary table and a report."""
    from dosegym.agents import registry
    from dosegym.cli.align import AlignOptions, run_align
    from dosegym.data.atomic import atomic_folder, check_output_path
    from dosegym.report import write_report

    started = time.perf_counter()
    check_output_path(out, writer=DEMO_WRITER)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AgentError(
            f"{out}: holds an earlier demo; pass --force to replace it (it is replaced only once the new "
            "run is complete), or give a new --out"
        )
    registry.get(agent)  # an unknown agent fails before any work, listing the valid ones
    train, shown, held_out = split_cases(cases)
    config_file = config or registry.shipped_config(agent)
    note = "" if held_out else " (a single case: aligned on and shown, nothing held out)"
    console.print(
        f"[bold]dosegym demo[/]: {agent} on {cases}{note}; {samples} samples; "
        f"card {scorecard or 'of the site'}"
    )
    with atomic_folder(out, DEMO_WRITER) as tmp:
        options = AlignOptions(
            agent=agent,
            samples=samples,
            out=tmp,
            scorecard=scorecard,
            cases=train,
            eval_cases=shown,
            config=config_file,
            seed=seed,
            steps=steps,
            eval_every=NO_MIDWAY_EVAL,
            device=device,
            checkpoint=checkpoint,
            diversity_samples=0,
            progress=progress,
            keep_doses=-1,
            overrides={"allow_card_mismatch": True} if allow_card_mismatch else {},
        )
        outcome = run_align(options)
        assert outcome is not None  # one process
        console.print("[bold]report[/]: drawing the doses, DVHs and scorecards")
        write_report(tmp)
        summary(outcome.doc)
    elapsed = time.perf_counter() - started
    console.print(f"done in {elapsed:.0f} s; report: {out / 'report.html'}", soft_wrap=True)


#: Item statuses from worst to best (a change is "better" when it moves right).
STATUS_ORDER = ("fail", "variation", "good", "ideal")


def summary(result: dict) -> None:
    """The summary table (per case: points and MAE before and after, how many items changed
    status for the better and the worse), then each case's changes, one line each."""
    from rich.table import Table

    from dosegym.report.content import per_case_rows

    s0, s1 = result["before"]["summary"], result["after"]["summary"]
    t = Table(
        title="held-out cases, pretrained -> aligned (points; MAE to the reference, Gy; items that changed)",
        title_justify="left",
    )
    t.add_column("case", no_wrap=True)
    for col in ("pts before", "pts after", "max", "MAE before", "MAE after", "better", "worse"):
        t.add_column(col, justify="right")
    lines = []
    for r in per_case_rows(result):
        changes = r["status_changes"]
        better = [c for c in changes if _rank(c["after"]) > _rank(c["before"])]
        t.add_row(
            r["case_id"],
            f"{r['points_before']:.1f}",
            f"{r['points_after']:.1f}",
            f"{r['maximum']:.0f}",
            _gy(r["mae_before_gy"]),
            _gy(r["mae_after_gy"]),
            str(len(better)),
            str(len(changes) - len(better)),
        )
        if changes:
            lines.append(
                f"{r['case_id']}: " + "; ".join(f"{c['item']} {c['before']} -> {c['after']}" for c in changes)
            )
    console.print(t)
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    console.print(
        f"[bold]mean normalised score {s0['score_mean']:.3f} -> {s1['score_mean']:.3f}[/]; "
        f"MAE {_gy(s0['mae_gy'])} -> {_gy(s1['mae_gy'])} Gy",
        soft_wrap=True,
    )


def _rank(status: str | None) -> int:
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else -1


def _gy(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
