"""SoftItems (every soft item at once, closed-form gradients) against the one-item engine.

The reference is what ``SoftScorecard`` ran before SoftItems: ``soft_metric_torch`` item by
item (autograd through ``SoftDVH``), and guidance by one ``autograd.grad`` per objective group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dosegym.data import Case, Grid, Prescription
from dosegym.errors import ScorecardError
from dosegym.scorecards import GROUP_NAMES, Scorecard, SoftScorecard
from dosegym.scorecards.soft import soft_metric_torch

TAU = 0.7


@pytest.fixture(scope="module")
def case() -> Case:
    shape, spacing = (12, 16, 16), (2.5, 2.0, 2.0)
    idx = np.indices(shape).astype(float)
    r = np.sqrt(sum((idx[a] * spacing[a] - c) ** 2 for a, c in zip(range(3), (15.0, 16.0, 16.0))))
    body = np.zeros(shape, bool)
    body[1:-1, 1:-1, 1:-1] = True
    ptv, ctv = r <= 7.0, r <= 4.0
    cord = np.zeros(shape, bool)
    cord[2:-2, 12:14, 7:9] = True
    dist = ndimage.distance_transform_edt(~ptv, sampling=spacing)
    rng = np.random.default_rng(5)
    dose = (60.0 * np.exp(-dist / 8.0) + rng.normal(0, 1.5, shape)) * body
    dose[ptv] = rng.uniform(56.0, 65.0, int(ptv.sum()))
    dose[ptv][:5] = 61.0  # ties
    return Case(
        case_id="toy",
        grid=Grid(shape, spacing),
        structures={"PTV": ptv, "CTV": ctv, "SpinalCord": cord},
        prescriptions=[Prescription("PTV", 60.0, 30)],
        dose=dose.astype(np.float32),
        body=body,
    )


def _item(structure, metric, value=None, input_unit=None, output_unit=None, points=((0, 0), (100, 10)), **kw):
    return dict(
        structure=structure,
        metric=metric,
        value=value,
        input_unit=input_unit,
        output_unit=output_unit,
        points=[list(p) for p in points],
        **kw,
    )


ITEMS = [
    _item("PTV", "DoseAtVolume", 95, "%", "Gy", ((55, 0), (60, 10))),
    _item("PTV", "DoseAtVolume", 2, "%", "%", ((110, 5), (100, 0))),
    _item("PTV", "DoseAtVolume", 0.1, "cc", "Gy", ((70, 5), (62, 0))),
    _item("PTV", "DoseAtVolume", 0, "%", "Gy", ((70, 5), (62, 0))),  # the soft max
    _item("PTV", "DoseAtVolume", 100, "%", "Gy", ((50, 0), (58, 5))),  # the soft min
    _item("PTV", "VolumeAtDose", 60, "Gy", "%", ((80, 0), (95, 5))),
    _item("PTV - CTV", "VolumeAtDose", 63, "Gy", "cc", ((5, 5), (0, 0))),
    _item("PTV", "MeanDose", output_unit="Gy", points=((58, 0), (60, 5))),
    _item("SpinalCord", "MaxDose", output_unit="Gy", points=((45, 5), (60, 0))),
    _item("SpinalCord", "MinDose", output_unit="cGy", points=((0, 5), (5000, 0))),
    _item("SpinalCord", "NearMaxDose", output_unit="Gy", points=((45, 5), (60, 0))),
    _item("SpinalCord", "DoseAtSubVolume", 0.2, "cc", "Gy", ((20, 5), (40, 0))),
    _item("CTV", "ConformityIndex", 60, "Gy", points=((1, 5), (3, 0))),
    _item("CTV", "ConformationNumber", 60, "Gy", points=((0, 0), (1, 5))),
    _item("PTV", "PaddickConformityIndex", 60, "Gy", points=((0, 0), (1, 5))),
    _item("PTV", "HomogeneityIndex", points=((0.3, 0), (0.0, 5))),
    _item("PTV", "HomogeneityIndex", input_unit="%", target_value=100, points=((0.3, 0), (0.0, 5))),
    _item("PTV", "InhomogeneityIndex", points=((0.3, 0), (0.0, 5))),
    _item("PTV", "GradientIndex", 60, "Gy", points=((6, 0), (2, 5))),
    _item("PTV", "ModifiedGradientIndex", input_unit="Gy", lo_value=30, hi_value=60, points=((6, 0), (1, 5))),
    _item("PTV", "VolumeOfRegret", 60, "Gy", "cc", ((20, 0), (0, 5))),
    _item("SpinalCord", "IntegralDose", points=((5, 0), (0, 5))),
    _item("Absent", "MeanDose", output_unit="Gy", optional=True),
]


@pytest.fixture(scope="module")
def soft(case) -> SoftScorecard:
    card = Scorecard.from_dict(
        {"name": "every kind", "prescription_gy": 60.0, "fractions": 30, "items": ITEMS}
    )
    return SoftScorecard(card.bind(case, on_unmatched="report"))


def _reference_metrics(soft: SoftScorecard, dose: torch.Tensor, tau: float) -> torch.Tensor:
    """The metrics item by item with the one-item engine (NaN for unmatched)."""
    cols = []
    for item, t in zip(soft.items, soft.item_tensors(dose.device)):
        if t is None:
            cols.append(torch.full((dose.shape[0],), torch.nan, dtype=dose.dtype))
            continue
        kw = dict(voxel_volume_cc=soft.bound.case.voxel_volume_cc, rx_gy=soft.bound.reference_gy)
        cols.append(
            soft_metric_torch(
                item.spec, dose, t.mask, temperature=tau, body=t.body, occupancy=t.occupancy, **kw
            )
        )
    return torch.stack(cols, dim=1)


def _doses(case, dtype):
    base = torch.from_numpy(case.dose.astype(np.float64))
    noise = torch.from_numpy(np.random.default_rng(1).normal(0, 2.0, case.dose.shape))
    return torch.stack([base, base * 1.04 + noise]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_metrics_and_their_gradients_are_the_one_item_engines(case, soft, dtype):
    dose = _doses(case, dtype).requires_grad_(True)
    got = soft.metrics(dose, temperature=TAU)
    ref_dose = dose.detach().clone().requires_grad_(True)
    ref = _reference_metrics(soft, ref_dose, TAU)
    assert got.dtype == dtype and got.shape == (2, len(ITEMS))
    assert torch.isnan(got[:, -1]).all() and not torch.isnan(got[:, :-1]).any()
    rtol = 1e-9 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got[:, :-1], ref[:, :-1], rtol=rtol, atol=rtol)
    weights = torch.from_numpy(np.random.default_rng(2).normal(size=(2, len(ITEMS) - 1))).to(dtype)
    (grad,) = torch.autograd.grad((got[:, :-1] * weights).sum(), dose)
    (want,) = torch.autograd.grad((ref[:, :-1] * weights).sum(), ref_dose)
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-5 * scale)
    hi = 15  # HomogeneityIndex: a ratio, so its gradient depends on the primitives
    assert ITEMS[hi]["metric"] == "HomogeneityIndex"
    with pytest.raises(RuntimeError, match="twice"):  # once differentiable: never a silent 0
        (g,) = torch.autograd.grad(soft.metrics(dose, temperature=TAU)[:, hi].sum(), dose, create_graph=True)
        g.sum().backward()


def _reference_directions(soft: SoftScorecard, x: torch.Tensor, gain: torch.Tensor, tau: float):
    """The autograd guidance this replaced: dose = gain * x, one ``autograd.grad`` per group."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        both = _reference_metrics(soft, torch.cat([x * gain, (x * gain).clamp_min(0).detach()]), tau)
        dirs = torch.zeros((len(GROUP_NAMES), *x.shape[1:]), dtype=x.dtype)
        for g, idx in enumerate(soft.groups):
            if idx:
                slope = torch.as_tensor(soft.slopes[idx], dtype=both.dtype)
                (grad,) = torch.autograd.grad((both[0, idx] * slope).sum(), x, retain_graph=True)
                if float(grad.abs().max()) > 0:
                    dirs[g] = (grad / grad.abs().max())[0]
    items = soft.item_scores(soft.points(both[1:].detach()))
    return items[0], dirs


@pytest.mark.parametrize("shift", [0.0, -20.0])  # -20 Gy: the scored (clamped) dose differs
def test_group_directions_are_the_autograd_ones(case, soft, shift):
    gain = torch.from_numpy(case.body.astype(np.float32)) * 70.0
    x = (torch.from_numpy(case.dose)[None] + shift) / 70.0
    items, dirs = soft.group_directions(x * gain, (x * gain).clamp_min(0), temperature=TAU, gain=gain)
    ref_items, ref_dirs = _reference_directions(soft, x, gain, TAU)
    torch.testing.assert_close(items[0], ref_items, rtol=1e-6, atol=1e-6, equal_nan=True)
    dense = dirs.dense()[0]
    assert dense.shape == (len(GROUP_NAMES), *case.grid.shape)
    live = [g for g, idx in enumerate(soft.groups) if idx]
    assert len(live) >= 3 and all(float(dense[g].abs().max()) == pytest.approx(1.0) for g in live)
    torch.testing.assert_close(dense, ref_dirs, rtol=0, atol=1e-5)
    weights = torch.linspace(0, 1, len(GROUP_NAMES))
    torch.testing.assert_close(
        dirs.combine(weights[None])[0], (weights[:, None, None, None] * dense).sum(0), rtol=0, atol=1e-6
    )


def test_a_batch_is_its_samples(case, soft):
    """One search for the batch: each sample's scores and directions as when alone."""
    gain = torch.from_numpy(case.body.astype(np.float32)) * 70.0
    x = torch.stack([torch.from_numpy(case.dose), torch.from_numpy(case.dose) * 0.9 - 3.0]) / 70.0
    items, dirs = soft.group_directions(x * gain, (x * gain).clamp_min(0), temperature=TAU, gain=gain)
    assert items.shape == (2, len(ITEMS)) and dirs.values.shape[:2] == (2, len(GROUP_NAMES))
    for i in range(2):
        one = x[i : i + 1] * gain
        alone_items, alone = soft.group_directions(one, one.clamp_min(0), temperature=TAU, gain=gain)
        torch.testing.assert_close(items[i : i + 1], alone_items, rtol=1e-6, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(dirs.values[i : i + 1], alone.values, rtol=0, atol=1e-6)


def test_nan_names_the_item_and_bad_inputs_raise(case, soft):
    dose = _doses(case, torch.float32)
    dose[1][case.structures["SpinalCord"]] = torch.nan
    with pytest.raises(ScorecardError, match=r"SpinalCord.*NaN"):
        soft.metrics(dose, temperature=TAU)
    with pytest.raises(ScorecardError, match="temperature"):
        soft.metrics(_doses(case, torch.float32), temperature=0.0)
    with pytest.raises(ScorecardError, match="shape"):
        soft.metrics(_doses(case, torch.float32)[:, 1:], temperature=TAU)


def test_a_card_with_every_item_unmatched_gives_nan_and_no_direction(case):
    card = Scorecard.from_dict(
        {"name": "none", "prescription_gy": 60.0, "fractions": 30, "items": [ITEMS[-1], ITEMS[-1]]}
    )
    soft = SoftScorecard(card.bind(case, on_unmatched="report"))
    dose = _doses(case, torch.float32)
    assert torch.isnan(soft.metrics(dose, temperature=TAU)).all()
    items, dirs = soft.group_directions(dose[:1], dose[:1], temperature=TAU)
    assert torch.isnan(items).all() and float(dirs.dense().abs().max()) == 0.0
