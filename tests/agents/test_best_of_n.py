"""Best-of-N on a real shipped phantom (headneck/28, card phantom_headneck) with the tiny
policy, and the card-fit refusal."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import make_env
from shared_data import LUNG_JSON, needs

import dosegym.agents as agents
from dosegym.agents import BestOfN
from dosegym.errors import AgentError


def test_kept_sample_is_the_best_by_the_card(env, tiny_policy, headneck28):
    agent = agents.get("best_of_n")(env, tiny_policy, {"n": 3, "sample_num_steps": 3, "predict_eta": 1.0})
    assert isinstance(agent, BestOfN) and agent.parameters() == [] and agent.policy is tiny_policy
    doses, reports, k = agent.best(headneck28, seed=2)
    assert doses.shape == (3, *headneck28.grid.shape)
    card = env.cards.card_for(headneck28)
    scores = [card.score(headneck28, d).normalised for d in doses]
    assert [r.normalised for r in reports] == scores
    assert len(set(np.round(scores, 12))) > 1, "the samples should differ in score at eta 1"
    kept = agent.predict(headneck28, seed=2)
    assert card.score(headneck28, kept).normalised == max(scores)
    np.testing.assert_array_equal(kept, doses[k])
    # the N doses are the batched policy.predict call
    np.testing.assert_array_equal(doses, tiny_policy.predict(headneck28, steps=3, seed=2, samples=3, eta=1.0))


def test_n1_equals_policy_predict(env, tiny_policy, headneck28):
    agent = BestOfN(env, tiny_policy, {"n": 1, "sample_num_steps": 4})
    np.testing.assert_array_equal(
        agent.predict(headneck28, seed=5), tiny_policy.predict(headneck28, steps=4, seed=5)
    )


def test_the_run_seed_picks_the_draws(env, tiny_policy, headneck28):
    """Config seed 0 draws as the policy does; another run seed draws other samples, the
    same ones again at the same seed."""
    kw = {"n": 2, "sample_num_steps": 2, "predict_eta": 1.0}
    seed0, seed1, again = (
        BestOfN(env, tiny_policy, {**kw, "seed": s}).samples(headneck28, 3) for s in (0, 1, 1)
    )
    np.testing.assert_array_equal(seed0, tiny_policy.predict(headneck28, steps=2, seed=3, samples=2, eta=1.0))
    assert np.abs(seed1 - seed0).max() > 0
    np.testing.assert_array_equal(seed1, again)


def test_learn_records_the_budget_and_save_load(tmp_path, env, tiny_policy, headneck28):
    seen = []
    agent = BestOfN(env, tiny_policy, {"n": 2, "sample_num_steps": 2, "eval_cases": ["phantoms:headneck/28"]})
    assert agent.learn(5, callback=lambda a, info: seen.append(info)) is agent
    assert agent.samples_trained == 5 and seen == [{"samples": 5, "predictions": 2}]
    out = agent.save(tmp_path / "bon")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "agent.json",
        "config.yaml",
    ]
    loaded = agents.load(out, env=env, policy=tiny_policy)  # the registry picks the class
    assert type(loaded) is BestOfN and loaded.config.n == 2 and loaded.samples_trained == 5
    np.testing.assert_array_equal(loaded.predict(headneck28, 1), agent.predict(headneck28, 1))


def test_predict_without_env_names_what_is_missing(tiny_policy, headneck28):
    with pytest.raises(AgentError, match="no env to take the scorecard"):
        BestOfN(None, tiny_policy, {"n": 2}).predict(headneck28)


@needs(LUNG_JSON)
def test_card_that_does_not_fit_is_refused_unless_allowed(tiny_policy, headneck28):
    env = make_env(tiny_policy, scorecard=str(LUNG_JSON), allow_card_mismatch=True)
    try:
        cfg = {"n": 2, "sample_num_steps": 2, "eval_cases": ["phantoms:headneck/28"]}
        agent = BestOfN(env, tiny_policy, cfg)
        with pytest.raises(AgentError, match=r"does not fit case .*allow_card_mismatch=True"):
            agent.predict(headneck28)
        with pytest.raises(AgentError, match="does not fit case"):
            agent.learn(4)
        allowed = BestOfN(env, tiny_policy, {**cfg, "allow_card_mismatch": True})
        assert allowed.predict(headneck28).shape == headneck28.grid.shape
        allowed.learn(4)
    finally:
        env.close()


def test_import_dosegym_agents_is_torch_free():
    import subprocess

    code = (
        "import sys, dosegym, dosegym.agents as a; a.available(); a.AgentConfig(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_env_from_gym_make_works_through_its_wrappers(tiny_policy, headneck28):
    """``gymnasium.make`` wraps the env (order enforcing, checker); the agent reads its cards
    through ``env.unwrapped``."""
    import gymnasium

    env = gymnasium.make(
        "dosegym/DenoiseDose-v0",
        policy=tiny_policy,
        scorecard="phantom_headneck",
        cases="phantoms:headneck/28",
        steps=4,
    )
    agent = agents.get("best_of_n")(env, tiny_policy, {"n": 2, "sample_num_steps": 3})
    assert agent.predict(headneck28, seed=0).shape == headneck28.grid.shape
