"""Slots: to_model on a real patient, normalisation, roles, Resampler round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dosegym.data import Case, Grid
from dosegym.diffusion.slots import (
    OAR_GROUPS,
    SLOTS,
    ModelSpec,
    collate,
    make_resampler,
    oar_group,
    to_model,
)
from dosegym.errors import ModelError


def test_to_model_real_patient_normalisation(case, tiny_spec):
    mi, res = to_model(case, tiny_spec)
    assert mi.roles == {s: ("generate" if s == "dose" else "condition") for s in SLOTS}
    for slot, t in mi.tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape[1:]) == (16, 16, 16), slot
    assert mi.tensors["oars"].shape[0] == len(OAR_GROUPS)
    ct = mi.tensors["ct"]
    assert ct.min() >= -1.0 and ct.max() <= 1.0
    assert float(ct[0, 0, 0, 0]) == pytest.approx(-1.0, abs=1e-3)  # air in the corner
    for slot in ("body", "oars", "angle_plate"):
        assert set(torch.unique(mi.tensors[slot]).tolist()) <= {0.0, 1.0}, slot
    # targets: each target voxel at its Rx / highest Rx (56, 63, 70 Gy)
    values = torch.unique(mi.tensors["targets"]).numpy()
    allowed = np.array([0.0, 56 / 70, 63 / 70, 1.0])
    assert np.all(np.isclose(values[:, None], allowed[None, :], atol=1e-6).any(axis=1)), values
    assert np.isclose(values.max(), 1.0)
    # dose divided by the highest prescription: 1.0 = 70 Gy
    assert float(mi.rx_max_gy) == 70.0 and res.rx_max_gy == 70.0
    assert 0.9 < float(mi.tensors["dose"].max()) < case.dose.max() / 70 + 1e-3
    # parotids go to their own channel; the cord/brainstem channel holds the cord
    assert (
        mi.tensors["oars"][OAR_GROUPS.index(next(g for g in OAR_GROUPS if g[0] == "parotids_glands"))].sum()
        > 0
    )
    assert mi.tensors["oars"][0].sum() > 0


def test_oar_groups_of_common_names():
    names = {g[0]: i for i, g in enumerate(OAR_GROUPS)}
    assert oar_group("SpinalCord") == oar_group("Brainstem") == names["cord_brainstem"]
    assert oar_group("Parotid_L") == oar_group("RightParotid") == names["parotids_glands"]
    assert oar_group("Esophagus") == oar_group("Larynx") == names["larynx_esophagus"]
    assert oar_group("Rectum") == oar_group("Bladder") == names["rectum_bladder"]
    assert oar_group("Lung_L") == oar_group("Heart") == names["lungs_heart"]
    assert oar_group("FemoralHead_R") == names["femoral_heads"]
    assert oar_group("Eye_L") == names["other"]


def test_dose_round_trip_is_close_inside_body(case):
    spec = ModelSpec(shape=(48, 64, 64), spacing_mm=(3.0, 4.0, 4.0))
    mi, res = to_model(case, spec)
    back = res.decode(mi.tensors["dose"][0]).numpy()
    assert back.shape == case.grid.shape
    err = np.abs(back - case.dose)[case.body]
    # ~1.2-1.6x coarser grid: the error is the resolution loss at dose gradients only
    assert err.mean() < 1.2, err.mean()
    assert np.percentile(err, 50) < 0.5
    assert np.all(back[~case.body] == 0) and back.min() >= 0
    # a linear field is reproduced exactly by trilinear interpolation (away from the edge)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in case.grid.shape], indexing="ij")
    field = 0.01 * zz + 0.02 * yy - 0.005 * xx + 3
    model = res.to_model(field)
    again = res.to_case(model).numpy()
    inner = case.body & (zz > 50) & (zz < 80)
    assert np.abs(again - field)[inner].max() < 0.02


def test_model_field_covers_the_body_with_spacing_fitted(case):
    spec = ModelSpec(shape=(16, 16, 16), spacing_mm=(4.0, 4.0, 4.0), margin_mm=5.0)
    res = make_resampler(case, spec)
    lo = np.argwhere(case.body).min(0)
    hi = np.argwhere(case.body).max(0)
    extent = (hi - lo + 1) * np.array(case.grid.spacing_mm) + 10.0
    # 16 voxels of 4 mm cannot hold the body: every axis is coarsened just enough to fit
    assert np.allclose(np.array(res.model_grid.spacing_mm), extent / 16)
    mi, res = to_model(case, spec)
    body_back = res.to_case(mi.tensors["body"][0], "nearest").numpy() > 0.5
    dice = 2 * (body_back & case.body).sum() / (body_back.sum() + case.body.sum())
    assert dice > 0.85
    # a spec whose field is larger than the crop keeps the given spacing
    big = make_resampler(case, ModelSpec(shape=(64, 96, 96), spacing_mm=(3.0, 4.0, 4.0)))
    assert big.model_grid.spacing_mm == (3.0, 4.0, 4.0)
    fit = make_resampler(case, ModelSpec(shape=(16, 16, 16), spacing_mm=None, margin_mm=5.0))
    assert np.allclose(np.array(fit.model_grid.spacing_mm), extent / 16)


def test_slot_subset_and_role_overrides(case):
    spec = ModelSpec(shape=(16, 16, 16), slots=("body", "targets", "dose"))
    mi, _ = to_model(case, spec)
    assert set(mi.tensors) == {"body", "targets", "dose"}
    mi2, _ = to_model(case, spec, absent=("body",))
    assert mi2.roles["body"] == "absent" and "body" not in mi2.tensors
    mi3, _ = to_model(case, ModelSpec(shape=(16, 16, 16)), generate="beam_plate")
    assert mi3.roles["beam_plate"] == "generate" and mi3.roles["dose"] == "condition"
    swapped = mi.with_roles(dose="condition", targets="generate")
    assert swapped.generate_slot == "targets"
    with pytest.raises(ModelError, match="exactly one 'generate'"):
        mi.with_roles(dose="condition")


def test_missing_required_slot_names_it(case, tiny_spec):
    no_rx = dataclasses.replace(case, prescriptions=[])
    with pytest.raises(ModelError, match=r"required slot\(s\) \['targets'\]"):
        to_model(no_rx, tiny_spec)
    no_beams = dataclasses.replace(case, beams=None)
    mi, _ = to_model(no_beams, tiny_spec)
    assert mi.roles["beam_plate"] == "absent" and mi.roles["angle_plate"] == "absent"
    with pytest.raises(ModelError, match="required slot"):
        to_model(no_beams, ModelSpec(shape=(16, 16, 16), required=("beam_plate",)))


def test_collate_marks_samples_lacking_a_slot(case, tiny_spec):
    a, _ = to_model(case, tiny_spec)
    b, _ = to_model(dataclasses.replace(case, beams=None), tiny_spec)
    batch = collate([a, b])
    assert batch.batch_size == 2 and batch.roles["beam_plate"] == "condition"
    assert batch.available["beam_plate"].tolist() == [True, False]
    assert float(batch.tensors["beam_plate"][1].abs().sum()) == 0.0
    assert batch.available["ct"].tolist() == [True, True]


def test_case_without_body_uses_ct_threshold():
    grid = Grid((12, 12, 12), (2.0, 2.0, 2.0))
    ct = np.full(grid.shape, -1000, np.float32)
    ct[3:9, 3:9, 3:9] = 40.0
    ptv = np.zeros(grid.shape, bool)
    ptv[5:7, 5:7, 5:7] = True
    from dosegym.data import Prescription

    c = Case("box", grid, ct=ct, structures={"PTV": ptv}, prescriptions=[Prescription("PTV", 60.0, 30)])
    mi, res = to_model(c, ModelSpec(shape=(8, 8, 8), spacing_mm=(2.0, 2.0, 2.0), margin_mm=0.0))
    assert mi.roles["body"] == "condition" and float(mi.tensors["body"].mean()) > 0.3
    assert mi.roles["dose"] == "generate" and "dose" not in mi.tensors
    # the 8^3 field at 2 mm is centred on the 6^3 body: starts 1 voxel before it
    assert res.start == (2.0, 2.0, 2.0) and res.step == (1.0, 1.0, 1.0)
