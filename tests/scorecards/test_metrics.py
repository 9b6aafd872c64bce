"""compute_metric: every kind on a hand-computable phantom, units, validation, real data."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import PT_108, need

from dosegym.errors import ScorecardError
from dosegym.scorecards.dvh import DVHCache, compute_dvh
from dosegym.scorecards.metrics import MetricKind, MetricSpec, compute_metric

VOX_CC = 0.008  # 2 mm voxels
RX_GY = 60.0


@pytest.fixture(scope="module")
def phantom():
    """Dose 10*i Gy on slab x=i; target = x in 5..9 and y < 5 (250 voxels: 50 each at
    50, 60, 70, 80, 90 Gy); body = the whole 10^3 grid."""
    dose = np.broadcast_to(10.0 * np.arange(10, dtype=np.float32), (10, 10, 10)).copy()
    target = np.zeros(dose.shape, bool)
    target[:, :5, 5:] = True
    body = np.ones(dose.shape, bool)
    return dose, target, body


def _m(spec: MetricSpec, phantom, **kw) -> float:
    dose, target, body = phantom
    kw.setdefault("rx_gy", RX_GY)
    kw.setdefault("body", body)
    return compute_metric(spec, dose, target, voxel_volume_cc=VOX_CC, **kw)


K = MetricKind
CASES = [
    (MetricSpec(K.MIN_DOSE, output_unit="Gy"), 50.0),
    (MetricSpec(K.MAX_DOSE, output_unit="cGy"), 9000.0),
    (MetricSpec(K.MEAN_DOSE, output_unit="%"), 70.0 / 60.0 * 100),
    (MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "Gy"), 50.0),
    (MetricSpec(K.DOSE_AT_VOLUME, 0.4, "cc", "Gy"), 90.0),
    (MetricSpec(K.DOSE_AT_VOLUME, 1.6, "cc", "cGy"), 6000.0),
    (MetricSpec(K.DOSE_AT_VOLUME, 0, "%", "Gy"), 90.0),
    (MetricSpec(K.DOSE_AT_VOLUME, 100, "%", "Gy"), 50.0),
    (MetricSpec(K.VOLUME_AT_DOSE, 70, "Gy", "%"), 60.0),
    (MetricSpec(K.VOLUME_AT_DOSE, 70, "Gy", "cc"), 150 * VOX_CC),
    (MetricSpec(K.VOLUME_AT_DOSE, 7000, "cGy", "%"), 60.0),
    (MetricSpec(K.VOLUME_AT_DOSE, 100, "%", "%"), 80.0),
    (MetricSpec(K.DOSE_AT_SUBVOLUME, 0.4, "cc", "Gy"), 60.0),
    (MetricSpec(K.NEAR_MAX_DOSE, output_unit="Gy"), 90.0),
    (MetricSpec(K.CONFORMATION_NUMBER, 60, "Gy"), 200**2 / (250 * 400)),
    (MetricSpec(K.PADDICK_CI, 100, "%"), 200**2 / (250 * 400)),
    (MetricSpec(K.PADDICK_CI), 200**2 / (250 * 400)),  # value defaults to the Rx
    (MetricSpec(K.CONFORMITY_INDEX, 60, "Gy"), 400 / 250),
    (MetricSpec(K.HOMOGENEITY_INDEX), (90 - 50) / 70),
    (MetricSpec(K.HOMOGENEITY_INDEX, input_unit="%", target_value=100), (90 - 50) / 60),
    (MetricSpec(K.HOMOGENEITY_INDEX, input_unit="Gy", hi_value=5, lo_value=95, target_value=80), 0.5),
    (MetricSpec(K.INHOMOGENEITY_INDEX), (90 - 50) / 70),
    (MetricSpec(K.GRADIENT_INDEX), 700 / 400),
    (MetricSpec(K.GRADIENT_INDEX, 80, "Gy"), 600 / 200),
    (MetricSpec(K.MODIFIED_GRADIENT_INDEX, input_unit="Gy", lo_value=55, hi_value=65), 200 / 150),
    (MetricSpec(K.VOLUME_OF_REGRET, 60, "Gy", "cc"), 200 * VOX_CC),
    (MetricSpec(K.VOLUME_OF_REGRET, 60, "Gy", "%"), 80.0),
    (MetricSpec(K.INTEGRAL_DOSE), 70.0 * 250 * VOX_CC / 1000.0),
]


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[s.label for s, _ in CASES])
def test_every_kind_on_the_phantom(phantom, spec, expected):
    assert _m(spec, phantom) == pytest.approx(expected, rel=1e-9)


def test_every_kind_is_covered():
    assert {s.kind for s, _ in CASES} == set(MetricKind)


def test_ratios_with_zero_denominators(phantom):
    # nothing reaches 95 Gy: GI = V(47.5)/V(95) = inf; Paddick CI = 0/0 -> 0
    assert _m(MetricSpec(K.GRADIENT_INDEX, 95, "Gy"), phantom) == np.inf
    assert _m(MetricSpec(K.PADDICK_CI, 95, "Gy"), phantom) == 0.0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (MetricSpec(K.DOSE_AT_VOLUME, 120, "%", "Gy"), "out of range"),
        (MetricSpec(K.DOSE_AT_VOLUME, -1, "cc", "Gy"), "out of range"),
        (MetricSpec(K.DOSE_AT_VOLUME, 95, None, "Gy"), "input_unit is missing"),
        (MetricSpec(K.DOSE_AT_VOLUME, 95, "%", None), "output_unit is missing"),
        (MetricSpec(K.DOSE_AT_VOLUME, 95, "%", "%vol"), "not valid"),
        (MetricSpec(K.DOSE_AT_VOLUME, None, "%", "Gy"), "value"),
        (MetricSpec(K.VOLUME_AT_DOSE, -5, "Gy", "%"), "out of range"),
        (MetricSpec(K.VOLUME_AT_DOSE, 20, "mGy", "%"), "not valid"),
        (MetricSpec(K.VOLUME_AT_DOSE, 20, "Gy", "Gy"), "not valid"),
        (MetricSpec(K.DOSE_AT_SUBVOLUME, -0.5, "cc", "Gy"), "out of range"),
        (MetricSpec(K.MEAN_DOSE, output_unit="cc"), "not valid"),
        (MetricSpec(K.CONFORMITY_INDEX, 0, "Gy"), "out of range"),
        (MetricSpec(K.CONFORMITY_INDEX, 60, "Gy", "%"), "must be empty"),
        (MetricSpec(K.HOMOGENEITY_INDEX, hi_value=98, lo_value=2), "hi_value"),
        (MetricSpec(K.MODIFIED_GRADIENT_INDEX, input_unit="Gy", lo_value=65, hi_value=55), "lo_value"),
        (MetricSpec(K.VOLUME_AT_DOSE, float("nan"), "Gy", "%"), "finite"),
    ],
)
def test_validate_rejects_bad_specs_and_names_the_item(spec, match):
    with pytest.raises(ScorecardError, match=match) as info:
        spec.validate("card.yaml item 3")
    assert "card.yaml item 3" in str(info.value)


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ScorecardError, match="DoseAtVolume"):
        MetricSpec("D95")


def test_missing_body_rx_nan_and_empty_mask_are_errors(phantom):
    dose, target, _ = phantom
    with pytest.raises(ScorecardError, match="body"):
        compute_metric(MetricSpec(K.CONFORMITY_INDEX, 60, "Gy"), dose, target, voxel_volume_cc=VOX_CC)
    with pytest.raises(ScorecardError, match="prescription"):
        compute_metric(MetricSpec(K.VOLUME_AT_DOSE, 95, "%", "%"), dose, target, voxel_volume_cc=VOX_CC)
    bad = dose.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ScorecardError, match="dose contains NaN: refusing to score"):
        compute_metric(MetricSpec(K.MEAN_DOSE, output_unit="Gy"), bad, target, voxel_volume_cc=VOX_CC)
    with pytest.raises(ScorecardError, match="empty"):
        compute_metric(
            MetricSpec(K.MEAN_DOSE, output_unit="Gy"), dose, np.zeros_like(target), voxel_volume_cc=VOX_CC
        )


def test_cache_gives_identical_values_and_refuses_another_dose(phantom):
    dose, target, body = phantom
    cache = DVHCache(dose, VOX_CC)
    for spec, expected in CASES:
        got = compute_metric(spec, dose, target, voxel_volume_cc=VOX_CC, rx_gy=RX_GY, body=body, cache=cache)
        assert got == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ScorecardError, match="another dose"):
        compute_metric(CASES[0][0], dose.copy(), target, voxel_volume_cc=VOX_CC, cache=cache)


@pytest.fixture(scope="module")
def pt108():
    need(PT_108)
    from dosegym.data import read_case

    return read_case(PT_108)


def test_real_patient_metrics_are_consistent(pt108):
    case = pt108
    vox = case.voxel_volume_cc
    for name, mask in case.structures.items():
        doses = case.dose[mask].astype(np.float64)

        def m(spec, mask=mask):
            return compute_metric(spec, case.dose, mask, voxel_volume_cc=vox, rx_gy=70.0, body=case.body)

        assert m(MetricSpec(K.MEAN_DOSE, output_unit="Gy")) == pytest.approx(doses.mean(), rel=1e-6)
        assert m(MetricSpec(K.MAX_DOSE, output_unit="Gy")) == doses.max()
        d = [m(MetricSpec(K.DOSE_AT_VOLUME, x, "%", "Gy")) for x in (1, 5, 50, 95, 99)]
        assert all(a >= b for a, b in zip(d, d[1:], strict=False)), name
        # V(D95) is 95 % within one voxel (plus voxels tied at D95)
        d95 = d[3]
        v = m(MetricSpec(K.VOLUME_AT_DOSE, d95, "Gy", "%"))
        one_voxel_pct = 100.0 / mask.sum()
        ties = np.count_nonzero(doses.astype(np.float32) == np.float32(d95))
        assert 95.0 - one_voxel_pct - 1e-9 <= v <= 95.0 + (ties + 1) * one_voxel_pct + 1e-9
    ptv = case.structures["PTV70"]
    cn = compute_metric(
        MetricSpec(K.CONFORMATION_NUMBER, 95, "%"),
        case.dose,
        ptv,
        voxel_volume_cc=vox,
        rx_gy=70.0,
        body=case.body,
    )
    assert 0.3 < cn < 1.0  # a clinical plan: conformal, not perfect
    assert compute_dvh(case.dose, ptv, voxel_volume_cc=vox).total_volume_cc == pytest.approx(ptv.sum() * vox)
