"""The Gaussian reverse step against diffusers and a direct torch.distributions computation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers import make_scheduler, reverse_step
from dosegym.diffusion.schedulers.logprob import gaussian_log_prob
from dosegym.errors import ModelError

SHAPE = (3, 1, 4, 5, 6)
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_eta0_reproduces_diffusers_deterministic_step(prediction_type):
    sched = make_scheduler("ddim", DiffusionConfig(prediction_type=prediction_type))
    sched.set_timesteps(10)
    x, out, _ = _data()
    for t in sched.timesteps:
        ref = sched.step(out, t, x, eta=0.0)
        ours = reverse_step(sched, out, t, x, eta=0.0)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.pred_original_sample, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        assert ours.deterministic and ours.log_prob is None and float(ours.std.max()) == 0.0


def test_ddim_eta1_matches_diffusers_with_the_same_noise_and_std():
    sched = make_scheduler("ddim", DiffusionConfig())
    sched.set_timesteps(8)
    x, out, noise = _data(1)
    for t in sched.timesteps:
        ref = sched.step(out, t, x, eta=1.0, variance_noise=noise)
        ours = reverse_step(sched, out, t, x, eta=1.0, variance_noise=noise)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
        prev_t = int(t) - 1000 // 8
        expected_std = float(sched._get_variance(t, prev_t)) ** 0.5
        assert float(ours.std.flatten()[0]) == pytest.approx(expected_std, rel=1e-5)
        # the mean is diffusers' step with zero noise
        zero = sched.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(ours.mean, zero, rtol=1e-5, atol=1e-5)
        # every step, the last included, is stochastic (set_alpha_to_one=False)
        assert float(ours.std.min()) > 0 and ours.log_prob is not None


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_matches_diffusers_step(prediction_type):
    sched = make_scheduler("ddpm", DiffusionConfig(prediction_type=prediction_type))
    sched.set_timesteps(10)
    x, out, _ = _data(2)
    for t in sched.timesteps[:-1]:  # the last step (to t = -1) has zero variance
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        ours = reverse_step(sched, out, t, x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-4, atol=1e-5)
    last = reverse_step(sched, out, sched.timesteps[-1], x)
    assert last.deterministic


def test_log_prob_equals_torch_normal_mean_over_elements():
    sched = make_scheduler("ddim", DiffusionConfig())
    sched.set_timesteps(5)
    x, out, _ = _data(3)
    t = sched.timesteps[2]
    step = reverse_step(sched, out, t, x, eta=0.7, generator=torch.Generator().manual_seed(0))
    normal = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    expected = normal.log_prob(step.prev_sample).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, expected, rtol=1e-5, atol=1e-5)
    # scoring a given action: same Gaussian, that action's density
    other = step.prev_sample + 0.1
    scored = reverse_step(sched, out, t, x, eta=0.7, prev_sample=other)
    torch.testing.assert_close(scored.log_prob, normal.log_prob(other).flatten(1).mean(1))
    assert torch.equal(scored.prev_sample, other)
    assert bool((scored.log_prob < step.log_prob).all())


def test_per_sample_timesteps_equal_scalar_calls():
    sched = make_scheduler("ddim", DiffusionConfig())
    sched.set_timesteps(10)
    x, out, noise = _data(4)
    ts = torch.stack([sched.timesteps[0], sched.timesteps[4], sched.timesteps[-1]])
    batched = reverse_step(sched, out, ts, x, eta=1.0, variance_noise=noise)
    for i in range(3):
        one = reverse_step(
            sched, out[i : i + 1], ts[i], x[i : i + 1], eta=1.0, variance_noise=noise[i : i + 1]
        )
        torch.testing.assert_close(batched.prev_sample[i : i + 1], one.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob)
    assert len(set(batched.std.flatten().tolist())) == 3


def test_degenerate_and_invalid_uses_raise():
    x, out, _ = _data(5)
    with pytest.raises(ModelError, match="deterministic step"):
        gaussian_log_prob(x, x, torch.zeros(3, 1, 1, 1, 1))
    sched = make_scheduler("ddim", DiffusionConfig())
    with pytest.raises(ModelError, match="set_timesteps"):
        reverse_step(sched, out, 999, x, eta=1.0)
    clipping = DDIMScheduler(clip_sample=True)
    clipping.set_timesteps(4)
    with pytest.raises(ModelError, match="clip_sample=False"):
        reverse_step(clipping, out, clipping.timesteps[0], x)
    dpm = make_scheduler("dpm_solver", DiffusionConfig())
    dpm.set_timesteps(4)
    with pytest.raises(ModelError, match="not Markov"):
        reverse_step(dpm, out, dpm.timesteps[0], x)
    with pytest.raises(ModelError, match="unknown sampler"):
        make_scheduler("euler", DiffusionConfig())
    for name in ("ddpm", "ddim", "dpm_solver"):
        assert make_scheduler(name, DiffusionConfig()).config.get("clip_sample", False) is False
