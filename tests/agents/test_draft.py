"""DRaFT-K / AlignProp: the gradient through the last K steps, the loop, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_bandit

from dosegym import agents
from dosegym.errors import AgentError, EnvError


def bandit(policy, **reward):
    return make_bandit(policy, **reward)


def draft(policy, env, **fields):
    base = {"samples_per_iteration": 2, "sample_num_steps": 3, "learning_rate": 1e-2, "seed": 0}
    return agents.get("draft")(env, policy, {**base, **fields})


def _loss(agent, env, k: int) -> torch.Tensor:
    env.reset(seed=5)
    x0, _ = agent._sample(env, 5, k)
    return -env.differentiable_reward(x0).mean()


def test_the_gradient_through_every_step_matches_finite_differences(tiny_policy):
    """DRaFT-K with K = all steps is the exact gradient of the sampled reward: its directional
    derivative equals a central finite difference along a random direction of the weights."""
    env = bandit(tiny_policy)
    agent = draft(tiny_policy, env, train="full", sample_num_steps=3, draft_k=3)
    agent.setup_training(1)
    params = agent.parameters()
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    direction = [d / norm for d in direction]
    loss = _loss(agent, env, 3)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    analytic = float(sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True) if gr is not None))
    eps = 2e-3
    with torch.no_grad():
        values = []
        for sign in (1.0, -1.0):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            agent._merged = None  # the sampling copy follows the weights
            values.append(float(_loss(agent, env, 3)))
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx(numeric, rel=0.1, abs=1e-3)
    env.close()


def test_truncation_and_checkpointing(tiny_policy):
    """K = 1 trains the last step only (the gradient differs from K = 3); gradient
    checkpointing changes the memory, not the gradient; AlignProp's K is drawn in 1..draft_k."""
    env = bandit(tiny_policy)
    grads = {}
    for k, ckpt in ((1, True), (1, False), (3, True)):
        agent = draft(tiny_policy, env, train="full", draft_k=k, gradient_checkpointing=ckpt)
        agent.setup_training(1)
        params = agent.parameters()
        out = torch.autograd.grad(_loss(agent, env, k), params, allow_unused=True)
        grads[(k, ckpt)] = torch.cat([(o if o is not None else torch.zeros_like(p)).flatten()
                                      for o, p in zip(out, params, strict=True)])  # fmt: skip
    torch.testing.assert_close(grads[(1, True)], grads[(1, False)])
    assert not torch.allclose(grads[(1, True)], grads[(3, True)])
    agent = draft(tiny_policy, env, draft_k=3, truncation="random")
    drawn = set()
    for it in range(12):
        agent.iteration = it
        drawn.add(agent.num_trained_steps(0))
    assert drawn <= {1, 2, 3} and len(drawn) >= 2
    env.close()


def test_learn_raises_the_dense_reward_and_save_load_predicts_the_same(tiny_policy, headneck28, tmp_path):
    env = bandit(tiny_policy)
    agent = draft(tiny_policy, env, draft_k=2, learning_rate=3e-2)
    agent.learn(8)
    curves = agent.curves
    assert len(curves) == 4 and all(np.isfinite(c["reward_mean"]) for c in curves)
    assert curves[-1]["reward_mean"] > curves[0]["reward_mean"]  # one case, one seed per iteration
    assert all("soft_gap" in c and c["trained_steps"] == 2 for c in curves)
    agent.save(tmp_path / "a")
    back = agents.load(tmp_path / "a", env=env, policy=tiny_policy)
    np.testing.assert_array_equal(agent.predict(headneck28, seed=3), back.predict(headneck28, seed=3))
    assert not np.array_equal(
        agent.predict(headneck28, seed=3), tiny_policy.predict(headneck28, steps=3, seed=3)
    )
    env.close()


def test_bad_setups_are_refused(tiny_policy, env):
    with pytest.raises(AgentError, match="ScorecardBandit vector env"):
        draft(tiny_policy, env).learn(2)  # a DenoiseDose env has no differentiable reward
    with pytest.raises(AgentError, match="score: dense"):
        draft(tiny_policy, None, reward={"score": "exact"})
    with pytest.raises(AgentError, match="draft_k"):
        draft(tiny_policy, None, draft_k=4)
    with pytest.raises(AgentError, match="sample_eta > 0"):
        draft(tiny_policy, None, kl_weight=0.1)
    exact = bandit(tiny_policy, score="exact")
    exact.reset(seed=0)
    with pytest.raises(EnvError, match="score='dense'"):
        exact.differentiable_reward(torch.zeros(2, 1, 16, 16, 16))
    exact.close()


def test_a_non_finite_loss_stops_with_a_diagnosis(tiny_policy, monkeypatch):
    env = bandit(tiny_policy)
    agent = draft(tiny_policy, env)
    monkeypatch.setattr(
        type(env), "differentiable_reward", lambda self, x: x.sum() * float("nan") + x[:, 0, 0, 0, 0]
    )
    with pytest.raises(
        AgentError, match=r"iteration 1: .*non-finite loss.*headneck/28.*last good checkpoint"
    ):
        agent.learn(2)
    env.close()
