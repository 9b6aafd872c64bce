"""The batched core every dose env runs on: B episodes stepped at once.

A kind (DenoiseDose, GuidedDose, ScorecardBandit) is a subclass of :class:`DoseCore` (the
chain kinds of :class:`ChainCore`) that defines its spaces, how an action moves the episodes
(``_transition``) and its observation; resetting, case choice, the reward (``finish`` /
``compose``), the infos and rendering are here, once. The single env is the core's B = 1
adapter and the vector env its B = ``num_envs`` adapter (:mod:`dosegym.envs.adapters`).

Conventions: model-grid tensors are ``(B, C, Z, Y, X)`` in normalised units (dose: 1.0 = the
case's highest prescription); doses on the case grid are Gy, ``(Z, Y, X)``. Every random
draw of episode ``i`` comes from its own ``numpy.random.Generator`` (the single env's
``np_random``, sub-env ``i``'s in the vector env): the case index, then (chain kinds) one
63-bit ``sampler_seed`` that seeds a CPU ``torch.Generator``
(:func:`dosegym.diffusion.chain.seeded_generator`, the generator ``DosePolicy.predict(seed=...)``
uses), from which the :class:`~dosegym.diffusion.chain.ReverseChain` draws x_T and every
step's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces

from dosegym.diffusion.chain import ReverseChain, frozen, seeded_generator
from dosegym.diffusion.policy import DosePolicy, load_pretrained
from dosegym.diffusion.sample import sample
from dosegym.diffusion.slots import SLOT_CHANNELS, ModelSpec, collate
from dosegym.envs.cards import CardChooser
from dosegym.envs.cases import CaseData, CaseStore, PretrainedStats
from dosegym.envs.config import EnvConfig
from dosegym.envs.guidance import SoftScorer
from dosegym.envs.reward import compose, masked_mae_gy, score_term
from dosegym.envs.sources import CaseSource
from dosegym.errors import EnvError, ModelError
from dosegym.scorecards.dense import dense_normalised

_SEED_HIGH = 2**63 - 1


def resolve_policy(policy: DosePolicy | None, device: str | torch.device | None) -> DosePolicy:
    """``policy`` (moved to ``device`` when one is given), or the shipped pretrained policy."""
    if policy is None:
        policy = load_pretrained(device=device or "cpu")
    elif not isinstance(policy, DosePolicy):
        raise EnvError(f"policy must be a dosegym DosePolicy or None, got {type(policy).__name__}")
    elif device is not None and torch.device(device) != policy.device:
        policy.to(device)
    cfg = policy.model.config
    if cfg.objective != "diffusion":
        raise EnvError(
            "the policy is a regression model (one forward pass, no reverse chain); the dose "
            "environments need a diffusion checkpoint"
        )
    if cfg.spec.generate != "dose":
        raise EnvError(
            f"the policy generates slot {cfg.spec.generate!r}; the dose environments need a "
            "model whose generate slot is 'dose'"
        )
    return policy


@dataclass
class Transition:
    """What an action did to the B episodes: the final states (read when ``last``), the
    pretrained x̂0 anchors of the last step (None: the Bandit's pretrained mean), the per-
    episode KL charged this step (None: none) and each episode's extra info."""

    x_final: torch.Tensor
    anchors: torch.Tensor | None
    kl: np.ndarray | None
    last: bool
    extras: list[dict[str, Any]]


class DoseCore:
    """B episodes of one env kind (see the module docstring). ``unbatched`` (the single
    env): actions and agent inputs come without the batch axis; outputs are always batched."""

    config_class: ClassVar[type[EnvConfig]] = EnvConfig
    single_observation_space: spaces.Dict
    single_action_space: spaces.Box

    def __init__(self, config: EnvConfig, batch: int, unbatched: bool = False) -> None:
        self.config = config
        self.batch = int(batch)
        self.unbatched = bool(unbatched) and self.batch == 1
        self.policy = resolve_policy(config.policy, config.device)
        self.device = self.policy.device
        self.model_spec: ModelSpec = self.policy.spec
        self.steps = config.steps
        self.reward_config = config.reward_config
        self.obs_backend = config.obs_backend
        self.render_mode = config.render_mode
        self.source = CaseSource(config.cases, config.case_cache)
        self.cards = CardChooser(config.scorecard, rescale=config.rescale_card)
        self.store = CaseStore(
            self.source,
            self.cards,
            self.model_spec,
            self.device,
            config.case_cache,
            config.allow_card_mismatch,
            self.policy.refiner,
        )
        self.gen_shape = (SLOT_CHANNELS[self.model_spec.generate], *self.model_spec.shape)
        self.cond_slots = [s for s in self.model_spec.slots if s != self.model_spec.generate]
        self.cds: list[CaseData] = []
        self.ended_message = "the episode has ended (terminated); call reset() to start a new one"
        self._cond_obs: dict[str, Any] | None = None

    # -- the kind's hooks -----------------------------------------------------------------
    def _begin(self, rngs: list[np.random.Generator]) -> list[dict[str, Any]]:
        """Start the episodes of ``self.cds`` (after the case draws); extra reset infos."""
        return [{} for _ in rngs]

    def _transition(self, actions: Any) -> Transition:
        raise NotImplementedError

    def _after_step(self) -> None:
        """Update what the next observation needs (after the step's rewards)."""

    def observation(self) -> dict[str, Any]:
        """The batched observation of the current state."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def current_x0(self, i: int) -> torch.Tensor:
        """Episode ``i``'s current x̂0 ``(C, Z, Y, X)`` (what ``render`` shows)."""
        raise NotImplementedError

    # -- episodes -------------------------------------------------------------------------
    def case_data(self, index: int) -> CaseData:
        """Case ``index`` of the source, prepared (see :meth:`CaseStore.case_data`)."""
        return self.store.case_data(index)

    def reset(
        self, rngs: list[np.random.Generator], options: dict[str, Any] | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Start one episode per generator (B of them): the batched observation and the infos."""
        if len(rngs) != self.batch:
            raise EnvError(f"reset: {len(rngs)} generators for {self.batch} episodes")
        self.cds = [self.store.choose(rng, o) for rng, o in zip(rngs, self._episode_options(options))]
        extras = self._begin(rngs)
        self._cond_obs = None
        infos = []
        for cd, extra in zip(self.cds, extras):
            infos.append(
                {
                    "case_id": cd.case.case_id,
                    "case_key": cd.key,
                    "scorecard": cd.card.name,
                    "score_matched_fraction": cd.fit.matched_fraction,
                    **extra,
                }
            )
        return self.observation(), infos

    def _episode_options(self, options: dict[str, Any] | None) -> list[dict[str, Any] | None]:
        """Each episode's reset options: a ``case_index`` sequence of B indices (vector envs)
        gives episode ``i`` the ``i``-th; anything else is every episode's."""
        index = (options or {}).get("case_index")
        if self.unbatched or not isinstance(index, (list, tuple, np.ndarray)):
            return [options] * self.batch
        if len(index) != self.batch:
            raise EnvError(f"reset option case_index: {len(index)} indices for {self.batch} episodes")
        return [{**options, "case_index": i.item() if isinstance(i, np.generic) else i} for i in index]

    def check_running(self) -> None:
        """``EnvError`` before the first reset and once the episodes have ended."""
        if not self.cds:
            raise EnvError("step() before reset(): call reset() first")
        if not self.running:
            raise EnvError(self.ended_message)

    def step(self, actions: Any) -> tuple[dict[str, Any], np.ndarray, bool, list[dict[str, Any]]]:
        """One step of every episode: observation, rewards ``(B,)``, terminated, infos."""
        self.check_running()
        tr = self._transition(actions)
        rewards = np.zeros(self.batch)
        infos: list[dict[str, Any]] = []
        for i, cd in enumerate(self.cds):
            kl = None if tr.kl is None else float(tr.kl[i])
            if tr.last:
                anchor = None if tr.anchors is None else tr.anchors[i]
                rewards[i], info = self.finish(cd, tr.x_final[i], anchor, kl)
            else:
                rewards[i], terms = compose(self.reward_config, None, None, kl)
                info = {"reward_terms": terms}
            info.update(tr.extras[i])
            if kl is not None:
                info["kl"] = kl
            infos.append(info)
        self._after_step()
        return self.observation(), rewards, tr.last, infos

    # -- observations -------------------------------------------------------------------
    def cond_spaces(self) -> dict[str, spaces.Space]:
        """``cond_<slot>`` Boxes (model grid; CT in [-1, 1], others in [0, 1]) and
        ``cond_present`` (MultiBinary: which condition slots the case has; absent ones read 0)."""
        out: dict[str, spaces.Space] = {}
        for slot in self.cond_slots:
            shape = (SLOT_CHANNELS[slot], *self.model_spec.shape)
            out[f"cond_{slot}"] = spaces.Box(-1.0 if slot == "ct" else 0.0, 1.0, shape, np.float32)
        out["cond_present"] = spaces.MultiBinary(len(self.cond_slots))
        return out

    def cond_obs(self, cd: CaseData) -> dict[str, Any]:
        """The condition part of one case's observation (computed once per case; numpy
        arrays or device tensors, as the backend)."""
        if cd.cond_obs is None:
            obs: dict[str, Any] = {}
            present = np.zeros(len(self.cond_slots), dtype=np.int8)
            for i, slot in enumerate(self.cond_slots):
                shape = (SLOT_CHANNELS[slot], *self.model_spec.shape)
                on = cd.model_input.roles.get(slot) == "condition"
                present[i] = on
                lo = -1.0 if slot == "ct" else 0.0
                t = cd.model_input.tensors[slot].clamp(lo, 1.0) if on else torch.zeros(shape)
                if self.obs_backend == "numpy":
                    obs[f"cond_{slot}"] = np.ascontiguousarray(t.numpy(), dtype=np.float32)
                else:
                    obs[f"cond_{slot}"] = t.to(self.device)
            obs["cond_present"] = (
                present if self.obs_backend == "numpy" else torch.from_numpy(present).to(self.device)
            )
            cd.cond_obs = obs
        return cd.cond_obs

    def batch_cond_obs(self) -> dict[str, Any]:
        """The episodes' condition observations, batched: fresh numpy arrays on every call
        (Gymnasium wants new data) or, with the torch backend, the same device tensors
        until the next reset (no copy: do not modify them in place)."""
        if self.obs_backend == "numpy":
            per_case = [self.cond_obs(cd) for cd in self.cds]
            return {k: np.stack([c[k] for c in per_case]) for k in per_case[0]}
        if self._cond_obs is None:
            per_case = [self.cond_obs(cd) for cd in self.cds]
            self._cond_obs = {k: torch.stack([c[k] for c in per_case]) for k in per_case[0]}
        return dict(self._cond_obs)

    def to_obs(self, t: torch.Tensor) -> Any:
        """A tensor as the observation backend wants it (numpy: a float32 copy)."""
        if self.obs_backend == "torch":
            return t.detach().clone()
        return t.detach().to("cpu", torch.float32).numpy().copy()

    # -- actions ------------------------------------------------------------------------
    def as_action(self, action: Any, space: spaces.Box) -> torch.Tensor:
        """``action`` checked against ``space`` (shape, a floating dtype, finite, within the
        bounds: nothing is clipped) as a float32 tensor on the device, ``(B, *space.shape)``
        (given without the batch axis when ``unbatched``). The checks cost one min/max pass
        (on the host for numpy input, before the copy)."""
        shape = tuple(space.shape if self.unbatched else (self.batch, *space.shape))
        expected = f"expected a float32 array of shape {shape}"
        if isinstance(action, torch.Tensor):
            if not torch.is_floating_point(action):
                raise EnvError(f"action dtype {action.dtype} is not floating point; {expected}")
            if tuple(action.shape) != shape:
                raise EnvError(f"action shape {tuple(action.shape)} is wrong; {expected}")
            lo_hi = torch.aminmax(action.detach())
            low, high = (float(v) for v in torch.stack(lo_hi).tolist())
            a = action.detach().to(self.device, torch.float32, copy=True)
        else:
            try:
                arr = np.asarray(action)
            except (TypeError, ValueError) as exc:
                raise EnvError(f"action is not an array ({exc}); {expected}") from exc
            if not np.issubdtype(arr.dtype, np.floating):
                raise EnvError(f"action dtype {arr.dtype} is not floating point; {expected}")
            if arr.shape != shape:
                raise EnvError(f"action shape {arr.shape} is wrong; {expected}")
            low, high = float(arr.min()), float(arr.max())
            a = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).to(self.device)
        lo, hi = float(space.low.flat[0]), float(space.high.flat[0])
        if not (lo <= low and high <= hi):  # NaN fails both comparisons
            bad = ~torch.isfinite(a)
            if bool(bad.any()):
                raise EnvError(f"action has {int(bad.sum())} NaN or infinite values; refusing it")
            raise EnvError(
                f"action values span [{low:.4g}, {high:.4g}], outside the action space "
                f"[{lo:g}, {hi:g}]; actions are rejected, not clipped"
            )
        return a[None] if self.unbatched else a

    # -- the reward ---------------------------------------------------------------------
    def decode(self, cd: CaseData, x: torch.Tensor) -> torch.Tensor:
        """Gy on the case grid ``(Z, Y, X)`` of one model-grid sample ``x`` ``(C, Z, Y, X)``,
        decoded exactly as ``DosePolicy.predict`` decodes (batch of one); ``ModelError`` if
        any voxel is NaN or infinite."""
        dose = cd.decoder.decode(x[None, 0])[0]
        if not bool(torch.isfinite(dose).all()):
            n = int((~torch.isfinite(dose)).sum())
            raise ModelError(
                f"case {cd.key!r}: the decoded dose has {n} NaN or infinite voxels; the model "
                "output behind it is not finite (check the checkpoint's weights)"
            )
        return dose

    def pretrained_stats(self, cd: CaseData) -> PretrainedStats:
        """The mean points and mean dose of ``baseline_samples`` pretrained samples of the
        case (one batched chain seeded with ``baseline_seed``; cached per case)."""
        if cd.pretrained is None:
            cfg = self.reward_config
            k = int(cfg.baseline_samples)
            cond = collate([cd.cond_input]).to(self.device).expand(k)
            gen = seeded_generator(cfg.baseline_seed)
            with frozen(self.policy.model):
                x0 = sample(self.policy.model, cond, self.policy.sampler, self.steps, gen, self.policy.eta)
                doses = [self.decode(cd, x0[i]) for i in range(k)]
            points = [cd.bound.score(d.float().cpu().numpy(), allow_high=True).total for d in doses]
            cd.pretrained = PretrainedStats(float(np.mean(points)), torch.stack(doses).mean(dim=0))
        return cd.pretrained

    def finish(
        self, cd: CaseData, x_final: torch.Tensor, pretrained_x0: torch.Tensor | None, kl: float | None
    ) -> tuple[float, dict[str, Any]]:
        """Reward and info of an episode's end: score the decoded ``x_final`` ``(C, Z, Y, X)``,
        fidelity against the anchor (``pretrained_x0`` on the model grid, or the Bandit's
        pretrained mean when None), plus this step's KL (see :mod:`dosegym.envs.reward`)."""
        cfg = self.reward_config
        with torch.no_grad():
            dose = self.decode(cd, x_final)
            report = cd.bound.score(dose.float().cpu().numpy(), allow_high=True)
            baseline = self.pretrained_stats(cd).points if cfg.scale == "baseline" else None
            s = score_term(report.total, report.maximum, cfg.scale, baseline)
            dense = self.dense_score(cd, x_final) if cfg.score == "dense" else None
            if dense is not None:
                s = dense
            body, reference = cd.body, cd.reference_gy
            anchor_name, anchor = self.fidelity_anchor(cd, pretrained_x0)
            fid_gy = masked_mae_gy(dose, anchor, body)
            fid = fid_gy / cd.rx_gy
        reward, terms = compose(cfg, s, fid, kl)
        info: dict[str, Any] = {
            "score_report": report.to_dict(),
            "score_total": report.total,
            "score_normalised": report.normalised,
            "score_matched_fraction": report.matched_fraction,
            "reward_terms": terms,
            "fidelity_anchor": anchor_name,
            "fidelity_mae_gy": fid_gy,
        }
        if baseline is not None:
            info["baseline_points"] = baseline
        if dense is not None:
            info["score_dense"] = dense
        if reference is not None:
            info["reference_mae_gy"] = (
                fid_gy if anchor_name == "reference" else masked_mae_gy(dose, reference, body)
            )
        return reward, info

    def fidelity_anchor(self, cd: CaseData, pretrained_x0: torch.Tensor | None) -> tuple[str, torch.Tensor]:
        """The fidelity term's anchor of a case (``reward.fidelity``; see :mod:`dosegym.envs.reward`):
        its name and dose (Gy, case grid). ``pretrained_x0`` (model grid): the chain's
        pretrained x̂0; None: the Bandit's pretrained mean dose."""
        anchor_name = self.reward_config.fidelity
        if anchor_name == "auto":
            anchor_name = "reference" if cd.reference_gy is not None else "pretrained"
        if anchor_name == "reference":
            if cd.reference_gy is None:
                raise EnvError(
                    f"reward.fidelity='reference' but case {cd.key!r} has no reference dose; "
                    "use fidelity='auto' or 'pretrained'"
                )
            return anchor_name, cd.reference_gy
        if pretrained_x0 is not None:
            return anchor_name, self.decode(cd, pretrained_x0)
        return anchor_name, self.pretrained_stats(cd).mean_dose_gy

    def dense_scores(self, cd: CaseData, x: torch.Tensor) -> torch.Tensor:
        """The dense normalised scores ``(K,)`` of model-grid states ``(K, C, Z, Y, X)`` (see
        :mod:`dosegym.envs.reward`; the case's scorer made once); differentiable in ``x``."""
        cfg = self.reward_config
        if cd.dense is None:
            cd.dense = SoftScorer(cd.card, cd.case, cd.resampler, cfg.dense_temperature_gy)
        dose = cd.dense.dose_gy(x.to(torch.float32))
        return dense_normalised(cd.dense.soft, dose, cfg.dense_temperature_gy, cfg.dense_leak)

    def dense_score(self, cd: CaseData, x_final: torch.Tensor) -> float:
        """The dense normalised score of one final model-grid state ``(C, Z, Y, X)``."""
        return float(self.dense_scores(cd, x_final[None])[0])

    # -- rendering ----------------------------------------------------------------------
    def render(self, i: int = 0) -> np.ndarray | str | None:
        """``rgb_array``: axial / coronal / sagittal slices of episode ``i``'s current x̂0 (Gy,
        case grid) through the isocenter, isodose colours and structure outlines; ``ansi``:
        its score table. None without a render mode."""
        if self.render_mode is None:
            return None
        if not self.cds:
            raise EnvError("render() before reset(): there is no case yet")
        from dosegym.envs import render as _render  # matplotlib, only when rendering

        cd = self.cds[i]
        with torch.no_grad():
            dose = self.decode(cd, self.current_x0(i)).float().cpu().numpy()
        if self.render_mode == "ansi":
            return _render.ansi(cd.bound.score(dose, allow_high=True))
        return _render.rgb_array(cd.case, dose, title=f"{cd.case.case_id}: x̂0 (Gy)")


class ChainCore(DoseCore):
    """A kind that runs the reverse chain (DenoiseDose, GuidedDose): the B episodes share one
    :class:`~dosegym.diffusion.chain.ReverseChain` (one batched model forward per step)."""

    def __init__(self, config: EnvConfig, batch: int, unbatched: bool = False) -> None:
        super().__init__(config, batch, unbatched)
        self.chain = ReverseChain(self.policy.model, self.steps, self.policy.sampler, self.policy.eta)

    def _begin(self, rngs: list[np.random.Generator]) -> list[dict[str, Any]]:
        seeds = [int(rng.integers(_SEED_HIGH)) for rng in rngs]
        cond = collate([cd.cond_input for cd in self.cds]).to(self.device)
        self.chain.start(cond, [seeded_generator(s) for s in seeds], keys=[cd.key for cd in self.cds])
        t = int(self.chain.t)
        return [{"sampler_seed": s, "step": 0, "timestep": t} for s in seeds]

    @property
    def running(self) -> bool:
        return self.chain.running

    def check_running(self) -> None:
        if not self.cds or self.chain.x is None:
            raise EnvError("step() before reset(): call reset() first")
        super().check_running()

    def _transition(self, actions: Any) -> Transition:
        t, last = int(self.chain.t), self.chain.k == self.steps - 1
        tr = self._chain_step(actions)
        for extra in tr.extras:
            extra.update(step=self.chain.k, timestep=t)
        tr.last = last
        return tr

    def _chain_step(self, actions: Any) -> Transition:
        """Move the chain one step for ``actions`` (the kind's rule)."""
        raise NotImplementedError

    def timestep_obs(self) -> Any:
        """``(B, 1)``: the coming step's timestep over ``num_train_timesteps - 1``."""
        ts = np.full((self.batch, 1), self.chain.timestep_fraction(), dtype=np.float32)
        return ts if self.obs_backend == "numpy" else torch.from_numpy(ts).to(self.device)

    def x0(self) -> torch.Tensor:
        """The current x̂0 of every episode (the final state once the chain has ended)."""
        assert self.chain.x is not None
        return self.chain.distribution().pred_original_sample if self.chain.running else self.chain.x
