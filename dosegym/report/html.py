"""``report.html``: one self-contained page (pictures embedded as base64 PNG, inline CSS).

Sections: the run (agent, card, samples, time), the summary table (per eval case: points
before and after, MAE, the items whose status changed), the run's curves, then per kept case
the dose wash, the DVHs and the scorecard table before / after / reference with each status
coloured; at the end the config and the package versions.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from dosegym.report.content import CaseContent, ReportContent

STATUS_COLOURS = {
    "ideal": "#1a9641",
    "good": "#a6d96a",
    "variation": "#fdae61",
    "fail": "#d7191c",
    "unmatched": "#bbbbbb",
}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
td.status { color: #fff; font-weight: 600; text-align: center; }
img { max-width: 100%; } .muted { color: #777; font-size: .85em; } pre { background: #f7f7f7; padding: .8em; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def _status(value: str | None) -> str:
    if value is None:
        return "<td>-</td>"
    colour = STATUS_COLOURS.get(value, "#888")
    return f'<td class="status" style="background:{colour}">{escape(value)}</td>'


def _table(head: list[str], rows: list[list[str]], cls: str) -> str:
    th = "".join(
        f'<th class="l">{escape(h)}</th>' if i < 1 else f"<th>{escape(h)}</th>" for i, h in enumerate(head)
    )
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _changes(changes: list[dict[str, Any]]) -> str:
    return "; ".join(f"{c['item']}: {c['before']} &rarr; {c['after']}" for c in changes) or "-"


def summary_table(per_case: list[dict[str, Any]]) -> str:
    """Per eval case: points before / after of the maximum, score, MAE, status changes."""
    rows = [
        [
            f'<td class="l">{escape(r["case_id"])}</td>',
            f"<td>{_num(r['points_before'], '.1f')}</td>",
            f"<td>{_num(r['points_after'], '.1f')}</td>",
            f"<td>{_num(r['maximum'], '.1f')}</td>",
            f"<td>{_num(r['score_before'])}</td>",
            f"<td>{_num(r['score_after'])}</td>",
            f"<td>{_num(r['mae_before_gy'], '.2f')}</td>",
            f"<td>{_num(r['mae_after_gy'], '.2f')}</td>",
            f'<td class="l">{_changes(r["status_changes"])}</td>',
        ]
        for r in per_case
    ]
    head = ["case", "points before", "points after", "max", "score before", "score after",
            "MAE before [Gy]", "MAE after [Gy]", "items that changed status"]  # fmt: skip
    return _table(head, rows, "summary")


def scorecard_table(content: CaseContent) -> str:
    """One row per card item: value, points and status of each dose of the case."""
    labels = list(content.scores)
    first = content.scores[labels[0]]
    rows = []
    for k, item in enumerate(first.items):
        row = [
            f'<td class="l">{escape(item.structure)} {escape(item.label)}</td>',
            f"<td>{_num(item.max_points, 'g')}</td>",
        ]
        for label in labels:
            it = content.scores[label].items[k]
            row += [
                f"<td>{_num(it.value, '.2f')}</td>",
                f"<td>{_num(it.points, '.2f')}</td>",
                _status(it.status.value),
            ]
        rows.append(row)
    total = ['<td class="l"><b>total</b></td>', f"<td>{_num(first.maximum, 'g')}</td>"]
    for label in labels:
        s = content.scores[label]
        total += ["<td></td>", f"<td><b>{_num(s.total, '.2f')}</b></td>", f"<td>{_num(s.normalised)}</td>"]
    rows.append(total)
    head = ["item", "max"] + [f"{label} {col}" for label in labels for col in ("value", "points", "status")]
    return _table(head, rows, "scorecard")


def render_html(content: ReportContent) -> str:
    """The page of ``content`` (see the module docstring)."""
    doc = content.to_dict()
    run, summary = doc["run"], doc["summary"]
    s0, s1 = summary["before"], summary["after"]
    card = run["scorecard"] or "each site's built-in card"
    title = f"dosegym report: {run['agent']} on {card}"
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Agent <b>{escape(str(run['agent']))}</b>, seed {run['seed']}, "
        f"{run['samples_trained']} samples trained in {_num(run['wall_s'], '.0f')} s "
        f"on {escape(str(run['device']))}. Mean normalised score on the "
        f"{s1['cases']} held-out cases: <b>{_num(s0['score_mean'])} &rarr; {_num(s1['score_mean'])}</b>; "
        f"MAE to the reference {_num(s0['mae_gy'], '.2f')} &rarr; {_num(s1['mae_gy'], '.2f')} Gy.</p>",
        "<h2>Summary</h2>",
        summary_table(doc["per_case"]),
        "<h2>Run</h2>",
        '<div class="row">',
        _img(content.pictures["curves"], "training reward and eval score against samples"),
        _img(content.pictures["fidelity"], "eval score against MAE"),
        "</div>",
    ]
    for case in content.cases:
        parts += [
            f'<h2>{escape(case.case_id)} <span class="muted">({escape(case.ref)}, '
            f"card {escape(case.card)})</span></h2>",
            _img(case.pictures["wash"], f"dose wash of {case.case_id}"),
            _img(case.pictures["dvh"], f"DVHs of {case.case_id}"),
            scorecard_table(case),
        ]
    parts += [
        "<h2>Config and versions</h2>",
        f"<pre>{escape(json.dumps(doc['config'], indent=2))}</pre>",
        f"<pre>{escape(json.dumps(doc['packages'], indent=2))}</pre>",
        f'<p class="muted">created {escape(str(run["created_utc"]))}, '
        f"git {escape(str(run['git_revision']))}; "
        "research software, not for clinical use.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)
