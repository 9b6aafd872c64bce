"""Issue 15 in the envs: a card that does not fit the case is refused (rule 4), a non-finite
model output never becomes an observation or a reward (rule 2), bad keywords, seeds and
counts are ``EnvError`` naming what would be valid (rule 7)."""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from shared_data import LUNG_JSON, need

import dosegym  # noqa: F401
from dosegym.diffusion import DosePolicy
from dosegym.envs.denoise import DenoiseDoseVectorEnv
from dosegym.errors import EnvError, ModelError
from dosegym.scorecards import load_card

HN = "phantoms:headneck/28"
ENV_IDS = ("dosegym/DenoiseDose-v0", "dosegym/GuidedDose-v0", "dosegym/ScorecardBandit-v0")


@pytest.fixture(scope="module")
def lung_card() -> str:
    return str(need(LUNG_JSON))


@pytest.fixture(scope="module")
def nan_policy(tiny_policy) -> DosePolicy:
    """A copy of the tiny policy with every weight NaN (a broken checkpoint)."""
    policy = DosePolicy(copy.deepcopy(tiny_policy.model), sampler="ddim", eta=1.0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.fill_(math.nan)
    return policy


def make(env_id, policy, **kw):
    kw.setdefault("cases", HN)
    kw.setdefault("steps", 2)
    return gym.make(env_id, policy=policy, disable_env_checker=True, **kw)


def on_policy_episode(env, obs):
    """Run a DenoiseDose / vector episode on-policy; the last step's outputs."""
    u = env.unwrapped if hasattr(env, "unwrapped") else env
    while True:
        mean, std = u.policy_step(obs)
        obs, reward, terminated, _, info = env.step(mean + std * u.sample_noise())
        if np.all(terminated):
            return reward, info


# -- rule 4: the card must fit the case -------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_a_card_that_does_not_fit_is_refused(env_id, tiny_policy, lung_card):
    env = make(env_id, tiny_policy, scorecard=lung_card)
    with pytest.raises(EnvError) as info:
        env.reset(seed=0)
    msg = str(info.value)
    for needle in (
        "'Lung 60Gy'",
        HN,
        "'headneck_028'",
        "12.5 %",
        "60 Gy",
        "70 Gy",
        "allow_card_mismatch=True",
    ):
        assert needle in msg


def test_vector_env_refuses_too(tiny_policy, lung_card):
    env = DenoiseDoseVectorEnv(num_envs=2, policy=tiny_policy, cases=HN, steps=2, scorecard=lung_card)
    with pytest.raises(EnvError, match="12.5 %"):
        env.reset(seed=0)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_an_allowed_mismatch_reports_the_matched_share(env_id, tiny_policy, lung_card):
    env = make(env_id, tiny_policy, scorecard=lung_card, allow_card_mismatch=True)
    obs, info = env.reset(seed=0)
    assert info["score_matched_fraction"] == pytest.approx(0.125)
    if env_id.endswith("Bandit-v0"):
        _, reward, _, _, info = env.step(np.full(env.action_space.shape, 1.0, np.float32))
    elif "Guided" in env_id:
        for _ in range(2):
            obs, reward, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    else:
        reward, info = on_policy_episode(env, obs)
    assert info["score_matched_fraction"] == pytest.approx(0.125)
    assert info["score_report"]["matched_fraction"] == pytest.approx(0.125)
    assert math.isfinite(reward)


def test_ansi_render_shows_the_matched_share(tiny_policy, lung_card):
    env = make(
        "dosegym/DenoiseDose-v0",
        tiny_policy,
        scorecard=lung_card,
        allow_card_mismatch=True,
        render_mode="ansi",
    )
    env.reset(seed=0)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in env.render().splitlines()]
    assert ["", "matched", "", "", "15", "120", "12.5 %", ""] in rows


def test_vector_env_info_has_the_matched_share(tiny_policy, lung_card):
    env = DenoiseDoseVectorEnv(
        num_envs=2, policy=tiny_policy, cases=HN, steps=2, scorecard=lung_card, allow_card_mismatch=True
    )
    obs, info = env.reset(seed=0)
    assert np.allclose(info["score_matched_fraction"], 0.125)
    _, info = on_policy_episode(env, obs)
    assert np.allclose(info["score_matched_fraction"], 0.125)


def test_a_card_for_another_prescription_is_refused_or_rescaled(tiny_policy):
    card = load_card("phantom_headneck").rescaled(60.0, 30)  # the right structures, 60 Gy
    env = make("dosegym/DenoiseDose-v0", tiny_policy, scorecard=card)
    with pytest.raises(EnvError, match="prescription 60 Gy differs .* 70 Gy") as info:
        env.reset(seed=0)
    assert "rescale_card=True" in str(info.value) and "carry only" not in str(info.value)
    env = make("dosegym/DenoiseDose-v0", tiny_policy, scorecard=card, rescale_card=True)
    env.reset(seed=0)
    cd = env.unwrapped.case_data(0)
    assert cd.card.prescription_gy == 70.0 and cd.card.fractions == 35 and cd.fit.ok
    ref = load_card("phantom_headneck")
    for got, want in zip(cd.card.items, ref.items):
        assert [p.x for p in got.points] == pytest.approx([p.x for p in want.points])


# -- rule 2: non-finite model outputs ---------------------------------------------------------
def test_denoise_nan_model_raises_model_error(nan_policy):
    env = make("dosegym/DenoiseDose-v0", nan_policy)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ModelError, match=r"step 1/2 .*phantoms:headneck/28"):
        env.unwrapped.policy_step(obs)
    with pytest.raises(ModelError, match="NaN or infinite"):
        env.step(np.zeros(env.action_space.shape, np.float32))


def test_guided_nan_model_raises_at_reset(nan_policy):
    env = make("dosegym/GuidedDose-v0", nan_policy)
    with pytest.raises(ModelError, match=r"step 1/2 .*phantoms:headneck/28"):
        env.reset(seed=0)


def test_vector_nan_model_names_every_case(nan_policy):
    env = DenoiseDoseVectorEnv(num_envs=2, policy=nan_policy, cases=HN, steps=2)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ModelError, match=r"\['phantoms:headneck/28', 'phantoms:headneck/28'\]"):
        env.step(np.zeros(env.action_space.shape, np.float32))


def test_bandit_nan_model_and_nan_action(nan_policy, tiny_policy):
    env = make("dosegym/ScorecardBandit-v0", nan_policy, reward={"scale": "baseline", "baseline_samples": 1})
    env.reset(seed=0)
    with pytest.raises(ModelError, match="NaN or infinite"):
        env.step(np.ones(env.action_space.shape, np.float32))
    env = make("dosegym/ScorecardBandit-v0", tiny_policy)
    env.reset(seed=0)
    action = np.ones(env.action_space.shape, np.float32)
    action[0, 3, 3, 3] = np.nan
    with pytest.raises(EnvError, match="NaN or infinite"):
        env.step(action)


def test_decoded_dose_is_checked(tiny_policy):
    env = make("dosegym/DenoiseDose-v0", tiny_policy)
    env.reset(seed=0)
    u = env.unwrapped
    x = torch.full((1, *u.model_spec.shape), math.inf)
    with pytest.raises(ModelError, match="decoded dose .* NaN or infinite voxels"):
        u.decode(u.case_data(0), x)


def test_in_space_actions_above_the_dose_rule_maximum_are_scored(tiny_policy):
    """The dose rule refuses > 10 x Rx doses by default; an env action space allows them."""
    env = make("dosegym/DenoiseDose-v0", tiny_policy, steps=1)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(np.full(env.action_space.shape, 15.0, np.float32))
    assert terminated and math.isfinite(reward) and info["score_report"]["items"]
    env = make("dosegym/ScorecardBandit-v0", tiny_policy, max_dose=15.0)
    env.reset(seed=0)
    _, reward, _, _, _ = env.step(np.full(env.action_space.shape, 12.0, np.float32))
    assert math.isfinite(reward)


# -- rule 7: keywords, seeds, counts ----------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_a_misspelled_keyword_names_the_valid_ones(env_id):
    with pytest.raises(EnvError, match=r"\['scorcard'\] \(did you mean 'scorecard'\?\)") as info:
        gym.make(env_id, scorcard="phantom_headneck")
    assert "valid keywords:" in str(info.value) and "'case_cache'" in str(info.value)
    with pytest.raises(EnvError, match=r"DenoiseDoseVectorEnv: .*'steps'.*'num_envs'"):
        gym.make_vec("dosegym/DenoiseDose-v0", num_envs=2, stesp=3)


@pytest.mark.parametrize("seed", [-5, 1.5, "7", True])
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_bad_seeds_are_env_errors(env_id, seed, tiny_policy):
    env = make(env_id, tiny_policy)
    with pytest.raises(EnvError, match=r"a seed must be None or an integer >= 0"):
        env.reset(seed=seed)
    env.reset(seed=np.int64(3))  # numpy integers are fine


@pytest.mark.parametrize("index", [1, -1, 0.5, "0"])
def test_bad_case_index(index, tiny_policy):
    env = make("dosegym/DenoiseDose-v0", tiny_policy)
    with pytest.raises(
        EnvError, match=r"case_index=.* out of range; the source has 1 cases: an integer in \[0, 0\]"
    ):
        env.reset(seed=0, options={"case_index": index})


def test_vector_bad_seeds(tiny_policy):
    env = DenoiseDoseVectorEnv(num_envs=2, policy=tiny_policy, cases=HN, steps=2)
    for seed in (-5, [0, -1], 2.5):
        with pytest.raises(EnvError, match="seed"):
            env.reset(seed=seed)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"case_cache": -1}, "case_cache must be an integer >= 1, got -1"),
        ({"case_cache": 0}, "case_cache must be an integer >= 1, got 0"),
        ({"case_cache": 2.5}, "case_cache must be an integer >= 1"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 1.5}, "steps must be an integer >= 1"),
    ],
)
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_bad_counts(env_id, kw, needle, tiny_policy):
    with pytest.raises(EnvError, match=needle):
        make(env_id, tiny_policy, **kw)


def test_bad_pool_and_num_envs(tiny_policy):
    with pytest.raises(EnvError, match="pool must be an integer >= 1"):
        make("dosegym/GuidedDose-v0", tiny_policy, pool=0)
    with pytest.raises(EnvError, match="num_envs must be an integer >= 1"):
        DenoiseDoseVectorEnv(num_envs=0, policy=tiny_policy, cases=HN)
