"""DosePolicy: the policy contract, checkpoints, determinism, reference copy, errors."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from helpers import randomise_zero_init, tiny_config

from dosegym.diffusion.checkpoint import load_model, save_checkpoint
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.policy import DosePolicy, load_pretrained
from dosegym.diffusion.schedulers import reverse_step
from dosegym.diffusion.slots import ModelSpec
from dosegym.errors import ModelError


@pytest.fixture
def policy(tiny_model) -> DosePolicy:
    return DosePolicy(tiny_model, sampler="ddim", eta=1.0)


def test_policy_contract_loop(policy, case):
    cond = policy.conditions(case)
    assert cond.batched and cond.batch_size == 1 and cond.generate_slot == "dose"
    gen = torch.Generator().manual_seed(0)
    x = policy.initial_noise(2, gen)
    cond = cond.expand(2)
    steps = policy.timesteps(4)
    assert steps.tolist() == [999, 749, 499, 249]
    logps = []
    for t in steps:
        mean, std = policy.step_distribution(x, t, cond)
        assert mean.shape == x.shape and std.shape == (2, 1, 1, 1, 1) and bool((std > 0).all())
        x_prev = mean + std * torch.randn(x.shape, generator=gen)
        logp = policy.log_prob(x_prev, mean, std)
        assert logp.shape == (2,) and torch.isfinite(logp).all()
        logps.append(logp)
        x = x_prev
    dose = policy.decode(x, cond, to_case=case).detach()
    assert dose.shape == (2, *case.grid.shape)
    assert float(dose.min()) >= 0 and float(dose[:, ~torch.from_numpy(case.body)].abs().max()) == 0
    on_model = policy.decode(x, cond)
    assert on_model.shape == (2, 16, 16, 16)
    per_case = policy.decode(x, cond, to_case=[case, case])
    assert len(per_case) == 2 and torch.equal(per_case[1], dose[1])


def test_step_distribution_is_the_reverse_step_and_differentiable(policy, case):
    cond = policy.conditions(case)
    policy.timesteps(5)
    x = policy.initial_noise(cond, torch.Generator().manual_seed(1))
    t = policy.scheduler.timesteps[1]
    mean, std = policy.step_distribution(x, t, cond)
    with torch.no_grad():
        ref = reverse_step(
            policy.scheduler, policy.model(x, t, cond), t, x, eta=1.0, variance_noise=torch.zeros_like(x)
        )
    torch.testing.assert_close(mean.detach(), ref.mean)
    policy.log_prob(mean.detach() + std, mean, std).sum().backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_deterministic_policy_log_prob_raises(tiny_model, case):
    pol = DosePolicy(tiny_model, sampler="ddim", eta=0.0)
    cond = pol.conditions(case)
    t = pol.timesteps(3)[0]
    x = pol.initial_noise(1, torch.Generator().manual_seed(0))
    mean, std = pol.step_distribution(x, t, cond)
    with pytest.raises(ModelError, match="deterministic step"):
        pol.log_prob(mean, mean, std)
    with pytest.raises(ModelError, match="Markov Gaussian"):
        DosePolicy(tiny_model, sampler="dpm_solver")


def test_predict_is_seed_deterministic_and_on_the_case_grid(policy, case):
    a = policy.predict(case, steps=3, sampler="ddim", seed=7)
    b = policy.predict(case, steps=3, sampler="ddim", seed=7)
    c = policy.predict(case, steps=3, sampler="ddim", seed=8)
    assert a.shape == case.grid.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    k = policy.predict(case, steps=2, sampler="dpm_solver", seed=7, samples=3)
    assert k.shape == (3, *case.grid.shape) and np.std(k, axis=0).max() > 0
    d = policy.predict(case, steps=2, sampler="ddpm", seed=1, eta=0.0)
    assert np.isfinite(d).all()


def test_reference_is_a_frozen_copy_of_the_loaded_weights(policy, case):
    cond = policy.conditions(case)
    x = policy.initial_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = policy.model(x, torch.tensor([500]), cond)
        for p in policy.model.parameters():
            p.add_(0.01)
        ref = policy.reference()
        after_ref = ref.model(x, torch.tensor([500]), cond)
        after = policy.model(x, torch.tensor([500]), cond)
    torch.testing.assert_close(after_ref, before)
    assert not torch.allclose(after, before)
    assert all(not p.requires_grad for p in ref.model.parameters())


def test_save_load_identical_outputs(tiny_model, case, tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model.config, tiny_model.state_dict(), step=3)
    pol = load_pretrained(tmp_path / "ck")
    pol_ref = DosePolicy(tiny_model)
    assert np.array_equal(pol.predict(case, steps=2, seed=3), pol_ref.predict(case, steps=2, seed=3))


def test_incompatible_checkpoints_say_what_differs(tiny_model, tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, tiny_model.config, tiny_model.state_dict())
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["unet"]["base_channels"] = 16
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        ModelError, match=r"weights do not fit the model: .* with other shapes \(e\.g\. \['backbone"
    ):
        load_model(folder)
    save_checkpoint(folder, tiny_model.config, tiny_model.state_dict())
    other = tiny_config(ModelSpec(shape=(16, 16, 16), slots=("targets", "dose")))
    with pytest.raises(ModelError, match=r"spec\.slots: checkpoint .*'ct'.* vs expected"):
        load_model(folder, expected=other)
    small = Any2Any(other)
    with pytest.raises(ModelError, match=r"unexpected \(e\.g\. \['encoders\.angle_plate"):
        from dosegym.diffusion.checkpoint import load_weights

        load_weights(small, folder / "model.safetensors")
    doc = json.loads((folder / "config.json").read_text())
    doc["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="format_version 99; this dosegym .* reads format_version 1"):
        load_pretrained(folder)
    with pytest.raises(ModelError, match="not a dosegym checkpoint"):
        load_pretrained(tmp_path)


def test_missing_required_slot_in_conditions(policy, case):
    with pytest.raises(ModelError, match="targets"):
        policy.conditions(dataclasses.replace(case, prescriptions=[]))
    regress = DosePolicy(randomise_zero_init(Any2Any(tiny_config(policy.spec, objective="regression"))))
    with pytest.raises(ModelError, match="regression model"):
        regress.step_distribution(torch.zeros(1, 1, 16, 16, 16), 10, regress.conditions(case))
    assert regress.predict(case).shape == case.grid.shape


def test_nan_weights_raise_model_error_naming_the_case(tiny_model, case):
    """Issue 15, rule 2: a checkpoint with NaN weights never yields a (NaN) dose."""
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.fill_(float("nan"))
    policy = DosePolicy(tiny_model, sampler="ddim", eta=1.0)
    with pytest.raises(ModelError, match=r"predict|decode") as err:
        policy.predict(case, steps=2, seed=0)
    assert repr(case.case_id) in str(err.value) and "NaN" in str(err.value)
    cond = policy.conditions(case)
    x = torch.full((1, 1, *policy.spec.shape), float("nan"))
    for to_case in (None, case, [case]):
        with pytest.raises(ModelError, match=re.escape(f"case {case.case_id!r} has")):
            policy.decode(x, cond, to_case=to_case)


def test_predict_applies_the_dose_rule(policy, case, monkeypatch):
    """A finite but absurd prediction (100 x the prescription) is refused as well."""
    shape = (1, 1, *policy.spec.shape)
    monkeypatch.setattr("dosegym.diffusion.policy.sample", lambda *a, **k: torch.full(shape, 100.0))
    with pytest.raises(ModelError, match=r"predict: the dose predicted for case .* exceeds"):
        policy.predict(case, steps=2, seed=0)


def test_test_time_flips_average_a_sample_and_its_mirror():
    """``predict(flip_tta=True)``: the mean of the input's sample and the mirrored input's
    sample flipped back, decoded; the mirrored input is every tensor flipped along x."""
    from helpers import tiny_policy_config

    from dosegym.data import phantoms
    from dosegym.diffusion import Any2Any, DosePolicy
    from dosegym.diffusion.chain import seeded_generator
    from dosegym.diffusion.sample import sample

    phantom = phantoms.load_shipped_phantom("headneck", 28)
    torch.manual_seed(0)
    policy = DosePolicy(Any2Any(tiny_policy_config()))
    cond = policy.conditions(phantom)
    both = cond.mirrored()
    assert both.batch_size == 2 and torch.equal(both.tensors["ct"][1], cond.tensors["ct"][0].flip(-1))
    with torch.no_grad():
        x0 = sample(policy.model, both, "ddim", 2, seeded_generator(4), 0.0)
        expected = policy.decode(0.5 * (x0[:1] + x0[1:].flip(-1)), cond, phantom)[0].numpy()
    got = policy.predict(phantom, steps=2, seed=4, flip_tta=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == phantom.grid.shape
    assert policy.predict(phantom, steps=2, seed=4, samples=2, flip_tta=True).shape == (
        2,
        *phantom.grid.shape,
    )
