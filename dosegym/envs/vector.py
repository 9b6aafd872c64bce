"""A native batched DenoiseDose: B episodes advanced by one batched model forward per step."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from dosegym.diffusion.sample import seeded_generator
from dosegym.diffusion.slots import collate
from dosegym.envs.base import (
    CaseData,
    ReverseChain,
    check_seed,
    count_arg,
    log_prob_or_nan,
    reject_unknown_kwargs,
)
from dosegym.envs.denoise import DenoiseDoseEnv
from dosegym.envs.reward import compose, gaussian_kl
from dosegym.errors import EnvError


class DenoiseDoseVectorEnv(VectorEnv):
    """``num_envs`` DenoiseDose episodes in lockstep, one batched model forward per step.

    Same arguments (an unknown keyword raises ``EnvError`` listing them and ``num_envs``),
    spaces (batched), rewards and infos as :class:`DenoiseDoseEnv` (``render_mode`` is not
    supported); ``reset(seed=...)`` takes None, an integer >= 0 or one per sub-env. Sub-env
    ``i`` has its own ``np_random`` (``reset(seed=s)`` seeds it with ``s + i``, as
    ``SyncVectorEnv`` does), which draws its case and its sampler seed exactly as a single
    env with that seed would; only the batched forward's floating-point rounding differs
    from B single envs.

    **Autoreset**: ``AutoresetMode.NEXT_STEP`` (Gymnasium's default, as ``make_vec`` "sync" /
    "async"): every episode lasts ``steps`` steps, so all sub-envs terminate together; the
    ``step`` after that ignores its actions, resets every sub-env and returns the first
    observations with reward 0 and ``terminated=False``.

    Agent helpers act on the whole batch: ``policy_step(obs)`` -> ``(mean (B, C, Z, Y, X),
    std (B, 1, 1, 1, 1))``, ``sample_noise()`` -> ``(B, C, Z, Y, X)`` (each sub-env's generator),
    ``set_agent_gaussian(mean, std)``.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, **kwargs: Any) -> None:
        num_envs = count_arg("num_envs", num_envs)
        valid = inspect.signature(DenoiseDoseEnv.__init__).parameters
        unknown = {k: v for k, v in kwargs.items() if k not in valid or k in ("self", "unknown")}
        reject_unknown_kwargs(DenoiseDoseEnv, unknown, extra=("num_envs",), name=type(self).__name__)
        if kwargs.get("render_mode") is not None:
            raise EnvError(
                "DenoiseDoseVectorEnv does not render; use make_vec(..., vectorization_mode='sync')"
            )
        self.core = DenoiseDoseEnv(**kwargs)
        self.num_envs = int(num_envs)
        self.render_mode = None
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.chain = ReverseChain(self.core.policy, self.core.steps)
        self._rngs: list[np.random.Generator] | None = None
        self._cds: list[CaseData] = []
        self._cond_obs: dict[str, Any] = {}
        self._x_obs: Any = None
        self._agent: tuple[torch.Tensor, torch.Tensor] | None = None
        self._autoreset = False

    # -- Gymnasium API ------------------------------------------------------------------
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
        if self._rngs is None or self.chain.x is None:
            raise EnvError("step() before reset(): call reset() first")
        if self._autoreset:
            obs, infos = self._start(None)
            return obs, np.zeros(b), np.zeros(b, bool), np.zeros(b, bool), infos
        core = self.core
        a = core.as_action(actions, self.single_action_space, batch=b)
        dist = self.chain.distribution()
        log_prob = log_prob_or_nan(a, dist.mean, dist.std).cpu().numpy()
        kl = None
        if self._agent is not None and bool((dist.std > 0).all()):
            kl = gaussian_kl(self._agent[0], self._agent[1], dist.mean, dist.std).cpu().numpy()
        self._agent = None
        t = int(self.chain.t)
        last = self.chain.k == core.steps - 1
        pre_x0 = dist.pred_original_sample if last else None
        self.chain.advance(a)
        rewards = np.zeros(b)
        infos: dict[str, Any] = {}
        for i, cd in enumerate(self._cds):
            kl_i = None if kl is None else float(kl[i])
            if last:
                assert pre_x0 is not None
                rewards[i], info = core.finish(cd, a[i], pre_x0[i], kl_i)
            else:
                rewards[i], terms = compose(core.reward_config, None, None, kl_i)
                info = {"reward_terms": terms}
            info.update(step=self.chain.k, timestep=t, log_prob=float(log_prob[i]))
            if kl_i is not None:
                info["kl"] = kl_i
            infos = self._add_info(infos, info, i)
        self._autoreset = last
        return self._obs(), rewards, np.full(b, last), np.zeros(b, bool), infos

    # -- agent helpers --------------------------------------------------------------------
    def policy_step(self, obs: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """The pretrained Gaussians of the current step, batched (see class docstring)."""
        self._running()
        dist = self.chain.distribution()
        if obs is not None and obs.get("x_t") is not self._x_obs:
            x = self.core.as_action(obs["x_t"], self.single_observation_space["x_t"], batch=self.num_envs)
            if not torch.equal(x, self.chain.x):
                dist = self.chain.distribution_at(x)
        return self.core.to_obs(dist.mean), self.core.to_obs(dist.std)

    def sample_noise(self) -> Any:
        """This step's noise of every sub-env ``(B, C, Z, Y, X)``, from its own generator."""
        self._running()
        return self.core.to_obs(self.chain.noise())

    def set_agent_gaussian(self, mean: Any, std: Any) -> None:
        """The acting policy's Gaussians of the coming step, ``(B, C, Z, Y, X)`` means and
        std > 0 broadcastable to them; the step charges and logs the KL (next step only)."""
        self._running()
        m = self.core.as_action(mean, self.single_action_space, batch=self.num_envs)
        s = torch.as_tensor(std if isinstance(std, torch.Tensor) else np.asarray(std, np.float32))
        s = s.to(self.core.device, torch.float32)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise EnvError("set_agent_gaussian: std must be finite and > 0")
        try:
            torch.broadcast_shapes(s.shape, m.shape)
        except RuntimeError as exc:
            raise EnvError(
                f"set_agent_gaussian: std shape {tuple(s.shape)} does not broadcast to {tuple(m.shape)}"
            ) from exc
        self._agent = (m, s)

    # -- internals ----------------------------------------------------------------------
    def _running(self) -> None:
        if self.chain.x is None:
            raise EnvError("call reset() first")
        if not self.chain.running:
            raise EnvError("the episodes have ended; the next step() resets them")

    def _start(self, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        core = self.core
        assert self._rngs is not None
        self._cds = [core._choose_case(rng, options) for rng in self._rngs]
        seeds = [core._sampler_seed(rng) for rng in self._rngs]
        cond = collate([cd.cond_input for cd in self._cds]).to(core.device)
        self.chain.start(cond, [seeded_generator(s) for s in seeds], [cd.key for cd in self._cds])
        self._agent, self._autoreset = None, False
        per_case = [core.cond_obs(cd) for cd in self._cds]
        stack = np.stack if core.obs_backend == "numpy" else torch.stack
        self._cond_obs = {k: stack([c[k] for c in per_case]) for k in per_case[0]}
        infos: dict[str, Any] = {}
        for i, (cd, s) in enumerate(zip(self._cds, seeds)):
            info = {
                "case_id": cd.case.case_id,
                "case_key": cd.key,
                "sampler_seed": s,
                "scorecard": cd.card.name,
                "score_matched_fraction": cd.fit.matched_fraction,
                "step": 0,
                "timestep": int(self.chain.t),
            }
            infos = self._add_info(infos, info, i)
        return self._obs(), infos

    def _obs(self) -> dict[str, Any]:
        assert self.chain.x is not None
        self._x_obs = self.core.to_obs(self.chain.x)
        ts = np.full((self.num_envs, 1), self.chain.timestep_fraction(), dtype=np.float32)
        return {
            "x_t": self._x_obs,
            "timestep": ts if self.core.obs_backend == "numpy" else torch.from_numpy(ts).to(self.core.device),
            **self.core.fresh(self._cond_obs),
        }
