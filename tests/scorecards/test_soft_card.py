"""SoftScorecard: the one torch scorer of a binding (no torch on import, agrees with numpy at
low temperature, and GuidedDose's guidance directions are those of the code it replaced)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dosegym.data.grid import Grid
from dosegym.data.phantoms import load_shipped_phantom
from dosegym.scorecards import GROUP_NAMES, SoftScorecard, load_card, model_grid_case

FIXTURE = Path(__file__).parent / "data" / "guidance_prostate0.json"


def test_import_scorecards_does_not_import_torch():
    code = "import sys, dosegym.scorecards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def phantom():
    return load_shipped_phantom("prostate", 0)


def test_soft_total_is_the_numpy_score_at_low_temperature(phantom):
    """At 0.01 Gy the soft total is within 0.05 points (0.1 % of the card's 52) of numpy's,
    on doses whose items sit on their curves' slopes (0.95 x and 1.05 x the plan)."""
    bound = load_card("phantom_prostate").bind(phantom)
    soft = SoftScorecard(bound)
    doses = np.stack([phantom.dose * f for f in (0.95, 1.0, 1.05)]).astype(np.float64)
    refs = [bound.score(d, allow_high=True) for d in doses]
    assert len({r.total for r in refs}) == 3 and refs[1].total == refs[1].maximum == 52
    exact = soft.score(torch.from_numpy(doses))
    np.testing.assert_allclose(exact.total.numpy(), [r.total for r in refs], atol=1e-9)
    cold = soft.score(torch.from_numpy(doses), temperature=0.01)
    np.testing.assert_allclose(cold.total.numpy(), [r.total for r in refs], atol=0.05)
    np.testing.assert_allclose(cold.normalised.numpy(), [r.normalised for r in refs], atol=0.05 / 52)
    points = cold.points.numpy()[:, cold.matched.numpy()]
    np.testing.assert_allclose(points, [[i.points for i in r.items] for r in refs], atol=0.05)


class _BlockMean:
    """A stand-in for the diffusion ``Resampler``: 2 x 2 x 2 block means (the fixture's grid)."""

    def __init__(self, case):
        g = case.grid
        self.shape = tuple(s // 2 for s in g.shape)
        self.model_grid = Grid(
            self.shape,
            tuple(2 * s for s in g.spacing_mm),
            tuple(o + 0.5 * s for o, s in zip(g.origin_mm, g.spacing_mm)),
        )
        self.rx_max_gy = float(case.max_prescription_gy)

    def down(self, a: np.ndarray) -> np.ndarray:
        z, y, x = self.shape
        return a[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5)).astype(np.float32)

    def to_model(self, a: np.ndarray, mode: str) -> torch.Tensor:
        assert mode == "linear"
        return torch.from_numpy(self.down(a))


def test_guided_group_directions_are_unchanged(phantom):
    """The fixture was written by the code this replaced (``envs.base.SoftScorer`` at 754d10e,
    now ``envs.guidance.SoftScorer`` over ``SoftScorecard``); item scores are bit-exact."""
    from dosegym.envs.guidance import SoftScorer

    ref = json.loads(FIXTURE.read_text())
    res = _BlockMean(phantom)
    scorer = SoftScorer(load_card("phantom_prostate"), phantom, res, 1.0)
    rng = np.random.default_rng(0)
    x0 = res.down(phantom.dose) / res.rx_max_gy + 0.05 * rng.standard_normal(res.shape).astype(np.float32)
    x0 = torch.from_numpy(x0.astype(np.float32))[None, None]
    items, dirs = scorer.group_directions(x0)
    d = dirs.double().numpy().reshape(len(GROUP_NAMES), -1)
    idx = rng.integers(0, d.shape[1], 32)
    assert scorer.soft.groups == ref["groups"]
    assert idx.tolist() == ref["voxels"]
    np.testing.assert_array_equal(items.double().numpy(), ref["items"])
    np.testing.assert_array_equal(scorer.item_scores(x0)[0].double().numpy(), ref["item_scores"])
    # directions (peak 1) from closed-form gradients: the autograd ones to float rounding
    np.testing.assert_allclose(d.sum(1), ref["sum"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(d).sum(1), ref["abs_sum"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d[:, idx], ref["at_voxels"], rtol=1e-5, atol=1e-6)
    mcase = model_grid_case(phantom, res.model_grid, res.down)
    assert mcase.grid == res.model_grid and mcase.body is not None


def test_guidance_is_taken_at_the_decoded_dose_straight_through_the_clamp(phantom):
    """Scores and gradients of x̂0 at the decoded (clamped) dose, the gradient passed through the
    clamp: voxels where x̂0 < 0 are guided (mean-dose groups move them as any other voxel)."""
    from dosegym.envs.guidance import SoftScorer

    res = _BlockMean(phantom)
    scorer = SoftScorer(load_card("phantom_prostate"), phantom, res, 1.0)
    x0 = torch.from_numpy(res.down(phantom.dose) / res.rx_max_gy - 0.3)[None, None]
    items, dirs = scorer.guidance(x0)
    dose = scorer.dose_gy(x0)
    gain = scorer._gain[(str(x0.device), x0.dtype)]
    ref_items, ref_dirs = scorer.soft.group_directions(dose, dose, temperature=1.0, gain=gain)
    torch.testing.assert_close(items, ref_items, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dirs.values, ref_dirs.values, rtol=0, atol=0)
    torch.testing.assert_close(items, scorer.item_scores(x0), rtol=1e-6, atol=1e-7, equal_nan=True)
    dense = dirs.dense()[0, :, 0]
    negative = (x0[0, 0] < 0) & (gain > 0)
    assert int(negative.sum()) > 100
    assert float(dense[:, negative].abs().amax()) > 0.1  # the clamp's zero gradient would stop these
