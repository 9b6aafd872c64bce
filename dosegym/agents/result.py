"""``result.json``: the versioned record of one alignment run, which the benchmark suites read.

Written by ``dosegym align`` (and :meth:`Agent.result` + :func:`write_result`), read back
with :func:`read_result`; :func:`validate_result` checks a document and raises
``AgentError`` naming the first bad key (``after.summary.score_mean``, ``curves[3].samples``).
Strict JSON: a NaN or infinity is written as ``null``, so a number that must be there and
is not finite fails validation. Schema version :data:`RESULT_SCHEMA_VERSION` (2), every
top-level key required (``null`` where it says so), no other key:

- ``schema_version`` (int): 2 (2 added the outside-targets doses to entries and summaries).
- ``agent`` (str): the registry name of the agent.
- ``config`` (object): the agent's full config (``AgentConfig.to_dict()``, its ``agent``
  key equal to ``agent``).
- ``seed`` (int): ``config.seed``.
- ``packages`` (object str -> str | null): versions of python, dosegym and :data:`RESULT_PACKAGES`.
- ``device`` (str | null): the torch device of the policy (``"cpu"``, ``"cuda:0"``).
- ``git_revision`` (str | null): the dosegym checkout's commit, ``-dirty`` appended when
  tracked files differ from it; null outside a git checkout.
- ``created_utc`` (str): when the document was made, ISO 8601 UTC.
- ``wall_s`` (number >= 0): wall time of the run, seconds.
- ``samples_trained`` (int >= 0): complete samples (episodes) the agent trained on.
- ``iterations`` (int >= 0): iterations run.
- ``base_checkpoint`` (str | null): the model checkpoint the agent started from (``"shipped"``).
- ``scorecard`` (str | null): the card given (name or file); null: each site's built-in card.
- ``train_cases``, ``eval_cases`` (list of str): the case references trained and evaluated on.
- ``before``, ``after`` (object | null): :meth:`EvalResult.to_dict` of the eval cases before
  and after training (for an agent that trains nothing, Best-of-N, ``before`` is the pretrained
  policy's single sample at the agent's ``sample_num_steps`` and ``predict_eta``): ``seeds``
  (list of int), ``diversity_samples`` (int), ``cases`` (one entry per case and seed:
  ``case_id``, ``seed``, ``card``, ``points``, ``maximum``,
  ``normalised``, ``items`` (item -> status), ``passed`` (item -> bool), ``mae_gy``,
  ``outside_targets_gy``, ``reference_outside_targets_gy``, ``dose_score``, ``dvh_score``
  (number | null)), ``diversity_gy`` (case -> Gy) and ``summary`` (``cases``, ``seeds``,
  ``score_mean``, ``score_std``, ``points_mean``, ``mae_gy``, ``outside_targets_gy``,
  ``reference_outside_targets_gy``, ``pass_rate`` (item -> share in [0, 1]), ``diversity_gy``, ``dose_score``,
  ``dvh_score``; see :mod:`dosegym.agents.evaluate`).
- ``curves`` (list of object): one entry per iteration: ``iteration`` (int), ``samples``
  (int, cumulative), ``wall_s`` (number, cumulative) and the iteration's metrics (number |
  null each; the shared ones: ``lr``, ``reward_mean``, ``reward_std``, ``score_mean``,
  ``kl_mean``, ``mae_gy``, ``loss``, ``grad_norm``, ``tied_fraction``).
- ``eval_history`` (list of object): the evaluation summaries during training (the
  ``summary`` fields above, ``score_mean`` required; ``iteration`` and ``samples`` ints
  where given).
- ``extra`` (object): agent- or caller-specific values (any JSON), ``{}`` by default.

A reader of a later minor addition must refuse a different ``schema_version`` rather than
guess (:func:`validate_result` does).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from dosegym._version import __version__
from dosegym.agents.config import AgentConfig
from dosegym.data.atomic import atomic_path, json_text
from dosegym.errors import AgentError

RESULT_FILE = "result.json"
#: Version of the ``result.json`` schema (see the module docstring).
RESULT_SCHEMA_VERSION = 2
#: Packages whose versions every ``result.json`` records.
RESULT_PACKAGES = ("torch", "numpy", "peft", "gymnasium", "pydantic", "safetensors", "diffusers")
#: Item statuses an evaluation entry may record (``dosegym.scorecards.report.ItemStatus`` but unmatched).
ITEM_STATUSES = ("ideal", "good", "variation", "fail")


def package_versions(names: Sequence[str] = RESULT_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when missing), with python and dosegym."""
    out: dict[str, str | None] = {"python": platform.python_version(), "dosegym": __version__}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def git_revision() -> str | None:
    """The commit of the git checkout dosegym runs from (``-dirty`` when tracked files
    changed), or None (not a checkout, no git)."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def result_document(
    agent: str,
    config: AgentConfig,
    *,
    samples_trained: int = 0,
    iterations: int = 0,
    wall_s: float = 0.0,
    device: str | None = None,
    base_checkpoint: str | None = None,
    scorecard: str | None = None,
    train_cases: Sequence[str] = (),
    eval_cases: Sequence[str] = (),
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    curves: Sequence[dict[str, Any]] = (),
    eval_history: Sequence[dict[str, Any]] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A schema-v2 document (see the module docstring); ``packages``, ``git_revision`` and
    ``created_utc`` are filled in here."""
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "agent": agent,
        "config": config.to_dict(),
        "seed": int(config.seed),
        "packages": package_versions(),
        "device": device,
        "git_revision": git_revision(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": float(wall_s),
        "samples_trained": int(samples_trained),
        "iterations": int(iterations),
        "base_checkpoint": base_checkpoint,
        "scorecard": None if scorecard is None else str(scorecard),
        "train_cases": [str(c) for c in train_cases],
        "eval_cases": [str(c) for c in eval_cases],
        "before": before,
        "after": after,
        "curves": [dict(c) for c in curves],
        "eval_history": [dict(e) for e in eval_history],
        "extra": dict(extra or {}),
    }


def agent_result(agent: Any, **fields: Any) -> dict[str, Any]:
    """The document of an :class:`~dosegym.agents.base.Agent`: its name, config, samples,
    iterations, device, base checkpoint, curves and eval history, with ``fields`` (the
    keyword arguments of :func:`result_document`) given or overriding."""
    curves = list(getattr(agent, "curves", []))
    values: dict[str, Any] = {
        "samples_trained": agent.samples_trained,
        "iterations": getattr(agent, "iteration", len(curves)),
        "wall_s": curves[-1]["wall_s"] if curves and "wall_s" in curves[-1] else 0.0,
        "device": str(agent.policy.device),
        "base_checkpoint": agent.base_checkpoint,
        "curves": curves,
        "eval_history": list(getattr(agent, "eval_history", [])),
    }
    values.update(fields)
    return result_document(agent.name, agent.config, **values)


# -- validation ---------------------------------------------------------------------------
def _fail(key: str, what: str, value: Any) -> AgentError:
    shown = "null" if value is None else repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return AgentError(f"result.json: {key}: {what}, got {shown}")


def _int(doc: Any, key: str, minimum: int | None = None) -> int:
    if isinstance(doc, bool) or not isinstance(doc, int):
        raise _fail(key, "must be an integer", doc)
    if minimum is not None and doc < minimum:
        raise _fail(key, f"must be >= {minimum}", doc)
    return doc


def _num(
    doc: Any, key: str, nullable: bool = False, lo: float | None = None, hi: float | None = None
) -> None:
    if doc is None and nullable:
        return
    if isinstance(doc, bool) or not isinstance(doc, (int, float)) or not math.isfinite(doc):
        null = " or null" if nullable else " (NaN and infinities are written as null)"
        raise _fail(key, f"must be a finite number{null}", doc)
    if (lo is not None and doc < lo) or (hi is not None and doc > hi):
        raise _fail(key, f"must be in [{lo}, {hi}]", doc)


def _str(doc: Any, key: str, nullable: bool = False) -> None:
    if doc is None and nullable:
        return
    if not isinstance(doc, str) or not doc:
        raise _fail(key, "must be a non-empty string" + (" or null" if nullable else ""), doc)


def _obj(doc: Any, key: str, required: Sequence[str] = (), allowed: Sequence[str] | None = None) -> dict:
    if not isinstance(doc, dict):
        raise _fail(key, "must be an object", doc)
    for k in required:
        if k not in doc:
            raise AgentError(f"result.json: {key + '.' if key else ''}{k}: required key missing")
    if allowed is not None:
        bad = sorted(set(doc) - set(allowed))
        if bad:
            where = f"{key}.{bad[0]}" if key else bad[0]
            raise AgentError(f"result.json: {where}: unknown key; valid keys: {sorted(allowed)}")
    return doc


def _list(doc: Any, key: str) -> list:
    if not isinstance(doc, list):
        raise _fail(key, "must be a list", doc)
    return doc


EVAL_KEYS = ("seeds", "diversity_samples", "cases", "diversity_gy", "summary")
ENTRY_KEYS = (
    "case_id", "seed", "card", "points", "maximum", "normalised", "items", "passed",
    "mae_gy", "outside_targets_gy", "reference_outside_targets_gy", "dose_score", "dvh_score",
)  # fmt: skip
#: Entry and summary numbers that may be null.
NULLABLE = ("mae_gy", "outside_targets_gy", "reference_outside_targets_gy", "dose_score", "dvh_score")
SUMMARY_KEYS = (
    "cases", "seeds", "score_mean", "score_std", "points_mean", "mae_gy", "outside_targets_gy",
    "reference_outside_targets_gy", "pass_rate", "diversity_gy", "dose_score", "dvh_score",
)  # fmt: skip
CURVE_KEYS = ("iteration", "samples", "wall_s")
TOP_KEYS = (
    "schema_version", "agent", "config", "seed", "packages", "device", "git_revision",
    "created_utc", "wall_s", "samples_trained", "iterations", "base_checkpoint", "scorecard",
    "train_cases", "eval_cases", "before", "after", "curves", "eval_history", "extra",
)  # fmt: skip


def _summary(doc: Any, key: str, required: Sequence[str] = SUMMARY_KEYS) -> None:
    _obj(doc, key, required)
    for k, v in doc.items():
        where = f"{key}.{k}"
        if k in ("cases", "seeds", "iteration", "samples"):
            _int(v, where, 0)
        elif k == "pass_rate":
            for item, rate in _obj(v, where).items():
                _num(rate, f"{where}[{item!r}]", lo=0.0, hi=1.0)
        elif k in ("score_mean", "score_std", "points_mean"):
            _num(v, where)
        else:
            _num(v, where, nullable=True)


def _evaluation(doc: Any, key: str) -> None:
    if doc is None:
        return
    _obj(doc, key, EVAL_KEYS, EVAL_KEYS)
    seeds = _list(doc["seeds"], f"{key}.seeds")
    for i, s in enumerate(seeds):
        _int(s, f"{key}.seeds[{i}]")
    _int(doc["diversity_samples"], f"{key}.diversity_samples", 0)
    for i, e in enumerate(_list(doc["cases"], f"{key}.cases")):
        where = f"{key}.cases[{i}]"
        _obj(e, where, ENTRY_KEYS, ENTRY_KEYS)
        _str(e["case_id"], f"{where}.case_id")
        _int(e["seed"], f"{where}.seed")
        _str(e["card"], f"{where}.card")
        for k in ("points", "maximum", "normalised"):
            _num(e[k], f"{where}.{k}")
        for k in NULLABLE:
            _num(e[k], f"{where}.{k}", nullable=True)
        for item, status in _obj(e["items"], f"{where}.items").items():
            if status not in ITEM_STATUSES:
                raise _fail(f"{where}.items[{item!r}]", f"must be one of {list(ITEM_STATUSES)}", status)
        for item, ok in _obj(e["passed"], f"{where}.passed").items():
            if not isinstance(ok, bool):
                raise _fail(f"{where}.passed[{item!r}]", "must be true or false", ok)
    for case, v in _obj(doc["diversity_gy"], f"{key}.diversity_gy").items():
        _num(v, f"{key}.diversity_gy[{case!r}]", lo=0.0)
    _summary(doc["summary"], f"{key}.summary")


def validate_result(doc: Any) -> dict[str, Any]:
    """``doc`` (as it reads back from strict JSON: NaN -> null) when it is a valid schema-v1
    document (see the module docstring), else ``AgentError`` naming the first bad key."""
    try:
        doc = json.loads(json_text(doc)) if isinstance(doc, dict) else doc
    except (TypeError, ValueError) as exc:
        raise AgentError(f"result.json: the document is not plain JSON data ({exc})") from None
    _obj(doc, "", ("schema_version",))
    version = doc["schema_version"]
    if version != RESULT_SCHEMA_VERSION:
        reads = f"this dosegym ({__version__}) reads schema_version {RESULT_SCHEMA_VERSION}"
        raise _fail("schema_version", reads, version)
    _obj(doc, "", TOP_KEYS, TOP_KEYS)
    _str(doc["agent"], "agent")
    config = _obj(doc["config"], "config", ("agent", "seed"))
    if config["agent"] != doc["agent"]:
        raise _fail("config.agent", f"must be the agent {doc['agent']!r}", config["agent"])
    _int(doc["seed"], "seed")
    if config["seed"] != doc["seed"]:
        raise _fail("seed", f"must be config.seed ({config['seed']!r})", doc["seed"])
    for name, version in _obj(doc["packages"], "packages", ("python", "dosegym")).items():
        _str(version, f"packages.{name}", nullable=True)
    for k in ("device", "git_revision", "base_checkpoint", "scorecard"):
        _str(doc[k], k, nullable=True)
    _str(doc["created_utc"], "created_utc")
    try:
        datetime.datetime.fromisoformat(doc["created_utc"])
    except ValueError:
        raise _fail("created_utc", "must be an ISO 8601 time", doc["created_utc"]) from None
    _num(doc["wall_s"], "wall_s", lo=0.0)
    _int(doc["samples_trained"], "samples_trained", 0)
    _int(doc["iterations"], "iterations", 0)
    for k in ("train_cases", "eval_cases"):
        for i, c in enumerate(_list(doc[k], k)):
            _str(c, f"{k}[{i}]")
    _evaluation(doc["before"], "before")
    _evaluation(doc["after"], "after")
    for i, c in enumerate(_list(doc["curves"], "curves")):
        where = f"curves[{i}]"
        _obj(c, where, CURVE_KEYS)
        _int(c["iteration"], f"{where}.iteration", 0)
        _int(c["samples"], f"{where}.samples", 0)
        _num(c["wall_s"], f"{where}.wall_s", lo=0.0)
        for k, v in c.items():
            if k not in CURVE_KEYS:
                _num(v, f"{where}.{k}", nullable=True)
    for i, e in enumerate(_list(doc["eval_history"], "eval_history")):
        _summary(e, f"eval_history[{i}]", ("score_mean",))
    _obj(doc["extra"], "extra")
    return doc


def write_result(path: str | Path, document: dict[str, Any]) -> Path:
    """Validate ``document`` and write it atomically (strict JSON); ``path`` may be a run folder."""
    dest = Path(path)
    if dest.is_dir():
        dest = dest / RESULT_FILE
    validate_result(document)
    with atomic_path(dest) as tmp:
        tmp.write_text(json_text(document), encoding="utf-8")
    return dest


def read_result(path: str | Path) -> dict[str, Any]:
    """The validated document of a ``result.json`` file (or of a run folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgentError(f"{p}: no such result file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AgentError(f"{p}: not a readable JSON result ({exc})") from exc
    try:
        return validate_result(doc)
    except AgentError as exc:
        raise AgentError(f"{p}: {exc}") from None
