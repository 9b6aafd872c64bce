"""VolumeRolloutBuffer: the same contents and minibatches as SB3's DictRolloutBuffer, kept
arrays across rollouts."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer

from dosegym.agents.sb3_buffer import VolumeRolloutBuffer

OBS = spaces.Dict(
    {
        "x_t": spaces.Box(-5, 5, (1, 3, 4, 5), np.float32),
        "cond_present": spaces.MultiBinary(3),
        "timestep": spaces.Box(0, 1, (1,), np.float32),
    }
)
ACTION = spaces.Box(-5, 5, (1, 3, 4, 5), np.float32)


def _fill(buffer, rng: np.random.Generator, steps: int, envs: int) -> None:
    for _ in range(steps):
        obs = {k: rng.random((envs, *s.shape)).astype(s.dtype) for k, s in OBS.spaces.items()}
        buffer.add(
            obs,
            rng.random((envs, *ACTION.shape)).astype(np.float32),
            rng.random(envs),
            (rng.random(envs) > 0.5).astype(np.float32),
            torch.from_numpy(rng.random(envs)),
            torch.from_numpy(rng.random(envs)),
        )
    buffer.compute_returns_and_advantage(torch.from_numpy(rng.random(envs)), np.zeros(envs))


def test_same_minibatches_as_sb3_over_rollouts():
    steps, envs = 5, 3
    ours = VolumeRolloutBuffer(steps, OBS, ACTION, "cpu", gae_lambda=0.9, gamma=1.0, n_envs=envs)
    theirs = DictRolloutBuffer(steps, OBS, ACTION, "cpu", gae_lambda=0.9, gamma=1.0, n_envs=envs)
    kept = ours.observations["x_t"]
    for rollout in range(3):
        for b in (ours, theirs):
            b.reset()
            _fill(b, np.random.default_rng(rollout), steps, envs)
        assert ours.observations["x_t"] is kept  # no reallocation
        for epoch in range(2):
            np.random.seed(10 * rollout + epoch)  # noqa: NPY002 (SB3 draws from the global RNG)
            a = list(ours.get(4))
            np.random.seed(10 * rollout + epoch)  # noqa: NPY002 (SB3 draws from the global RNG)
            b = list(theirs.get(4))
            assert len(a) == len(b) == 4  # 15 transitions in minibatches of 4
            for x, y in zip(a, b):
                for key in OBS.spaces:
                    torch.testing.assert_close(x.observations[key], y.observations[key], rtol=0, atol=0)
                for field in ("actions", "old_values", "old_log_prob", "advantages", "returns"):
                    torch.testing.assert_close(getattr(x, field), getattr(y, field), rtol=0, atol=0)
