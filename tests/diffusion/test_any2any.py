"""The Any2Any network: slot subsets, roles, modality dropout, shape checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_config

from dosegym.diffusion.config import UNetConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.slots import SLOTS, ModelSpec, collate, to_model
from dosegym.errors import ModelError


def _x(seed: int = 0, b: int = 1, c: int = 1) -> torch.Tensor:
    return torch.randn(b, c, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_slot_subset_model_runs(case):
    spec = ModelSpec(shape=(16, 16, 16), slots=("body", "targets", "dose"))
    torch.manual_seed(0)
    model = Any2Any(tiny_config(spec)).eval()
    assert set(model.encoders) == {"body", "targets", "dose"}
    batch = collate([to_model(case, spec)[0]])
    with torch.no_grad():
        out = model(_x(), torch.tensor([500]), batch)
    assert out.shape == (1, 1, 16, 16, 16) and torch.isfinite(out).all()


def test_conditions_and_roles_change_the_prediction(case, tiny_model, tiny_spec):
    full, _ = to_model(case, tiny_spec)
    no_ct, _ = to_model(case, tiny_spec, absent=("ct",))
    x, t = _x(), torch.tensor([300])
    with torch.no_grad():
        a = tiny_model(x, t, collate([full]))
        b = tiny_model(x, t, collate([no_ct]))
        # modality dropout of ct is exactly "ct absent"
        drop = torch.tensor([[s == "ct" for s in SLOTS]])
        c = tiny_model(x, t, collate([full]), drop=drop)
        # the timestep matters, and so does the noisy input
        d = tiny_model(x, torch.tensor([900]), collate([full]))
        e = tiny_model(_x(1), t, collate([full]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)
    assert not torch.allclose(a, d) and not torch.allclose(a, e)


def test_mixed_availability_batch_equals_separate_calls(case, tiny_model, tiny_spec):
    a, _ = to_model(case, tiny_spec)
    b, _ = to_model(dataclasses.replace(case, beams=None), tiny_spec)
    x, t = _x(0, 2), torch.tensor([100, 600])
    with torch.no_grad():
        both = tiny_model(x, t, collate([a, b]))
        one = tiny_model(x[1:], t[1:], collate([b]))
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_regression_call_and_other_generate_slot(case, tiny_model, tiny_spec):
    mi, _ = to_model(case, tiny_spec)
    batch = collate([mi])
    with torch.no_grad():
        x0 = tiny_model(None, torch.zeros(1), batch)
        plate = tiny_model(
            _x(), torch.tensor([10]), batch.with_roles(dose="condition", beam_plate="generate")
        )
        oars = tiny_model(_x(c=8), torch.tensor([10]), batch.with_roles(dose="condition", oars="generate"))
    assert x0.shape == (1, 1, 16, 16, 16) and plate.shape == (1, 1, 16, 16, 16)
    assert oars.shape == (1, 8, 16, 16, 16)


def test_bad_inputs_raise_model_error(case, tiny_model, tiny_spec):
    mi, _ = to_model(case, tiny_spec)
    with pytest.raises(ModelError, match="batched"):
        tiny_model(_x(), torch.tensor([1]), mi)
    with pytest.raises(ModelError, match=r"x_t shape \(1, 2, 16, 16, 16\)"):
        tiny_model(_x(c=2), torch.tensor([1]), collate([mi]))
    with pytest.raises(ModelError, match="divisible"):
        Any2Any(tiny_config(ModelSpec(shape=(15, 16, 16))))
    with pytest.raises(ModelError, match="divisible"):
        Any2Any(
            tiny_config(
                ModelSpec(shape=(16, 16, 16)), unet=UNetConfig(base_channels=8, groups=4, patch=(3, 1, 1))
            )
        )


def test_patch_embedding_unet_variant(case):
    spec = ModelSpec(shape=(16, 16, 16))
    unet = UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4, attention_heads=2, patch=(2, 2, 2))
    cfg = tiny_config(spec, unet=unet)
    model = Any2Any(cfg).eval()
    batch = collate([to_model(case, spec)[0]])
    with torch.no_grad():
        out = model(_x(), torch.tensor([5]), batch)
    assert out.shape == (1, 1, 16, 16, 16)
    assert tuple(model.encoders["dose"].proj.weight.shape) == (8, 1, 2, 2, 2)
