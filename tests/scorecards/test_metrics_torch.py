"""compute_metric_torch agrees with compute_metric (one definition), batched, CPU and CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shared_data import PT_108, need

from dosegym.errors import ScorecardError
from dosegym.scorecards.dvh import DVHCache
from dosegym.scorecards.metrics import MetricKind, MetricSpec, compute_metric
from dosegym.scorecards.metrics_torch import TorchDVHCache, compute_metric_torch

K = MetricKind
TOL_GY = 1e-4

SPECS = [
    MetricSpec(K.MIN_DOSE, output_unit="Gy"),
    MetricSpec(K.MAX_DOSE, output_unit="Gy"),
    MetricSpec(K.MEAN_DOSE, output_unit="cGy"),
    MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy"),
    MetricSpec(K.DOSE_AT_VOLUME, 2, "%", "%"),
    MetricSpec(K.DOSE_AT_VOLUME, 0.1, "cc", "Gy"),
    MetricSpec(K.VOLUME_AT_DOSE, 30, "Gy", "%"),
    MetricSpec(K.VOLUME_AT_DOSE, 95, "%", "cc"),
    MetricSpec(K.DOSE_AT_SUBVOLUME, 0.05, "cc", "Gy"),
    MetricSpec(K.NEAR_MAX_DOSE, output_unit="Gy"),
    MetricSpec(K.CONFORMATION_NUMBER, 40, "Gy"),
    MetricSpec(K.PADDICK_CI, 95, "%"),
    MetricSpec(K.CONFORMITY_INDEX, 40, "Gy"),
    MetricSpec(K.HOMOGENEITY_INDEX),
    MetricSpec(K.INHOMOGENEITY_INDEX),
    MetricSpec(K.GRADIENT_INDEX),
    MetricSpec(K.MODIFIED_GRADIENT_INDEX, input_unit="Gy", lo_value=20, hi_value=40),
    MetricSpec(K.VOLUME_OF_REGRET, 40, "Gy", "cc"),
    MetricSpec(K.INTEGRAL_DOSE),
]


def _assert_close(spec, got: np.ndarray, want: np.ndarray) -> None:
    # doses within 1e-4 Gy (cGy: 1e-2); volumes and indices to the same relative precision
    scale = 100.0 if spec.output_unit == "cGy" else 1.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=TOL_GY * scale, err_msg=spec.label)


@pytest.mark.parametrize("with_occupancy", [False, True])
def test_random_batch_matches_numpy_for_every_kind(with_occupancy):
    rng = np.random.default_rng(7)
    dose = rng.gamma(4.0, 10.0, (3, 12, 14, 16)).astype(np.float32)
    mask = np.zeros(dose.shape[1:], bool)
    mask[3:9, 2:11, 4:13] = True
    body = np.ones(mask.shape, bool)
    occ = rng.uniform(0.0, 1.0, mask.shape).astype(np.float32) if with_occupancy else None
    for spec in SPECS:
        want = [
            compute_metric(spec, d, mask, voxel_volume_cc=0.027, rx_gy=50.0, body=body, occupancy=occ)
            for d in dose
        ]
        got = compute_metric_torch(
            spec,
            torch.from_numpy(dose),
            torch.from_numpy(mask),
            voxel_volume_cc=0.027,
            rx_gy=50.0,
            body=torch.from_numpy(body),
            occupancy=None if occ is None else torch.from_numpy(occ),
        )
        assert got.shape == (3,)
        _assert_close(spec, got.numpy(), np.array(want))


def test_real_openkbp_dose_matches_numpy():
    need(PT_108)
    from dosegym.data import read_case

    case = read_case(PT_108)
    dose_t = torch.from_numpy(case.dose)[None]
    body_t = torch.from_numpy(case.body)
    cache = DVHCache(case.dose, case.voxel_volume_cc)
    cache_t = TorchDVHCache(dose_t, case.voxel_volume_cc)
    for mask in case.structures.values():
        mask_t = torch.from_numpy(mask)
        for spec in SPECS:
            kw = dict(voxel_volume_cc=case.voxel_volume_cc, rx_gy=70.0)
            want = compute_metric(spec, case.dose, mask, body=case.body, cache=cache, **kw)
            got = compute_metric_torch(spec, dose_t, mask_t, body=body_t, cache=cache_t, **kw)
            _assert_close(spec, got.numpy(), np.array([want]))


def test_single_volume_gives_a_scalar_and_gradients_flow():
    rng = np.random.default_rng(1)
    dose = torch.tensor(rng.uniform(0, 60, (8, 8, 8)), dtype=torch.float32, requires_grad=True)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:6, 2:6, 2:6] = True
    d95 = compute_metric_torch(MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy"), dose, mask, voxel_volume_cc=0.1)
    assert d95.ndim == 0
    d95.backward()
    # the exact D95 interpolates two voxel doses: its gradient sits on at most two voxels
    nz = int((dose.grad != 0).sum())
    assert 1 <= nz <= 2
    assert float(dose.grad.sum()) == pytest.approx(1.0)


def test_errors():
    dose = torch.zeros(1, 4, 4, 4)
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    spec = MetricSpec(K.MEAN_DOSE, output_unit="Gy")
    with pytest.raises(ScorecardError, match="empty"):
        compute_metric_torch(spec, dose, mask, voxel_volume_cc=1.0)
    mask[0, 0, 0] = True
    nan = dose.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ScorecardError, match="dose contains NaN: refusing to score"):
        compute_metric_torch(spec, nan, mask, voxel_volume_cc=1.0)
    with pytest.raises(ScorecardError, match="bool"):
        compute_metric_torch(spec, dose, mask.float(), voxel_volume_cc=1.0)
    with pytest.raises(ScorecardError, match="body"):
        compute_metric_torch(MetricSpec(K.GRADIENT_INDEX, 10, "Gy"), dose, mask, voxel_volume_cc=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    dose = torch.from_numpy(rng.gamma(4.0, 10.0, (4, 32, 32, 32)).astype(np.float32))
    mask = torch.zeros(32, 32, 32, dtype=torch.bool)
    mask[8:24, 6:20, 10:30] = True
    body = torch.ones_like(mask)
    for spec in SPECS:
        kw = dict(voxel_volume_cc=0.027, rx_gy=50.0)
        cpu = compute_metric_torch(spec, dose, mask, body=body, **kw)
        gpu = compute_metric_torch(spec, dose.cuda(), mask.cuda(), body=body.cuda(), **kw)
        assert gpu.device.type == "cuda"
        _assert_close(spec, gpu.cpu().numpy(), cpu.numpy())
