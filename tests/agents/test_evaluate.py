"""``dosegym.agents.evaluate``: exact-card scores, per-item pass, MAE, OpenKBP scores, diversity."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import PT_201, need

from dosegym import agents
from dosegym.agents.evaluate import PolicyPredictor, evaluate, item_names
from dosegym.errors import AgentError
from dosegym.scorecards.challenge import openkbp_scores
from dosegym.scorecards.registry import load_card


class Fixed:
    """A predictor that returns given doses (seed -> dose) and scores with one card."""

    def __init__(self, card, doses):
        self.card, self.doses, self.calls = card, doses, []

    def predict(self, case, seed=0):
        self.calls.append(seed)
        return self.doses[seed]

    def card_for(self, case):
        return self.card


def test_reference_dose_scores_like_the_card(headneck28):
    card = load_card("phantom_headneck")
    ref = headneck28.dose
    r = evaluate(Fixed(card, {0: ref, 1: ref * 0.9}), [headneck28], seeds=(0, 1))
    report = card.score(headneck28, ref)
    e0, e1 = r.entries
    assert (e0.case_id, e0.seed, e1.seed) == (headneck28.case_id, 0, 1)
    assert e0.points == report.total and e0.normalised == pytest.approx(report.normalised)
    assert e0.mae_gy == 0.0
    body = headneck28.body
    assert e1.mae_gy == pytest.approx(float(np.abs(0.1 * ref[body]).mean()), rel=1e-5)
    # 90 % of the reference underdoses the PTV70: its D95 item fails to reach the goal
    assert e0.passed["PTV70 D95% [Gy]"] and not e1.passed["PTV70 D95% [Gy]"]
    assert e1.items["PTV70 D95% [Gy]"] in ("good", "fail", "variation")
    # the body outside both PTVs: the reference's own mean there, and 90 % of it
    outside = body & ~headneck28.structures["PTV70"] & ~headneck28.structures["PTV56"]
    assert headneck28.targets == ["PTV70", "PTV56"] and outside.sum() < body.sum()
    assert e0.outside_targets_gy == pytest.approx(float(ref[outside].mean()), rel=1e-6)
    assert e1.outside_targets_gy == pytest.approx(0.9 * e0.outside_targets_gy, rel=1e-6)
    assert e1.reference_outside_targets_gy == e0.outside_targets_gy
    s = r.summary()
    assert s["score_mean"] == pytest.approx((e0.normalised + e1.normalised) / 2)
    assert s["outside_targets_gy"] == pytest.approx(0.95 * e0.outside_targets_gy, rel=1e-6)
    assert s["pass_rate"]["PTV70 D95% [Gy]"] == 0.5
    assert s["dose_score"] is None and s["dvh_score"] is None and s["diversity_gy"] is None
    assert set(r.to_dict()) == {"seeds", "diversity_samples", "cases", "diversity_gy", "summary"}


def test_diversity_reuses_the_scoring_seeds(headneck28):
    card = load_card("phantom_headneck")
    ref = headneck28.dose
    doses = {0: ref, 1: ref + 1.0, 2: ref + 2.0}
    pred = Fixed(card, doses)
    r = evaluate(pred, [headneck28], seeds=(1,), diversity_samples=3)
    assert sorted(pred.calls) == [0, 1, 2]  # seed 1 predicted once
    std = np.std([0.0, 1.0, 2.0])
    assert r.diversity_gy[headneck28.case_id] == pytest.approx(std, rel=1e-5)
    assert r.summary()["diversity_gy"] == pytest.approx(std, rel=1e-5)


def test_bad_arguments_are_named(headneck28):
    card = load_card("phantom_headneck")
    pred = Fixed(card, {0: headneck28.dose})
    with pytest.raises(AgentError, match="diversity_samples must be 0"):
        evaluate(pred, [headneck28], diversity_samples=1)
    with pytest.raises(AgentError, match="seeds must be distinct"):
        evaluate(pred, [headneck28], seeds=(0, 0))
    with pytest.raises(AgentError, match="no cases"):
        evaluate(pred, [])


def test_pretrained_policy_and_agent_evaluate_alike(tiny_policy, env, headneck28):
    """The "before" numbers: the policy through PolicyPredictor equals a fresh agent's."""
    before = evaluate(PolicyPredictor(tiny_policy, "phantom_headneck", steps=2), [headneck28], (0, 1))
    agent = agents.get("best_of_n")(env, tiny_policy, {"n": 1, "sample_num_steps": 2})
    same = evaluate(agent, [headneck28], (0, 1))
    assert before.to_dict() == same.to_dict()
    seen = []
    evaluate(agent, [headneck28], (0,), diversity_samples=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]


def test_item_names_are_unique(headneck28):
    report = load_card("phantom_headneck").score(headneck28)
    names = item_names(report)
    assert len(set(names)) == len(names) and "PTV70 D95% [Gy]" in names


def test_openkbp_case_gets_the_challenge_scores():
    from dosegym.data.io import read_case

    case = read_case(need(PT_201))
    card = load_card("headneck_rtog")
    pred = case.dose * 0.95
    r = evaluate(Fixed(card, {0: pred}), [case])
    e = r.entries[0]
    organisers = openkbp_scores([(case, pred)])
    assert e.dose_score == pytest.approx(organisers.dose_score)
    assert e.dvh_score == pytest.approx(organisers.dvh_score)
    assert r.summary()["dvh_score"] == pytest.approx(organisers.dvh_score)
    assert e.mae_gy > 0 and 0 < e.normalised <= 1
