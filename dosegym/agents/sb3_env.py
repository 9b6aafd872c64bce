"""Stable-Baselines3's ``VecEnv`` interface over a dosegym env's batched core.

SB3 steps its own ``VecEnv`` (numpy observations, one info dict per env, auto-reset inside
``step_wait``), not a Gymnasium ``VectorEnv``, so :class:`CoreVecEnv` adapts a kind's core
(``env.core`` of DenoiseDose or GuidedDose, B episodes stepped at once, one batched model
forward per step) to it:

- **observations** go to SB3 as numpy arrays (its rollout and replay buffers are numpy):
  with the core's ``obs_backend="torch"`` on the CPU the conversion is a view, no copy;
- **episodes** of the B sub-envs end together (the sampler's steps): on the last step every
  info gets ``terminal_observation`` and SB3 Monitor's ``episode`` (``r``: return, ``l``:
  length), the finished episodes go to :attr:`CoreVecEnv.episodes`
  (:class:`EpisodeResult`) and all sub-envs reset at once;
- **seeds**: reset round ``r`` (0, 1, ... over the run) seeds sub-env ``i`` with
  ``episode_seeds(r)[i]``, a callable the agent gives (derived from ``(config.seed,
  iteration, index)`` with :func:`rollout_seed`), so a resumed run needs no env RNG state:
  set :attr:`CoreVecEnv.round` and the next reset is the one the uninterrupted run made;
- :func:`scoped_seed` seeds SB3's global draws (stock policies' action noise, minibatch
  order, replay sampling) for one call and restores the generators after;
- ``model_conditions``: the ``cond_<slot>`` entries are the chain's own batched condition
  tensors rather than the observation's copies clamped to the Box bounds (the beam plate
  exceeds 1 slightly on the phantoms), so that a policy that rebuilds the model input from
  observations gives the model exactly the env's input (SB3 does not check bounds);
- ``before_step(core)``, when set, runs before every step (an agent tells the env its step
  Gaussian there, for the KL term).

:func:`rollout_core` gives the core an agent rolls out on: the env's own, or a twin built
from its config with some fields changed (e.g. DenoiseDose with ``pretrained_log_prob=False``
and the torch backend, where the frozen model idles during rollouts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env import VecEnv

from dosegym.envs.core import DoseCore
from dosegym.errors import AgentError

#: Streams of :func:`rollout_seed`: episodes (case and sampler seed), action noise and SB3's
#: global draws of an iteration, initial weights of what SB3 builds.
EPISODES, ACTION_NOISE, MODEL_INIT = 0, 1, 2


def rollout_seed(seed: int, iteration: int, index: int, stream: int = EPISODES) -> int:
    """A 63-bit seed derived from ``(seed, iteration, index)`` for one random ``stream``."""
    state = np.random.SeedSequence([stream, seed % 2**64, iteration, index]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


@contextmanager
def scoped_seed(seed: int) -> Iterator[None]:
    """torch's CPU and numpy's global generators seeded with ``seed`` for the duration and
    restored after (SB3's stock policies and buffers draw from them; nothing leaks out)."""
    np_state = np.random.get_state()  # noqa: NPY002 (SB3 draws from numpy's legacy global generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002
        try:
            yield
        finally:
            np.random.set_state(np_state)  # noqa: NPY002


def rollout_core(env: Any, **changes: Any) -> DoseCore:
    """The batched core of ``env`` (a dosegym single or vector env) when its config already
    has ``changes``, else a twin core on the same config with ``changes`` applied."""
    base = getattr(env, "unwrapped", env)
    core = getattr(base, "core", None)
    if not isinstance(core, DoseCore):
        raise AgentError(f"expected a dosegym env (DenoiseDose or GuidedDose), got {type(env).__name__}")
    if not core.unbatched and all(getattr(core.config, k) == v for k, v in changes.items()):
        return core
    return type(core)(dataclasses.replace(core.config, **changes), core.batch)


@dataclass
class EpisodeResult:
    """One finished episode: its return, the normalised exact card score, the MAE in Gy to the
    reference dose (NaN without one), the mean per-step KL (NaN when none was charged)."""

    case_id: str
    reward: float
    score: float
    mae_gy: float
    kl: float


def numpy_obs(obs: dict[str, Any]) -> dict[str, np.ndarray]:
    """An observation with every entry as a numpy array (a view of CPU tensors)."""
    return {
        k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in obs.items()
    }


class CoreVecEnv(VecEnv):
    """SB3 ``VecEnv`` over a dosegym core (see the module docstring)."""

    def __init__(
        self, core: DoseCore, episode_seeds: Callable[[int], list[int]], model_conditions: bool = False
    ) -> None:
        self.core = core
        self.model_conditions = bool(model_conditions)
        self.episode_seeds = episode_seeds
        self.round = 0
        self.before_step: Callable[[DoseCore], None] | None = None
        self.episodes: list[EpisodeResult] = []
        self._returns = np.zeros(core.batch)
        self._kls: list[list[float]] = [[] for _ in range(core.batch)]
        self._actions: Any = None
        super().__init__(core.batch, core.single_observation_space, core.single_action_space)

    def reset(self) -> dict[str, np.ndarray]:
        seeds = self.episode_seeds(self.round)
        if len(seeds) != self.num_envs:
            raise AgentError(f"episode_seeds gave {len(seeds)} seeds for {self.num_envs} envs")
        obs, infos = self.core.reset([seeding.np_random(s)[0] for s in seeds], None)
        self.reset_infos = infos
        self._returns[:] = 0.0
        self._kls = [[] for _ in range(self.num_envs)]
        return self._observe(obs)

    def _observe(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The observation as numpy; with ``model_conditions`` its ``cond_<slot>`` entries
        are the chain's own condition tensors (the env clamps them to the Box bounds)."""
        if self.model_conditions:
            cond = self.core.chain.cond
            for slot, role in cond.roles.items():
                if role == "condition" and f"cond_{slot}" in obs:
                    obs[f"cond_{slot}"] = cond.tensors[slot]
        return numpy_obs(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict[str, Any]]]:
        if self.before_step is not None:
            self.before_step(self.core)
        obs, rewards, last, infos = self.core.step(self._actions)
        self._returns += rewards
        for i, info in enumerate(infos):
            if "kl" in info:
                self._kls[i].append(float(info["kl"]))
        out = self._observe(obs)
        if last:
            for i, info in enumerate(infos):
                info["terminal_observation"] = {k: v[i] for k, v in out.items()}
                info["episode"] = {"r": float(self._returns[i]), "l": self.core.steps}
                self.episodes.append(self._result(i, info))
            self.round += 1
            out = self.reset()
        return out, rewards.astype(np.float32), np.full(self.num_envs, last), infos

    def _result(self, i: int, info: dict[str, Any]) -> EpisodeResult:
        kls = self._kls[i]
        return EpisodeResult(
            case_id=self.core.cds[i].case.case_id,
            reward=float(self._returns[i]),
            score=float(info["score_normalised"]),
            mae_gy=float(info.get("reference_mae_gy", math.nan)),
            kl=float(np.mean(kls)) if kls else math.nan,
        )

    def take_episodes(self) -> list[EpisodeResult]:
        """The episodes finished since the last call."""
        done, self.episodes = self.episodes, []
        return done

    # -- the rest of SB3's VecEnv interface (one core: every index sees the same object) --
    def close(self) -> None:
        """Nothing to close: the core belongs to the env it came from."""

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.core, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.core, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any
    ) -> list[Any]:
        result = getattr(self.core, method_name)(*method_args, **method_kwargs)
        return [result] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(self._get_indices(indices))
