"""``dosegym/DenoiseDose-v0``: the reverse diffusion chain as an MDP (the MDP of DDPO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from dosegym.diffusion.policy import DosePolicy
from dosegym.diffusion.sample import seeded_generator
from dosegym.diffusion.slots import collate
from dosegym.envs.base import (
    CaseData,
    DoseEnvBase,
    ReverseChain,
    check_seed,
    log_prob_or_nan,
    reject_unknown_kwargs,
)
from dosegym.envs.reward import RewardConfig, compose, gaussian_kl
from dosegym.errors import EnvError
from dosegym.scorecards.scorecard import Scorecard


class DenoiseDoseEnv(DoseEnvBase):
    """
    ## Description

    The reverse diffusion chain of a dose model as a Markov decision process, the MDP that
    DDPO optimises (Black et al., 2023). An episode denoises one case's dose: the state is
    (conditions, timestep, x_t); the agent's action is the next state x_{t-1}. A pretrained
    ``DosePolicy`` provides the reference Gaussian of every step (``policy_step``); after
    the sampler's last step the dose is decoded onto the case grid and scored with the
    scorecard.

    ## Action Space

    ``Box(-x_bound, x_bound, (C, Z, Y, X), float32)``: x_{t-1} on the model grid in model units
    (dose: 1.0 = the case's highest prescription), C = 1 for the dose slot. The action is
    the next state as given (a deterministic transition). An action of the wrong shape, a
    non-floating dtype, with NaN/inf or outside the bounds raises ``EnvError`` (never clipped).
    On-policy actions: ``mean, std = env.unwrapped.policy_step(obs)`` then
    ``mean + std * env.unwrapped.sample_noise()``.

    ## Observation Space

    ``Dict``:

    - ``x_t``: ``Box(-x_bound, x_bound, (C, Z, Y, X), float32)``, the current state;
    - ``timestep``: ``Box(0, 1, (1,), float32)``, the next step's diffusion timestep over
      ``num_train_timesteps - 1`` (0 once the chain has ended);
    - ``cond_<slot>`` for every condition slot of the model (``ct`` in [-1, 1]; ``body``,
      ``targets``, ``oars``, ``beam_plate``, ``angle_plate`` in [0, 1]), model grid, zeros
      for slots the case lacks;
    - ``cond_present``: ``MultiBinary``, which condition slots the case has.

    ``obs_backend="torch"`` returns torch tensors on the env's device instead (no copies to
    numpy; not Gymnasium-checkable).

    ## Rewards

    See :mod:`dosegym.envs.reward`: ``w_score * S - w_fid * F - w_kl * KL``. ``S`` and ``F``
    come on the last step only (the scorecard of the decoded dose on the case grid, scaled
    ``raw`` / ``normalised`` / ``baseline``); ``KL`` is charged at each step where the agent
    told the env its Gaussian with :meth:`set_agent_gaussian`. With the defaults the reward
    is 0 until the last step, then the normalised scorecard total.

    ## Starting State

    A case drawn uniformly from the case source with ``np_random`` (or
    ``reset(options={"case_index": i})``) and x_T ~ N(0, I) drawn from a CPU
    ``torch.Generator`` seeded with ``info["sampler_seed"]`` (itself drawn from
    ``np_random``). With the pretrained policy's on-policy actions the episode reproduces
    ``policy.predict(case, steps, sampler=policy.sampler, seed=info["sampler_seed"], eta=policy.eta)``
    exactly.

    ## Episode End

    Terminates (``terminated=True``) after ``steps`` steps, the sampler's schedule. Never
    truncated.

    ## Info

    Every step: ``step``, ``timestep``, ``log_prob`` (the action's log-density under the
    pretrained step Gaussian, averaged over elements; NaN for a deterministic step), ``kl``
    when the agent gave its Gaussian. At reset: ``case_id``, ``case_key``, ``sampler_seed``,
    ``scorecard``, ``score_matched_fraction`` (the share of the card's maximum that the
    items the case matches carry, :func:`~dosegym.scorecards.fit.card_fit`). On the last step
    also: ``score_report`` (the full ``ScoreReport`` as a dict), ``score_total``,
    ``score_normalised``, ``score_matched_fraction``, ``reward_terms``, ``fidelity_anchor``,
    ``fidelity_mae_gy``, ``reference_mae_gy`` (when the case has a reference dose) and
    ``baseline_points`` (``scale="baseline"``).

    ## Arguments

    - ``policy``: a ``DosePolicy`` (default ``dosegym.diffusion.load_pretrained()``); the env
      never changes its weights. Its sampler (``ddim`` with ``eta`` > 0, or ``ddpm``) and eta
      define the step Gaussians.
    - ``cases``: the case source (:mod:`dosegym.envs.sources`), default ``"phantoms:headneck"``.
    - ``scorecard``: a built-in card name, a card file or a ``Scorecard``; default the
      built-in card of each case's site (``phantom_headneck`` for head-and-neck phantoms,
      ``headneck_rtog`` for OpenKBP patients, ...).
    - ``steps``: reverse steps per episode (default 20).
    - ``reward``: a :class:`~dosegym.envs.reward.RewardConfig` or a dict of its fields.
    - ``device``: ``"cpu"`` / ``"cuda"`` (default: the policy's device).
    - ``obs_backend``: ``"numpy"`` (default) or ``"torch"``.
    - ``render_mode``: ``"rgb_array"`` (slices of the current x̂0) or ``"ansi"`` (its score table).
    - ``x_bound``: bound of the state and action Boxes (default 20).
    - ``case_cache``: prepared cases kept in memory (an integer >= 1, default 16).
    - ``allow_card_mismatch``: score with a card that does not fit the case (default False:
      ``reset`` raises ``EnvError`` when the case's matched items carry less than half the
      card's maximum, or the card's prescription is not the case's highest one).
    - ``rescale_card``: rescale a card whose prescription differs from the case's highest one
      to it first (:meth:`~dosegym.scorecards.Scorecard.rescaled`, PlanScoreCard's rules;
      default False).

    An unknown keyword raises ``EnvError`` naming the valid ones; ``reset(seed=...)`` takes
    None or an integer >= 0. A model output (x̂0, step mean) or decoded dose with NaN or
    infinite values raises ``ModelError`` naming the step and the case.

    ```python
    env = gymnasium.make("dosegym/DenoiseDose-v0", scorecard="headneck_rtog",
                         cases="phantoms:headneck")
    ```
    """

    def __init__(
        self,
        policy: DosePolicy | None = None,
        cases: Any = "phantoms:headneck",
        scorecard: str | Path | Scorecard | None = None,
        steps: int = 20,
        reward: RewardConfig | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        obs_backend: str = "numpy",
        render_mode: str | None = None,
        x_bound: float = 20.0,
        case_cache: int = 16,
        allow_card_mismatch: bool = False,
        rescale_card: bool = False,
        **unknown: Any,
    ) -> None:
        reject_unknown_kwargs(type(self), unknown)
        super().__init__(
            policy,
            cases,
            scorecard,
            steps,
            reward,
            device,
            obs_backend,
            render_mode,
            x_bound,
            case_cache,
            allow_card_mismatch=allow_card_mismatch,
            rescale_card=rescale_card,
        )
        xb = self.x_bound
        self.action_space = spaces.Box(-xb, xb, self.gen_shape, np.float32)
        self.observation_space = spaces.Dict(
            {
                "x_t": spaces.Box(-xb, xb, self.gen_shape, np.float32),
                "timestep": spaces.Box(0.0, 1.0, (1,), np.float32),
                **self.cond_spaces(),
            }
        )
        self.chain = ReverseChain(self.policy, self.steps)
        self._cd: CaseData | None = None
        self._x_obs: Any = None
        self._agent: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- Gymnasium API ------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=check_seed(seed))
        cd = self._choose_case(self.np_random, options)
        sampler_seed = self._sampler_seed(self.np_random)
        self.chain.start(collate([cd.cond_input]).to(self.device), [seeded_generator(sampler_seed)], [cd.key])
        self._cd, self._agent, self._last_report = cd, None, None
        info = {
            "case_id": cd.case.case_id,
            "case_key": cd.key,
            "sampler_seed": sampler_seed,
            "scorecard": cd.card.name,
            "score_matched_fraction": cd.fit.matched_fraction,
            "step": 0,
            "timestep": int(self.chain.t),
        }
        return self._obs(), info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        cd = self._running()
        a = self.as_action(action, self.action_space)
        dist = self.chain.distribution()
        log_prob = float(log_prob_or_nan(a, dist.mean, dist.std)[0])
        kl = None
        if self._agent is not None and bool((dist.std > 0).all()):
            kl = float(gaussian_kl(self._agent[0], self._agent[1], dist.mean, dist.std)[0])
        self._agent = None
        t = int(self.chain.t)
        last = self.chain.k == self.steps - 1
        pretrained_x0 = dist.pred_original_sample[0] if last else None
        self.chain.advance(a)
        if last:
            reward, info = self.finish(cd, a[0], pretrained_x0, kl)
        else:
            reward, terms = compose(self.reward_config, None, None, kl)
            info = {"reward_terms": terms}
        info.update(step=self.chain.k, timestep=t, log_prob=log_prob)
        if kl is not None:
            info["kl"] = kl
        return self._obs(), float(reward), last, False, info

    # -- agent helpers --------------------------------------------------------------------
    def policy_step(self, obs: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """The pretrained policy's Gaussian of the current step: ``(mean, std)``, mean
        ``(C, Z, Y, X)``, std ``(1, 1, 1, 1)`` (numpy float32 or torch, as ``obs_backend``).

        ``obs``: the current observation (default); an observation whose ``x_t`` differs
        from the env's state gives the Gaussian from that ``x_t`` at the current timestep.
        """
        self._running()
        dist = self.chain.distribution()
        if obs is not None and obs.get("x_t") is not self._x_obs:
            x = self.as_action(obs["x_t"], self.observation_space["x_t"])
            if not torch.equal(x, self.chain.x):
                dist = self.chain.distribution_at(x)
        return self.to_obs(dist.mean[0]), self.to_obs(dist.std[0])

    def sample_noise(self) -> Any:
        """Standard normal noise ``(C, Z, Y, X)`` for the current step, drawn from the episode's
        generator (call once per step, as the sampler does, to stay on the seeded path)."""
        self._running()
        return self.to_obs(self.chain.noise()[0])

    def set_agent_gaussian(self, mean: Any, std: Any) -> None:
        """Tell the env the acting policy's Gaussian of the coming step (``mean``
        ``(C, Z, Y, X)``, ``std`` > 0 broadcastable to it) so that the step charges
        ``w_kl * KL(agent || pretrained)`` and logs ``info["kl"]`` (not on a deterministic
        pretrained step, std = 0, which has no KL). Applies to the next step only."""
        self._running()
        m = self.as_action(mean, self.action_space)
        s = torch.as_tensor(np.asarray(std, dtype=np.float32) if not isinstance(std, torch.Tensor) else std)
        s = s.to(self.device, torch.float32)
        if s.ndim > len(self.gen_shape) or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise EnvError("set_agent_gaussian: std must be finite, > 0 and broadcastable to (C, Z, Y, X)")
        self._agent = (m, s.reshape(1, *s.shape) if s.ndim == len(self.gen_shape) else s)

    # -- internals ----------------------------------------------------------------------
    def _running(self) -> CaseData:
        if self._cd is None or self.chain.x is None:
            raise EnvError("step() / policy_step() before reset(): call reset() first")
        if not self.chain.running:
            raise EnvError("the episode has ended (terminated); call reset() to start a new one")
        return self._cd

    def _obs(self) -> dict[str, Any]:
        assert self._cd is not None and self.chain.x is not None
        self._x_obs = self.to_obs(self.chain.x[0])
        ts = np.array([self.chain.timestep_fraction()], dtype=np.float32)
        return {
            "x_t": self._x_obs,
            "timestep": ts if self.obs_backend == "numpy" else torch.from_numpy(ts).to(self.device),
            **self.cond_obs(self._cd),
        }

    def current_x0(self) -> tuple[CaseData, torch.Tensor] | None:
        if self._cd is None or self.chain.x is None:
            return None
        if not self.chain.running:
            return self._cd, self.chain.x[0]
        return self._cd, self.chain.distribution().pred_original_sample[0]
