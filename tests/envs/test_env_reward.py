"""Reward composition: the per-step Gaussian KL, configuration checks, the weighted sum."""

from __future__ import annotations

import pytest
import torch

from dosegym.envs.reward import RewardConfig, compose, gaussian_kl, score_term
from dosegym.errors import EnvError


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(3, 1, 4, 4, 4, generator=g), torch.randn(3, 1, 4, 4, 4, generator=g)
    std_p = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1, 1)
    std_q = torch.tensor([1.0, 0.3, 2.0]).reshape(3, 1, 1, 1, 1)
    kl = gaussian_kl(mean_p, std_p, mean_q, std_q)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p, std_p.expand_as(mean_p)),
        torch.distributions.Normal(mean_q, std_q.expand_as(mean_q)),
    )
    torch.testing.assert_close(kl, ref.reshape(3, -1).mean(dim=1))
    assert kl.shape == (3,)
    assert float(gaussian_kl(mean_p, std_p, mean_p, std_p).abs().max()) == 0.0
    with pytest.raises(EnvError, match="> 0"):
        gaussian_kl(mean_p, torch.zeros(3, 1, 1, 1, 1), mean_q, std_q)


def test_config_validation_and_coercion():
    cfg = RewardConfig.coerce({"w_fid": 0.5, "scale": "raw"})
    assert cfg.w_fid == 0.5 and cfg.scale == "raw" and cfg.w_score == 1.0
    assert RewardConfig.coerce(None) == RewardConfig()
    with pytest.raises(EnvError, match="'normalised'"):
        RewardConfig(scale="percent")
    with pytest.raises(EnvError, match="w_kl"):
        RewardConfig(w_kl=-1.0)
    with pytest.raises(EnvError, match="valid"):
        RewardConfig.coerce({"w_fidelity": 1.0})
    with pytest.raises(EnvError, match="'reference'"):
        RewardConfig(fidelity="ground_truth")


def test_score_term_and_composition():
    assert score_term(40.0, 80.0, "raw", None) == 40.0
    assert score_term(40.0, 80.0, "normalised", None) == 0.5
    assert score_term(40.0, 80.0, "baseline", 30.0) == 10.0
    with pytest.raises(EnvError, match="baseline"):
        score_term(40.0, 80.0, "baseline", None)
    cfg = RewardConfig(w_score=2.0, w_fid=3.0, w_kl=4.0)
    reward, terms = compose(cfg, 0.5, 0.1, 0.01)
    assert reward == pytest.approx(2.0 * 0.5 - 3.0 * 0.1 - 4.0 * 0.01)
    assert terms["reward"] == reward and terms["fidelity"] == 0.1
    assert compose(cfg, None, None, None)[0] == 0.0


def test_dense_score_config_is_checked():
    assert RewardConfig(score="dense").dense_temperature_gy == 2.0
    with pytest.raises(EnvError, match="use scale='normalised'"):
        RewardConfig(score="dense", scale="raw")
    with pytest.raises(EnvError, match="valid: \\['exact', 'dense'\\]"):
        RewardConfig(score="soft")
    with pytest.raises(EnvError, match="dense_temperature_gy"):
        RewardConfig(score="dense", dense_temperature_gy=0.0)
    with pytest.raises(EnvError, match="dense_leak"):
        RewardConfig(dense_leak=float("nan"))


def test_dense_score_is_the_reward_and_the_exact_score_is_logged(tiny_policy, pt108):
    import gymnasium as gym
    import numpy as np

    from dosegym.envs.guidance import SoftScorer
    from dosegym.scorecards.dense import dense_normalised

    def episode(reward):
        env = gym.make("dosegym/DenoiseDose-v0", policy=tiny_policy, cases=[pt108], steps=3, reward=reward)
        u = env.unwrapped
        obs, _ = env.reset(seed=2)
        done = False
        while not done:
            mean, std = u.policy_step(obs)
            obs, r, done, _, info = env.step(mean + std * u.sample_noise())
        return r, info, obs["x_t"]

    r_exact, exact, _ = episode(None)
    r_dense, dense, x = episode({"score": "dense", "dense_temperature_gy": 1.5})
    assert dense["score_normalised"] == exact["score_normalised"] and "score_dense" not in exact
    assert r_dense == dense["score_dense"] != r_exact
    cd = None
    from dosegym.envs.denoise import DenoiseDoseEnv

    env = DenoiseDoseEnv(policy=tiny_policy, cases=[pt108], steps=3)
    cd = env.core.case_data(0)
    scorer = SoftScorer(cd.card, cd.case, cd.resampler, 1.5)
    want = dense_normalised(scorer.soft, scorer.dose_gy(torch.from_numpy(np.asarray(x))[None]), 1.5, 1.0)
    assert dense["score_dense"] == pytest.approx(float(want[0]), rel=1e-6)
