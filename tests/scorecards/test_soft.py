"""Soft metrics converge to the exact ones, with useful gradients; piecewise-linear curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shared_data import PT_108, need

from dosegym.errors import ScorecardError
from dosegym.scorecards.curve import piecewise_linear
from dosegym.scorecards.metrics import MetricKind, MetricSpec
from dosegym.scorecards.metrics_torch import compute_metric_torch
from dosegym.scorecards.soft import soft_metric_torch, soft_piecewise_linear

K = MetricKind
TAUS = (1.0, 0.3, 0.1, 0.03)


@pytest.fixture(scope="module")
def ptv70():
    need(PT_108)
    from dosegym.data import read_case

    case = read_case(PT_108)
    return (
        torch.from_numpy(case.dose)[None],
        torch.from_numpy(case.structures["PTV70"]),
        torch.from_numpy(case.body),
        case.voxel_volume_cc,
    )


@pytest.mark.parametrize(
    "spec",
    [
        MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy"),
        MetricSpec(K.DOSE_AT_VOLUME, 2, "%", "Gy"),
        MetricSpec(K.DOSE_AT_VOLUME, 0.1, "cc", "Gy"),
        MetricSpec(K.MAX_DOSE, output_unit="Gy"),
        MetricSpec(K.VOLUME_AT_DOSE, 95, "%", "%"),
        MetricSpec(K.PADDICK_CI, 70, "Gy"),
    ],
    ids=lambda s: s.label,
)
def test_gap_to_the_exact_metric_shrinks_with_temperature(ptv70, spec):
    dose, mask, body, vox = ptv70
    kw = dict(voxel_volume_cc=vox, rx_gy=70.0, body=body)
    exact = float(compute_metric_torch(spec, dose, mask, **kw)[0])
    gaps = [abs(float(soft_metric_torch(spec, dose, mask, temperature=t, **kw)[0]) - exact) for t in TAUS]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.02 * max(abs(exact), 1.0)


def test_mean_and_integral_dose_are_exact(ptv70):
    dose, mask, _, vox = ptv70
    for spec in (MetricSpec(K.MEAN_DOSE, output_unit="Gy"), MetricSpec(K.INTEGRAL_DOSE)):
        exact = compute_metric_torch(spec, dose, mask, voxel_volume_cc=vox)
        soft = soft_metric_torch(spec, dose, mask, temperature=1.0, voxel_volume_cc=vox)
        torch.testing.assert_close(soft, exact, rtol=1e-6, atol=1e-6)


def test_d95_gradient_sits_on_voxels_near_the_quantile(ptv70):
    dose, mask, _, vox = ptv70
    tau = 0.1
    x = dose.clone().requires_grad_(True)
    d95 = soft_metric_torch(
        MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy"), x, mask, temperature=tau, voxel_volume_cc=vox
    )
    d95.sum().backward()
    grad = x.grad[0][mask]
    vals = dose[0][mask]
    assert torch.isfinite(x.grad).all()
    assert float(x.grad[0][~mask].abs().max()) == 0.0  # only the structure's voxels count
    assert float(grad.sum()) == pytest.approx(1.0, abs=1e-5)  # shifting every dose shifts D95
    near = (vals - d95.detach()[0]).abs() < tau
    far = (vals - d95.detach()[0]).abs() > 30 * tau
    assert near.any() and far.any()
    assert float(grad[near].min()) > 1e-6
    assert float(grad[far].abs().max()) < 1e-9 * float(grad.max())


def test_vx_gradient_is_positive_near_the_threshold():
    rng = np.random.default_rng(0)
    dose = torch.tensor(rng.uniform(40, 80, (1, 6, 6, 6)), requires_grad=True)
    mask = torch.ones(6, 6, 6, dtype=torch.bool)
    v = soft_metric_torch(
        MetricSpec(K.VOLUME_AT_DOSE, 60, "Gy", "cc"), dose, mask, temperature=0.5, voxel_volume_cc=1.0
    )
    v.sum().backward()
    g = dose.grad[0]
    close = (dose.detach()[0] - 60).abs() < 0.5
    assert (g[close] > 0.1).all()
    assert float(g[(dose.detach()[0] - 60).abs() > 15].max()) < 1e-10


def test_soft_dose_at_volume_has_the_implicit_function_gradient():
    rng = np.random.default_rng(4)
    dose = torch.tensor(rng.uniform(0, 10, (2, 3, 4, 5)), dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 4, 5, dtype=torch.bool)
    spec = MetricSpec(K.DOSE_AT_VOLUME, 40, "%", "Gy")

    def f(d):
        return soft_metric_torch(spec, d, mask, temperature=0.7, voxel_volume_cc=0.1)

    assert torch.autograd.gradcheck(f, (dose,), eps=1e-6, atol=1e-5)


def _bisected_root(dvh, v):
    """The soft Dx root by the plain 60-step bisection from the wide bracket (the old search)."""
    lower, upper, w = dvh._ramp_bounds()
    lo = lower.amin(dim=1, keepdim=True) - 50.0 * dvh.tau
    hi = upper.amax(dim=1, keepdim=True) + 50.0 * dvh.tau
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        too_much = (dvh._soft_volume(mid, lower, upper, w) > v)[:, None]
        lo, hi = torch.where(too_much, mid, lo), torch.where(too_much, hi, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0, 3.0])
def test_soft_dose_at_volume_root_is_the_bisected_one(tau):
    """The bracketed, truncated Newton search finds the root of the wide bisection, at every
    volume from the near-extremes (where the tight bracket fails and the wide one is used)
    inside; doses with gaps, ties and a single far outlier; weighted (fractional) voxels. The
    roots agree to 1e-7 tau and the final (full-set) Newton values to 1e-8 (1 + tau) Gy: in the
    far tails (D99.9999 %) V_soft is so flat that the bisection's own root is only that good."""
    from dosegym.scorecards.soft import SoftDVH

    rng = np.random.default_rng(7)
    parts = [rng.uniform(0, 5, (3, 400)), rng.uniform(60, 70, (3, 400)), np.full((3, 50), 30.0)]
    values = torch.tensor(np.concatenate(parts, 1), dtype=torch.float64)
    values[1, 0] = 200.0
    weights = torch.tensor(rng.uniform(0.2, 1.0, values.shape[1]), dtype=torch.float64)
    for w in (None, weights):
        dvh = SoftDVH(values, w, 0.1, tau)
        for pct in (1e-4, 0.01, 1.0, 2.0, 30.0, 50.0, 51.5, 95.0, 99.99, 99.9999):
            v = pct / 100.0 * dvh.total_volume_cc
            lower, upper, ww = dvh._ramp_bounds()
            ref = _bisected_root(dvh, v)
            got = dvh._root(v, lower, upper, ww)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-7 * tau + 1e-12)
            slope = dvh._soft_volume_slope(ref, lower, upper, ww)
            final = [r.squeeze(1) - (dvh._soft_volume(r, lower, upper, ww) - v) / slope for r in (got, ref)]
            np.testing.assert_allclose(final[0].numpy(), final[1].numpy(), rtol=0, atol=1e-8 * (1 + tau))


def test_soft_errors():
    dose = torch.zeros(1, 3, 3, 3)
    mask = torch.ones(3, 3, 3, dtype=torch.bool)
    with pytest.raises(ScorecardError, match="temperature"):
        soft_metric_torch(
            MetricSpec(K.MEAN_DOSE, output_unit="Gy"), dose, mask, temperature=0.0, voxel_volume_cc=1.0
        )
    with pytest.raises(ScorecardError, match="body"):
        soft_metric_torch(
            MetricSpec(K.CONFORMITY_INDEX, 1, "Gy"), dose, mask, temperature=0.1, voxel_volume_cc=1.0
        )


# -- piecewise-linear curves ----------------------------------------------------------------

XS, YS = [10.0, 20.0, 30.0], [0.0, 4.0, 10.0]


def test_piecewise_linear_interpolates_and_clamps():
    assert piecewise_linear(15.0, XS, YS) == pytest.approx(2.0)
    assert piecewise_linear(25.0, XS, YS) == pytest.approx(7.0)
    assert piecewise_linear(-5.0, XS, YS) == 0.0
    assert piecewise_linear(99.0, XS, YS) == 10.0
    assert piecewise_linear(20.0, XS, YS) == 4.0
    np.testing.assert_allclose(piecewise_linear(np.array([10.0, 12.5, 30.0]), XS, YS), [0.0, 1.0, 10.0])
    assert piecewise_linear(3.0, [5.0], [7.0]) == 7.0  # one point: a constant
    # a repeated x jumps and takes the right-hand value there
    assert piecewise_linear(20.0, [10, 20, 20, 30], [0, 4, 8, 10]) == 8.0
    assert piecewise_linear(19.0, [10, 20, 20, 30], [0, 4, 8, 10]) == pytest.approx(3.6)


def test_soft_piecewise_linear_matches_numpy_and_has_segment_slopes():
    x = torch.tensor([-5.0, 10.0, 12.5, 19.0, 25.0, 30.0, 40.0], dtype=torch.float64, requires_grad=True)
    y = soft_piecewise_linear(x, XS, YS)
    np.testing.assert_allclose(y.detach().numpy(), piecewise_linear(x.detach().numpy(), XS, YS))
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy()[[0, 2, 3, 4, 6]], [0.0, 0.4, 0.4, 0.6, 0.0])


def test_piecewise_linear_rejects_bad_curves():
    with pytest.raises(ScorecardError, match="ascending"):
        piecewise_linear(1.0, [3, 2, 1], [0, 1, 2])
    with pytest.raises(ScorecardError, match="as many"):
        soft_piecewise_linear(torch.tensor(1.0), [1, 2], [0])
    with pytest.raises(ScorecardError, match="finite"):
        piecewise_linear(1.0, [1, float("nan")], [0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_soft_metrics_on_cuda_match_cpu():
    rng = np.random.default_rng(3)
    dose = torch.from_numpy(rng.gamma(4.0, 10.0, (4, 24, 24, 24)).astype(np.float32))
    mask = torch.zeros(24, 24, 24, dtype=torch.bool)
    mask[4:20, 6:18, 2:22] = True
    for spec in (MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy"), MetricSpec(K.VOLUME_AT_DOSE, 30, "Gy", "%")):
        cpu = soft_metric_torch(spec, dose, mask, temperature=0.3, voxel_volume_cc=0.027)
        x = dose.cuda().requires_grad_(True)
        gpu = soft_metric_torch(spec, x, mask.cuda(), temperature=0.3, voxel_volume_cc=0.027)
        gpu.sum().backward()
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)
        assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
