"""The dense training score: points continue past each curve's failing end, nowhere else."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dosegym.scorecards.dense import dense_normalised, failing_end_points


def fake_card(curves, matched):
    return SimpleNamespace(items=[SimpleNamespace(curve=c) for c in curves], matched=np.array(matched))


def test_failing_end_points_by_hand():
    card = fake_card(
        [
            ([66.0, 70.0], [0.0, 10.0]),  # a target's D95: 2.5 points per Gy, fails low
            ([20.0, 30.0], [5.0, 0.0]),  # an OAR's Dmean: 0.5 points per Gy, fails high
            ([1.0, 2.0, 3.0], [0.0, 4.0, 0.0]),  # a peak: both ends fail, mean slope 2
            ([0.0, 1.0], [3.0, 3.0]),  # flat: nothing to follow
            ([0.0, 1.0], [0.0, 1.0]),  # unmatched
        ],
        [True, True, True, True, False],
    )
    metrics = torch.tensor(
        [
            [64.0, 35.0, 0.5, 9.0, -5.0],  # past every failing end
            [71.0, 15.0, 2.0, 9.0, -5.0],  # past the best ends, or inside: nothing
        ],
        dtype=torch.float64,
    )
    extra = failing_end_points(card, metrics, leak=1.0)
    assert extra[0].tolist() == pytest.approx([-5.0, -2.5, -1.0, 0.0, 0.0])
    assert extra[1].tolist() == [0.0] * 5
    assert failing_end_points(card, metrics, leak=0.5)[0, 0] == pytest.approx(-2.5)
    assert (failing_end_points(card, metrics, leak=0.0) == 0).all()


def test_dense_score_separates_samples_the_card_ties(headneck28_soft):
    """Two doses that fail the targets by 2 and by 6 Gy: one exact score, two dense ones."""
    soft, dose = headneck28_soft
    low, lower = dose * 0.90, dose * 0.85
    exact = [float(soft.score(d[None]).normalised[0]) for d in (low, lower)]
    dense = dense_normalised(soft, torch.stack([low, lower]), temperature=1.0, leak=1.0)
    flat = dense_normalised(soft, torch.stack([low, lower]), temperature=1.0, leak=0.0)
    assert dense[0] > dense[1] and (dense <= flat + 1e-12).all()
    assert exact[0] - exact[1] < dense[0] - dense[1]


@pytest.fixture(scope="module")
def headneck28_soft():
    from dosegym.data.io import read_case
    from dosegym.scorecards import load_card
    from dosegym.scorecards.soft_card import SoftScorecard

    case = read_case("phantoms:headneck/28")
    soft = SoftScorecard(load_card("phantom_headneck").bind(case, on_unmatched="report"))
    return soft, torch.from_numpy(case.dose.astype(np.float64))
