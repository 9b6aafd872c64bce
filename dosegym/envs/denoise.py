"""``dosegym/DenoiseDose-v0``: the reverse diffusion chain as an MDP (the MDP of DDPO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from dosegym.envs.adapters import CoreViews, DoseEnv, DoseVectorEnv
from dosegym.envs.config import EnvConfig
from dosegym.envs.core import ChainCore, Transition
from dosegym.envs.reward import gaussian_kl
from dosegym.errors import EnvError


@dataclass(frozen=True, eq=False)
class DenoiseConfig(EnvConfig):
    """DenoiseDose's arguments: :class:`~dosegym.envs.config.EnvConfig`'s plus ``x_bound``
    (bound of the state and action Boxes) and ``pretrained_log_prob`` (run the pretrained
    model at every step for ``info["log_prob"]``; False: only where the reward needs it)."""

    x_bound: float = 20.0
    pretrained_log_prob: bool = True

    CHECKS = {"x_bound": (">0", "a finite number > 0")}

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(pretrained_log_prob=bool(self.pretrained_log_prob))


class DenoiseCore(ChainCore):
    """B DenoiseDose episodes: the action is each episode's next state x_{t-1}."""

    config_class = DenoiseConfig

    def __init__(self, config: DenoiseConfig, batch: int, unbatched: bool = False) -> None:
        super().__init__(config, batch, unbatched)
        xb = config.x_bound
        self.single_action_space = spaces.Box(-xb, xb, self.gen_shape, np.float32)
        self.single_observation_space = spaces.Dict(
            {
                "x_t": spaces.Box(-xb, xb, self.gen_shape, np.float32),
                "timestep": spaces.Box(0.0, 1.0, (1,), np.float32),
                **self.cond_spaces(),
            }
        )
        self._agent: tuple[torch.Tensor, torch.Tensor] | None = None

    def _begin(self, rngs: list[np.random.Generator]) -> list[dict[str, Any]]:
        self._agent = None
        return super()._begin(rngs)

    def _chain_step(self, actions: Any) -> Transition:
        a = self.as_action(actions, self.single_action_space)
        every_step = self.config.pretrained_log_prob
        last = self.chain.k == self.steps - 1
        dist = None
        if every_step or self._agent is not None or last and self._anchor_needed():
            dist = self.chain.distribution()
        kl = None
        if self._agent is not None and dist is not None and bool((dist.std > 0).all()):
            kl = gaussian_kl(self._agent[0], self._agent[1], dist.mean, dist.std).cpu().numpy()
        self._agent = None
        if every_step:
            log_prob = self.chain.step(a).log_prob
            assert log_prob is not None
            extras = [{"log_prob": float(lp)} for lp in log_prob.cpu().numpy()]
        else:  # the agent's own forward chose the step: the frozen model idles
            self.chain.advance(a)
            extras = [{} for _ in range(self.batch)]
        return Transition(a, None if dist is None else dist.pred_original_sample, kl, False, extras)

    def _anchor_needed(self) -> bool:
        """Whether the last step's fidelity anchor is the pretrained x̂0 (fidelity
        ``"pretrained"``, or ``"auto"`` with an episode whose case has no reference dose)."""
        fidelity = self.reward_config.fidelity
        no_reference = any(cd.reference_gy is None for cd in self.cds)
        return fidelity == "pretrained" or fidelity == "auto" and no_reference

    def observation(self) -> dict[str, Any]:
        assert self.chain.x is not None
        return {"x_t": self.to_obs(self.chain.x), "timestep": self.timestep_obs(), **self.batch_cond_obs()}

    def current_x0(self, i: int) -> torch.Tensor:
        return self.x0()[i]

    # -- agent helpers (batched) ------------------------------------------------------------
    def policy_step(self, x_t: Any = None) -> tuple[Any, Any]:
        """The pretrained Gaussians ``(mean (B, C, Z, Y, X), std (B, 1, 1, 1, 1))`` of the
        current step, from the state or from another ``x_t``."""
        self.check_running()
        dist = self.chain.distribution()
        if x_t is not None:
            x = self.as_action(x_t, self.single_observation_space["x_t"])
            if not torch.equal(x, self.chain.x):
                dist = self.chain.distribution_at(x)
        return self.to_obs(dist.mean), self.to_obs(dist.std)

    def sample_noise(self) -> Any:
        """This step's noise ``(B, C, Z, Y, X)``, each episode's from its own generator."""
        self.check_running()
        return self.to_obs(self.chain.noise())

    def set_agent_gaussian(self, mean: Any, std: Any) -> None:
        """The acting policy's Gaussians of the coming step (means as actions, std > 0
        broadcastable to them); the step charges and logs the KL (next step only)."""
        self.check_running()
        m = self.as_action(mean, self.single_action_space)
        s = torch.as_tensor(std if isinstance(std, torch.Tensor) else np.asarray(std, np.float32))
        s = s.to(self.device, torch.float32)
        if self.unbatched and s.ndim == len(self.gen_shape):
            s = s[None]
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise EnvError("set_agent_gaussian: std must be finite and > 0")
        try:
            ok = torch.broadcast_shapes(s.shape, m.shape) == m.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise EnvError(
                f"set_agent_gaussian: std shape {tuple(s.shape)} does not broadcast to {tuple(m.shape)}"
            )
        self._agent = (m, s)


class DenoiseHelpers(CoreViews):
    """DenoiseDose's agent helpers on an adapter (unbatched on the single env)."""

    core: DenoiseCore

    def policy_step(self, obs: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """The pretrained policy's Gaussian of the current step: ``(mean, std)``, mean like
        an action, std ``(1, 1, 1, 1)`` per episode (numpy float32 or torch, as
        ``obs_backend``). ``obs``: the current observation (default); an observation whose
        ``x_t`` differs from the env's state gives the Gaussian from that ``x_t`` at the
        current timestep."""
        mean, std = self.core.policy_step(self._given_x(obs))
        return self._out(mean), self._out(std)

    def sample_noise(self) -> Any:
        """Standard normal noise like an action for the current step, drawn from the
        episode's generator (call once per step, as the sampler does, to stay on the seeded
        path)."""
        return self._out(self.core.sample_noise())

    def set_agent_gaussian(self, mean: Any, std: Any) -> None:
        """Tell the env the acting policy's Gaussian of the coming step (``mean`` like an
        action, ``std`` > 0 broadcastable to it) so that the step charges
        ``w_kl * KL(agent || pretrained)`` and logs ``info["kl"]`` (not on a deterministic
        pretrained step, std = 0, which has no KL). Applies to the next step only."""
        self.core.set_agent_gaussian(mean, std)


class DenoiseDoseEnv(DenoiseHelpers, DoseEnv):
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
    pretrained step Gaussian, averaged over elements; NaN for a deterministic step; not with
    ``pretrained_log_prob=False``), ``kl`` when the agent gave its Gaussian. At reset:
    ``case_id``, ``case_key``, ``sampler_seed``,
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
    - ``pretrained_log_prob``: run the pretrained model at every step for ``info["log_prob"]``
      (default True). False, for agents whose own model chooses the steps: the frozen model
      runs only where the reward needs it (the KL of a step whose Gaussian the agent gave,
      the pretrained x̂0 of the last step as the fidelity anchor), so a rollout with
      ``w_kl = 0`` costs the agent's one forward per step.
    - ``case_cache``: prepared cases kept in memory (an integer >= 1, default 16).
    - ``allow_card_mismatch``: score with a card that does not fit the case (default False:
      ``reset`` raises ``EnvError`` when the case's matched items carry less than half the
      card's maximum, or the card's prescription is not the case's highest one).
    - ``rescale_card``: rescale a card whose prescription differs from the case's highest one
      to it first (:meth:`~dosegym.scorecards.Scorecard.rescaled`, PlanScoreCard's rules;
      default False).

    The arguments are the fields of :class:`DenoiseConfig` (also accepted whole as
    ``config=``). An unknown keyword raises ``EnvError`` naming the valid ones; ``reset(seed=...)`` takes
    None or an integer >= 0. A model output (x̂0, step mean) or decoded dose with NaN or
    infinite values raises ``ModelError`` naming the step and the case.

    ```python
    env = gymnasium.make("dosegym/DenoiseDose-v0", scorecard="headneck_rtog",
                         cases="phantoms:headneck")
    ```
    """

    core_class = DenoiseCore


class DenoiseDoseVectorEnv(DenoiseHelpers, DoseVectorEnv):
    """``num_envs`` DenoiseDose episodes in lockstep, one batched model forward per step
    (see :class:`~dosegym.envs.adapters.DoseVectorEnv`). Agent helpers act on the whole
    batch: ``policy_step(obs)`` -> ``(mean (B, C, Z, Y, X), std (B, 1, 1, 1, 1))``,
    ``sample_noise()`` -> ``(B, C, Z, Y, X)`` (each sub-env's generator),
    ``set_agent_gaussian(mean, std)``."""

    core_class = DenoiseCore
