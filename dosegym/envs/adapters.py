"""The two faces of a batched core: the Gymnasium single env (B = 1) and the native vector env.

A kind's env is ``class XEnv(DoseEnv): core_class = XCore`` and its vector env
``class XVectorEnv(DoseVectorEnv): core_class = XCore``: both take the kind's config as
keywords (``gym.make(id, scorecard=..., cases=...)`` / ``make_vec(id, num_envs=B, ...)``) or
as ``config=``. The core (``env.core``) does the work; the adapters add the batch axis, the
seeding and (vector) autoreset.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from dosegym.envs.cases import CaseData, PretrainedStats
from dosegym.envs.config import RENDER_MODES, EnvConfig, check_seed, count_arg
from dosegym.envs.core import DoseCore
from dosegym.errors import EnvError

#: The core's attributes an adapter shows as its own (``env.unwrapped.policy``, ``.chain``, ...).
CORE_VIEWS = frozenset(
    {"policy", "device", "model_spec", "steps", "reward_config", "cards", "cond_slots", "chain", "max_dose"}
)


class CoreViews:
    """What an adapter shows of its core: the attributes in :data:`CORE_VIEWS` (those the
    kind has: ``chain`` for the chain kinds, ``max_dose`` for the Bandit) and the per-case
    helpers below."""

    core: DoseCore
    _obs_x: Any = None  # the x_t of the last observation handed out

    def __getattr__(self, name: str) -> Any:
        core = self.__dict__.get("core")
        if name in CORE_VIEWS and core is not None:
            return getattr(core, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _given_x(self, obs: dict[str, Any] | None) -> Any:
        """``obs["x_t"]`` when it is not the state's own observation (None otherwise)."""
        return None if obs is None or obs.get("x_t") is self._obs_x else obs["x_t"]

    @staticmethod
    def _out(batched: Any) -> Any:
        """An adapter's view of a batched output (the single env: its only row)."""
        return batched

    def case_data(self, index: int) -> CaseData:
        """Case ``index`` of the source, prepared (cached; see :class:`~dosegym.envs.cases.CaseStore`)."""
        return self.core.case_data(index)

    def decode(self, cd: CaseData, x: torch.Tensor) -> torch.Tensor:
        """Gy on the case grid of one model-grid sample ``x`` ``(C, Z, Y, X)`` (as the reward decodes)."""
        return self.core.decode(cd, x)

    def pretrained_stats(self, cd: CaseData) -> PretrainedStats:
        """Mean points and mean dose of the case's pretrained samples (see the reward docs)."""
        return self.core.pretrained_stats(cd)


class DoseEnv(CoreViews, gym.Env):
    """The single env of a kind: its core at B = 1 (see the kind's class docstring)."""

    core_class: ClassVar[type[DoseCore]]
    metadata: dict[str, Any] = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(self, config: EnvConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        cfg = self.core_class.config_class.coerce(config, kwargs, name=type(self).__name__)
        self.core = self.core_class(cfg, 1, unbatched=True)
        self.action_space = self.core.single_action_space
        self.observation_space = self.core.single_observation_space
        self.render_mode = cfg.render_mode

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=check_seed(seed))
        obs, infos = self.core.reset([self.np_random], options)
        return self._one(obs), infos[0]

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, rewards, terminated, infos = self.core.step(action)
        return self._one(obs), float(rewards[0]), terminated, False, infos[0]

    def render(self) -> np.ndarray | str | None:
        return self.core.render(0)

    def _one(self, obs: dict[str, Any]) -> dict[str, Any]:
        one = {k: v[0] for k, v in obs.items()}
        self._obs_x = one.get("x_t")
        return one

    @staticmethod
    def _out(batched: Any) -> Any:
        return batched[0]


class DoseVectorEnv(CoreViews, VectorEnv):
    """``num_envs`` episodes of a kind in lockstep: its core at B = ``num_envs``.

    Same arguments (an unknown keyword raises ``EnvError`` listing them and ``num_envs``),
    spaces (batched), rewards and infos as the kind's single env (``render_mode`` is not
    supported); ``reset(seed=...)`` takes None, an integer >= 0 or one per sub-env. Sub-env
    ``i`` has its own ``np_random`` (``reset(seed=s)`` seeds it with ``s + i``, as
    ``SyncVectorEnv`` does), which draws its case and its sampler seed exactly as a single
    env with that seed would; only the batched model forward's floating-point rounding
    differs from B single envs. ``reset(options={"case_index": [i_0, ..., i_{B-1}]})`` gives
    each sub-env its own case (one index for all: every sub-env that case).

    **Autoreset**: ``AutoresetMode.NEXT_STEP`` (Gymnasium's default, as ``make_vec`` "sync" /
    "async"): every episode lasts the same number of steps, so all sub-envs terminate
    together; the ``step`` after that ignores its actions, resets every sub-env and returns
    the first observations with reward 0 and ``terminated=False``.
    """

    core_class: ClassVar[type[DoseCore]]
    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, config: EnvConfig | dict[str, Any] | None = None, **kwargs: Any):
        num_envs = count_arg("num_envs", num_envs)
        name = type(self).__name__
        cfg = self.core_class.config_class.coerce(config, kwargs, name=name, extra=("num_envs",))
        if cfg.render_mode is not None:
            raise EnvError(f"{name} does not render; use make_vec(..., vectorization_mode='sync')")
        self.core = self.core_class(cfg, num_envs)
        self.core.ended_message = "the episodes have ended; the next step() resets them"
        self.num_envs = num_envs
        self.render_mode = None
        self.single_observation_space = self.core.single_observation_space
        self.single_action_space = self.core.single_action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs: list[np.random.Generator] | None = None
        self._autoreset = False

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (list, tuple, np.ndarray)):
            seeds = [check_seed(s) for s in seed]
            if len(seeds) != self.num_envs:
                raise EnvError(f"reset: {len(seeds)} seeds for {self.num_envs} envs")
        else:
            first = check_seed(seed) or 0
            seeds = [first + i for i in range(self.num_envs)]
        if self._rngs is None or seed is not None:
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        return self._start(options)

    def step(self, actions: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        b = self.num_envs
        if self._rngs is None:
            raise EnvError("step() before reset(): call reset() first")
        if self._autoreset:
            obs, infos = self._start(None)
            return obs, np.zeros(b), np.zeros(b, bool), np.zeros(b, bool), infos
        obs, rewards, last, step_infos = self.core.step(actions)
        self._autoreset = last
        return self._seen(obs), rewards, np.full(b, last), np.zeros(b, bool), self._merge(step_infos)

    def _start(self, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self._rngs is not None
        self._autoreset = False
        obs, infos = self.core.reset(self._rngs, options)
        return self._seen(obs), self._merge(infos)

    def _merge(self, infos: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, info in enumerate(infos):
            out = self._add_info(out, info, i)
        return out

    def _seen(self, obs: dict[str, Any]) -> dict[str, Any]:
        self._obs_x = obs.get("x_t")
        return obs
