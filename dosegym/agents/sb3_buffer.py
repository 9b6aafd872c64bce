"""PPO's rollout buffer for volume observations: SB3's ``DictRolloutBuffer`` without its copies.

DenoiseDose observations hold the condition volumes and x_t, so a rollout of ``n_steps`` x
``n_envs`` transitions is large (the shipped model's grid: 13 channels of 48 x 64 x 64 float32,
10 MB per transition). SB3's buffer reallocates every array at each ``reset`` (fresh pages,
faulted in on the first write of every rollout), copies each observation twice in ``add``
(``np.array`` then the assignment) and copies the whole buffer once more in ``get``
(``swap_and_flatten``: steps x envs -> one axis, env-major). :class:`VolumeRolloutBuffer`
keeps the observation and action arrays across resets, writes each observation once, and
reads minibatches from the ``(steps, envs)`` arrays by index arithmetic: flat index ``f`` of
SB3's env-major order is step ``f % buffer_size`` of env ``f // buffer_size``. Minibatches are
the same as SB3's for the same numpy random state (same permutation, same samples).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples

#: The per-transition arrays flattened as SB3 does (small: one number per transition).
_SCALARS = ("values", "log_probs", "advantages", "returns")


class VolumeRolloutBuffer(DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` (same contents, same minibatches) that neither reallocates
    nor re-copies its observations and actions (see the module docstring)."""

    def reset(self) -> None:
        kept = getattr(self, "observations", None), getattr(self, "actions", None)
        super().reset()  # the new zero arrays are calloc'd: never written, they cost nothing
        if kept[0] is not None and kept[1] is not None:
            self.observations, self.actions = kept

    def add(  # type: ignore[override]
        self,
        obs: dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: torch.Tensor,
        log_prob: torch.Tensor,
    ) -> None:
        if len(log_prob.shape) == 0:
            log_prob = log_prob.reshape(-1, 1)
        for key, store in self.observations.items():
            store[self.pos] = np.asarray(obs[key]).reshape(store.shape[1:])
        self.actions[self.pos] = np.asarray(action).reshape((self.n_envs, self.action_dim))
        self.rewards[self.pos] = np.asarray(reward)
        self.episode_starts[self.pos] = np.asarray(episode_start)
        self.values[self.pos] = value.clone().cpu().numpy().flatten()
        self.log_probs[self.pos] = log_prob.clone().cpu().numpy()
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True

    def get(  # type: ignore[override]
        self, batch_size: int | None = None
    ) -> Generator[DictRolloutBufferSamples, None, None]:
        assert self.full, ""
        total = self.buffer_size * self.n_envs
        indices = np.random.permutation(total)  # noqa: NPY002 (SB3 draws from the global RNG)
        if not self.generator_ready:
            for name in _SCALARS:
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.generator_ready = True
        batch_size = total if batch_size is None else batch_size
        for start in range(0, total, batch_size):
            yield self._get_samples(indices[start : start + batch_size])

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> DictRolloutBufferSamples:  # type: ignore[override]
        steps, envs = batch_inds % self.buffer_size, batch_inds // self.buffer_size
        return DictRolloutBufferSamples(
            observations={key: self.to_torch(obs[steps, envs]) for key, obs in self.observations.items()},
            actions=self.to_torch(self.actions[steps, envs].astype(np.float32, copy=False)),
            old_values=self.to_torch(self.values[batch_inds].flatten()),
            old_log_prob=self.to_torch(self.log_probs[batch_inds].flatten()),
            advantages=self.to_torch(self.advantages[batch_inds].flatten()),
            returns=self.to_torch(self.returns[batch_inds].flatten()),
        )
