"""Evaluation of an agent (or the pretrained policy) on held-out cases with the exact card.

::

    result = evaluate(agent, cases, seeds=(0,), diversity_samples=0)
    result.summary()   # {"score_mean", "mae_gy", "pass_rate": {item: share}, "diversity_gy", ...}
    result.to_dict()   # strict-JSON-ready: seeds, per-case entries, diversity, summary

``agent`` is anything with ``predict(case, seed) -> dose`` (Gy, case grid, ``(Z, Y, X)``)
and ``card_for(case) -> Scorecard``: an :class:`~dosegym.agents.base.Agent`, or the
pretrained policy wrapped in :class:`PolicyPredictor` (the "before" numbers). Per case and
seed (one :class:`CaseEval`):

* ``points`` / ``maximum`` / ``normalised``: the exact card's total, maximum and
  total / maximum (:meth:`Scorecard.score`; unmatched items left out of both);
* ``items``: the status of every matched item (``ideal``, ``good``, ``variation``, ``fail``),
  by item name ``"STRUCTURE LABEL"`` (``"PTV70 D95% [Gy]"``; ``#N`` appended to a repeated
  name); an item **passes** when it is ``ideal`` (the protocol goal met: full points);
* ``mae_gy``: mean absolute difference to the case's reference dose inside the body (all
  voxels without one), Gy; ``None`` without a reference;
* ``outside_targets_gy`` / ``reference_outside_targets_gy``: the mean dose (Gy) of the
  prediction / of the reference dose in the body outside every target (``case.targets``), the
  dose a score-hungry policy raises first (reward hacking); ``None`` without a body, without
  targets (or, for the reference, without a reference dose);
* ``dose_score`` / ``dvh_score``: the OpenKBP challenge scores (:mod:`dosegym.scorecards.challenge`,
  Gy) for an OpenKBP case, i.e. one read from OpenKBP CSVs (``case.meta["format"] ==
  "openkbp"``) that has its reference dose and possible-dose mask; ``None`` otherwise.

``diversity_samples`` K > 1: for each case, the mean over body voxels of the voxel-wise
standard deviation (Gy, ``ddof=0``) of K predictions at seeds ``0 .. K-1`` (predictions the
scoring seeds already made are reused). The summary takes means over every (case, seed)
entry; its ``dvh_score`` pools the DVH errors of every entry, as the organisers do.
A card that matches no item of a case, or a non-finite score, raises ``AgentError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from dosegym.data.case import Case
from dosegym.diffusion.policy import DosePolicy
from dosegym.envs.cards import CardChooser
from dosegym.envs.reward import masked_mae_gy
from dosegym.errors import AgentError
from dosegym.scorecards.challenge import openkbp_dose_score, openkbp_dvh_errors
from dosegym.scorecards.report import ItemStatus, ScoreReport
from dosegym.scorecards.scorecard import Scorecard

#: ``case.meta["format"]`` of a case read from OpenKBP CSVs (the cases the challenge scores apply to).
OPENKBP_FORMAT = "openkbp"
#: The item status that counts as a pass (the protocol goal met).
PASS_STATUS = ItemStatus.IDEAL


class Predictor(Protocol):
    """What :func:`evaluate` needs: a dose per (case, seed) and the card that scores it."""

    def predict(self, case: Case, seed: int = 0) -> np.ndarray: ...

    def card_for(self, case: Case) -> Scorecard: ...


@dataclass
class PolicyPredictor:
    """A :class:`DosePolicy` as a :class:`Predictor`: ``policy.predict(case, steps, sampler,
    seed, eta)`` scored with ``scorecard`` (a card name, file or ``Scorecard``; ``None``: the
    built-in card of each case's site, as the envs choose)."""

    policy: DosePolicy
    scorecard: Any = None
    steps: int = 20
    eta: float = 0.0
    _cards: CardChooser = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cards = CardChooser(self.scorecard)

    def predict(self, case: Case, seed: int = 0) -> np.ndarray:
        """The policy's dose of ``case`` (Gy, case grid)."""
        p = self.policy
        return p.predict(case, steps=self.steps, sampler=p.sampler, seed=seed, eta=self.eta)

    def card_for(self, case: Case) -> Scorecard:
        """The card of ``case``."""
        return self._cards.card_for(case)


@dataclass(frozen=True)
class CaseEval:
    """The evaluation of one prediction (see the module docstring); doses and scores in Gy."""

    case_id: str
    seed: int
    card: str
    points: float
    maximum: float
    normalised: float
    items: dict[str, str]
    passed: dict[str, bool]
    mae_gy: float | None = None
    outside_targets_gy: float | None = None
    reference_outside_targets_gy: float | None = None
    dose_score: float | None = None
    dvh_score: float | None = None


@dataclass
class EvalResult:
    """Per-case entries, per-case diversity (Gy) and the seeds they came from."""

    entries: list[CaseEval]
    seeds: list[int]
    diversity_samples: int = 0
    diversity_gy: dict[str, float] = field(default_factory=dict)
    #: The OpenKBP DVH errors of each entry, pooled by :meth:`summary` (not serialised).
    dvh_errors: list[list[float]] = field(default_factory=list, repr=False)
    #: ``keep_doses``: case id -> the first seed's dose (Gy, case grid; not serialised).
    doses: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """Means over the entries: ``score_mean`` (normalised), ``score_std``, ``points_mean``,
        ``mae_gy``, ``outside_targets_gy``, ``reference_outside_targets_gy``, ``pass_rate``
        (item -> share of entries where it passes), ``diversity_gy``,
        ``dose_score``, ``dvh_score`` (None where no entry has them), ``cases``, ``seeds``."""
        e = self.entries
        scores = np.array([x.normalised for x in e], dtype=np.float64)
        names = sorted({n for x in e for n in x.passed})
        pass_rate = {n: _mean([float(x.passed[n]) for x in e if n in x.passed]) for n in names}
        pooled = [v for errs in self.dvh_errors for v in errs]
        return {
            "cases": len({x.case_id for x in e}),
            "seeds": len(self.seeds),
            "score_mean": float(scores.mean()),
            "score_std": float(scores.std()),
            "points_mean": float(np.mean([x.points for x in e])),
            "mae_gy": _mean([x.mae_gy for x in e]),
            "outside_targets_gy": _mean([x.outside_targets_gy for x in e]),
            "reference_outside_targets_gy": _mean([x.reference_outside_targets_gy for x in e]),
            "pass_rate": pass_rate,
            "diversity_gy": _mean(list(self.diversity_gy.values())),
            "dose_score": _mean([x.dose_score for x in e]),
            "dvh_score": float(np.mean(pooled)) if pooled else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"seeds", "diversity_samples", "cases": [entry dicts], "diversity_gy", "summary"}``."""
        return {
            "seeds": list(self.seeds),
            "diversity_samples": int(self.diversity_samples),
            "cases": [asdict(x) for x in self.entries],
            "diversity_gy": dict(self.diversity_gy),
            "summary": self.summary(),
        }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def item_names(report: ScoreReport) -> list[str]:
    """``"STRUCTURE LABEL"`` of every item of ``report``, ``#N`` appended to repeats (N >= 2)."""
    seen: dict[str, int] = {}
    out = []
    for item in report.items:
        base = f"{item.structure} {item.label}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base} #{seen[base]}")
    return out


def is_openkbp(case: Case) -> bool:
    """Whether the OpenKBP challenge scores apply: an OpenKBP case with a reference and a body."""
    return case.meta.get("format") == OPENKBP_FORMAT and case.dose is not None and case.body is not None


def mae_to_reference_gy(case: Case, dose_gy: np.ndarray) -> float | None:
    """Mean |dose - reference| (Gy) inside the body (all voxels without one); None without a reference."""
    if case.dose is None:
        return None
    body = None if case.body is None else torch.from_numpy(np.asarray(case.body, dtype=bool))
    return masked_mae_gy(torch.from_numpy(np.asarray(dose_gy)), torch.from_numpy(case.dose), body)


def outside_targets_mask(case: Case) -> np.ndarray | None:
    """The body's voxels outside every target (``case.targets``); None without a body or targets."""
    if case.body is None or not case.targets:
        return None
    inside = np.zeros(case.grid.shape, dtype=bool)
    for name in case.targets:
        inside |= np.asarray(case.structures[name], dtype=bool)
    outside = np.asarray(case.body, dtype=bool) & ~inside
    return outside if outside.any() else None


def mean_in(mask: np.ndarray | None, dose_gy: np.ndarray | None) -> float | None:
    """Mean of ``dose_gy`` over ``mask`` (Gy); None without either."""
    if mask is None or dose_gy is None:
        return None
    return float(np.asarray(dose_gy, dtype=np.float64)[mask].mean())


def diversity_gy(case: Case, doses: np.ndarray) -> float:
    """Mean over body voxels (all without a body) of the voxel std over ``doses`` ``(K, Z, Y, X)``, Gy."""
    std = np.asarray(doses, dtype=np.float64).std(axis=0)
    return float(std[case.body].mean() if case.body is not None and case.body.any() else std.mean())


def score_case(case: Case, card: Scorecard, dose_gy: np.ndarray, seed: int) -> tuple[CaseEval, list[float]]:
    """The :class:`CaseEval` of one prediction and its OpenKBP DVH errors (empty for other cases)."""
    report = card.score(case, dose_gy)
    if not math.isfinite(report.normalised) or not math.isfinite(report.total):
        raise AgentError(
            f"case {case.case_id!r} seed {seed}: card {card.name!r} gave a non-finite score "
            f"(total {report.total}, maximum {report.maximum}): it matches no item of the case"
        )
    statuses = {}
    for name, item in zip(item_names(report), report.items, strict=True):
        if item.status is not ItemStatus.UNMATCHED:
            statuses[name] = item.status
    dose_score = dvh_score = None
    errors: list[float] = []
    if is_openkbp(case):
        dose_score = openkbp_dose_score(case, dose_gy)
        errors = list(openkbp_dvh_errors(case, dose_gy).values())
        dvh_score = float(np.mean(errors)) if errors else None
    outside = outside_targets_mask(case)
    entry = CaseEval(
        case_id=case.case_id,
        seed=int(seed),
        card=card.name,
        points=float(report.total),
        maximum=float(report.maximum),
        normalised=float(report.normalised),
        items={n: s.value for n, s in statuses.items()},
        passed={n: s is PASS_STATUS for n, s in statuses.items()},
        mae_gy=mae_to_reference_gy(case, dose_gy),
        outside_targets_gy=mean_in(outside, dose_gy),
        reference_outside_targets_gy=mean_in(outside, case.dose),
        dose_score=dose_score,
        dvh_score=dvh_score,
    )
    return entry, errors


def evaluate(
    agent: Predictor,
    cases: Sequence[Case],
    seeds: Sequence[int] = (0,),
    diversity_samples: int = 0,
    progress: Callable[[int, int], None] | bool = False,
    keep_doses: int = 0,
    desc: str = "evaluate",
) -> EvalResult:
    """Score ``agent``'s predictions of ``cases`` at ``seeds`` (see the module docstring).

    ``progress``: True shows a tqdm bar (stderr); a callable is called ``(done, total)``
    after each prediction. ``keep_doses`` K: the first seed's doses of the first K cases are
    kept in ``result.doses`` (for pictures; -1: every case). ``desc``: the bar's label.
    """
    cases = list(cases)
    seeds = [int(s) for s in seeds]
    if not cases:
        raise AgentError("evaluate: no cases to evaluate (give at least one Case)")
    if not all(isinstance(c, Case) for c in cases):
        raise AgentError("evaluate: cases must be Case objects (read them with dosegym.data.read_case)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise AgentError(f"evaluate: seeds must be distinct and at least one, got {seeds}")
    k = int(diversity_samples)
    if k < 0 or k == 1:
        raise AgentError(f"evaluate: diversity_samples must be 0 (none) or >= 2, got {diversity_samples}")
    extra = [s for s in range(k) if s not in seeds]
    total = len(cases) * (len(seeds) + len(extra))
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="dose", leave=False)
    check = getattr(agent, "check_card_fit", None)
    if check is not None:
        check(cases)
    result = EvalResult(entries=[], seeds=seeds, diversity_samples=k)
    done = 0
    try:
        for case in cases:
            card = agent.card_for(case)
            doses: dict[int, np.ndarray] = {}
            for seed in [*seeds, *extra]:
                doses[seed] = np.asarray(agent.predict(case, seed))
                done += 1
                if bar is not None:
                    bar.update(1)
                elif callable(progress):
                    progress(done, total)
            if keep_doses < 0 or len(result.doses) < keep_doses:
                result.doses[case.case_id] = doses[seeds[0]]
            for seed in seeds:
                entry, errors = score_case(case, card, doses[seed], seed)
                result.entries.append(entry)
                result.dvh_errors.append(errors)
            if k:
                result.diversity_gy[case.case_id] = diversity_gy(case, np.stack([doses[s] for s in range(k)]))
    finally:
        if bar is not None:
            bar.close()
    return result
