"""ReverseChain: predict's identity, per-sample generators, log-probs, the x̂0 algebra, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import randomise_zero_init, tiny_config

from dosegym.data.phantoms import generate_anatomy
from dosegym.diffusion.chain import ReverseChain, seeded_generator
from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.policy import DosePolicy
from dosegym.diffusion.schedulers import PREDICTION_TYPES, gaussian_log_prob, output_for_x0, x0_and_eps
from dosegym.errors import ModelError


@pytest.fixture(scope="module")
def phantom():
    return generate_anatomy("prostate", index=0, seed=0)


@pytest.fixture(scope="module")
def model(tiny_spec) -> Any2Any:
    torch.manual_seed(0)
    return randomise_zero_init(Any2Any(tiny_config(tiny_spec))).eval()


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 1.0), ("ddim", 0.0), ("ddpm", 0.0)])
def test_predict_is_a_chain_run_with_the_seeded_generator(model, phantom, sampler, eta):
    policy = DosePolicy(model, sampler=sampler, eta=eta)
    dose = policy.predict(phantom, steps=3, sampler=sampler, seed=123, eta=eta)
    cond = policy.conditions(phantom)
    for generators in (seeded_generator(123), [seeded_generator(123)]):
        chain = ReverseChain(model, 3, sampler, eta)
        chain.start(cond, generators)
        x0 = chain.run()
        by_hand = policy.decode(x0, cond, to_case=phantom)[0].numpy()
        np.testing.assert_array_equal(by_hand, dose)  # exactly


def test_per_sample_generators_draw_as_single_chains(model, phantom):
    policy = DosePolicy(model, sampler="ddim", eta=1.0)
    cond = policy.conditions(phantom)
    batch = policy.chain(2)
    x_T = batch.start(cond.expand(3), [seeded_generator(s) for s in (4, 5, 6)])
    noise = batch.noise()
    for i, s in enumerate((4, 5, 6)):
        one = policy.chain(2)
        assert torch.equal(one.start(cond, [seeded_generator(s)]), x_T[i : i + 1])
        assert torch.equal(one.noise(), noise[i : i + 1])
    # one generator for the batch draws (B, ...) at once, as sample() does
    shared = policy.chain(2)
    assert torch.equal(
        shared.start(cond.expand(2), seeded_generator(4)),
        torch.randn(2, 1, 16, 16, 16, generator=seeded_generator(4)),
    )


def test_steps_carry_log_probs_and_x0(model, phantom):
    policy = DosePolicy(model, sampler="ddim", eta=1.0)
    chain = policy.chain(3)
    chain.start(policy.conditions(phantom).expand(2), seeded_generator(0))
    assert chain.running and chain.batch_size == 2 and chain.timestep_fraction() == 1.0
    d = chain.distribution()
    out = chain.step()
    torch.testing.assert_close(out.log_prob, policy.log_prob(out.prev_sample, d.mean, d.std))
    assert torch.equal(out.pred_original_sample, d.pred_original_sample) and chain.k == 1
    mine = chain.distribution().mean + 0.1
    expected = chain.log_prob(mine)
    assert torch.equal(chain.step(mine).log_prob, expected) and torch.equal(chain.x, mine)
    chain.run()
    assert not chain.running and chain.timestep_fraction() == 0.0
    with pytest.raises(ModelError, match="has ended"):
        chain.step()
    # a deterministic step: the chain's log-probs are NaN, never a fake 0
    det = ReverseChain(model, 2, "ddim", eta=0.0)
    det.start(policy.conditions(phantom), seeded_generator(0))
    assert not det.stochastic and math.isnan(float(det.step().log_prob[0]))


def test_one_log_prob_function_raises_or_gives_nan():
    x = torch.randn(2, 1, 3, 3, 3)
    std = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1, 1)
    with pytest.raises(ModelError, match="deterministic step"):
        gaussian_log_prob(x, torch.zeros_like(x), std)
    lp = gaussian_log_prob(x, torch.zeros_like(x), std, deterministic="nan")
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(x[0]).mean()
    torch.testing.assert_close(lp[0], normal)
    assert math.isnan(float(lp[1]))
    with pytest.raises(ModelError, match="'raise' or 'nan'"):
        gaussian_log_prob(x, x, std, deterministic="zero")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_output_for_x0_inverts_x0_and_eps(prediction_type):
    g = torch.Generator().manual_seed(0)
    out, x = torch.randn(2, 1, 4, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)
    a = torch.tensor([0.3, 0.9]).reshape(2, 1, 1, 1, 1)
    x0, eps = x0_and_eps(prediction_type, out, x, a)
    torch.testing.assert_close(a**0.5 * x0 + (1 - a) ** 0.5 * eps, x)  # x_t = √ᾱ x0 + √(1-ᾱ) ε
    torch.testing.assert_close(output_for_x0(prediction_type, x0, x, a), out)
    with pytest.raises(ModelError, match="unknown prediction_type"):
        x0_and_eps("flow", out, x, a)


def test_chain_output_for_x0_at_the_coming_step(tiny_spec, phantom):
    for pt in PREDICTION_TYPES:
        torch.manual_seed(0)
        m = Any2Any(tiny_config(tiny_spec, diffusion=DiffusionConfig(prediction_type=pt))).eval()
        policy = DosePolicy(m, sampler="ddim", eta=1.0)
        chain = policy.chain(4)
        chain.start(policy.conditions(phantom), seeded_generator(1))
        chain.step()
        d = chain.distribution()
        again = chain.step_from_output(chain.output_for_x0(d.pred_original_sample, chain.x), chain.x)
        torch.testing.assert_close(again.mean, d.mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 1.0), ("ddim", 0.3), ("ddpm", 0.0)])
def test_x0_gain_moves_the_mean_as_the_step_towards_the_moved_x0(tiny_spec, phantom, sampler, eta):
    """mean + x0_gain * delta is the mean of the step fed the model output implied by x̂0 + delta,
    at every step (the last one too) and for every prediction type; the std is the same."""
    g = torch.Generator().manual_seed(3)
    for pt in PREDICTION_TYPES:
        torch.manual_seed(0)
        m = Any2Any(tiny_config(tiny_spec, diffusion=DiffusionConfig(prediction_type=pt))).eval()
        chain = DosePolicy(m, sampler=sampler, eta=eta).chain(3)
        chain.start(DosePolicy(m).conditions(phantom).expand(2), seeded_generator(1))
        while chain.running:
            d = chain.distribution()
            delta = torch.randn(d.mean.shape, generator=g, dtype=torch.float64)
            x, moved = chain.x.double(), d.pred_original_sample.double() + delta  # the round trip in float64
            by_step = chain.step_from_output(chain.output_for_x0(moved, x), x)
            gain = chain.x0_gain()
            assert gain.shape == (2, 1, 1, 1, 1) and gain.dtype == chain.x.dtype
            torch.testing.assert_close(d.mean + gain * delta, by_step.mean.double(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(by_step.std.float(), d.std)
            chain.step()


def test_bad_uses_are_model_errors(model, phantom):
    policy = DosePolicy(model, sampler="ddim", eta=1.0)
    chain = policy.chain(2)
    with pytest.raises(ModelError, match="not started"):
        chain.distribution()
    with pytest.raises(ModelError, match="2 generators for a batch of 1"):
        chain.start(policy.conditions(phantom), [seeded_generator(0), seeded_generator(1)])
    chain.start(policy.conditions(phantom))
    with pytest.raises(ModelError, match="x_prev shape"):
        chain.step(torch.zeros(2, 1, 16, 16, 16))
    with pytest.raises(ModelError, match="not a Markov Gaussian"):
        ReverseChain(model, 2, "dpm_solver")
    with pytest.raises(ModelError, match="steps must be an integer in"):
        ReverseChain(model, 0)
