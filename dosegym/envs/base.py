"""Machinery shared by the dose environments: policy and card resolution, per-case data,
the reverse chain run in lockstep, action checks, the final reward and rendering.

Conventions: model-grid tensors are ``(B, C, Z, Y, X)`` in normalised units (dose: 1.0 =
the case's highest prescription); doses on the case grid are Gy, ``(Z, Y, X)``. Every random
draw of an episode comes from the env's ``np_random``: the case index, then one 63-bit
``sampler_seed`` that seeds a CPU ``torch.Generator`` (:func:`dosegym.diffusion.sample.seeded_generator`,
the generator ``DosePolicy.predict(seed=...)`` uses), from which the initial noise and every
step's noise are drawn in the order :func:`dosegym.diffusion.sample.sample` draws them.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from dosegym.data.case import Case
from dosegym.diffusion.policy import DosePolicy, load_pretrained
from dosegym.diffusion.sample import sample, seeded_generator, step_noise
from dosegym.diffusion.schedulers import ReverseStepOutput, make_scheduler, reverse_step
from dosegym.diffusion.slots import (
    SLOT_CHANNELS,
    ModelInput,
    ModelSpec,
    Resampler,
    collate,
    to_model,
)
from dosegym.envs.reward import RewardConfig, compose, masked_mae_gy, score_term
from dosegym.envs.sources import CaseSource
from dosegym.errors import DosegymError, EnvError, ModelError
from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.fit import CardFit, card_fit
from dosegym.scorecards.groups import GROUP_NAMES  # noqa: F401  (dosegym.envs.GROUP_NAMES)
from dosegym.scorecards.model_grid import model_grid_case
from dosegym.scorecards.registry import available_cards, load_card
from dosegym.scorecards.report import ScoreReport
from dosegym.scorecards.scorecard import Scorecard
from dosegym.scorecards.soft_card import SoftScorecard

OBS_BACKENDS = ("numpy", "torch")
RENDER_MODES = ("rgb_array", "ansi")
#: Built-in card used when ``scorecard=None``: (site, is a dosegym phantom) -> card name.
DEFAULT_CARDS: dict[tuple[str, bool], str] = {
    ("headneck", True): "phantom_headneck",
    ("prostate", True): "phantom_prostate",
    ("lung", True): "phantom_lung",
    ("headneck", False): "headneck_rtog",
    ("prostate", False): "prostate",
}
_SITE_ALIASES = {"headandneck": "headneck", "hn": "headneck", "headneck": "headneck"}
_SEED_HIGH = 2**63 - 1


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
def reject_unknown_kwargs(
    cls: type, unknown: dict[str, Any], extra: Sequence[str] = (), name: str | None = None
) -> None:
    """``EnvError`` naming the keywords in ``unknown`` (those ``cls.__init__`` does not take),
    the valid name closest to the first and every valid one (``extra``: names taken besides;
    ``name``: the class named in the message, default ``cls``)."""
    if not unknown:
        return
    params = inspect.signature(cls.__init__).parameters.values()
    valid = [*extra, *(p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)]
    bad = sorted(unknown)
    close = difflib.get_close_matches(bad[0], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise EnvError(
        f"{name or cls.__name__}: unknown keyword argument(s) {bad}{hint}; valid keywords: {valid}"
    )


def count_arg(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer >= ``minimum``, else ``EnvError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise EnvError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(seed: Any) -> int | None:
    """A reset seed: None or an integer >= 0 (``EnvError`` otherwise)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise EnvError(f"reset(seed={seed!r}): a seed must be None or an integer >= 0")
    return int(seed)


# --------------------------------------------------------------------------------------
# Policy, cards
# --------------------------------------------------------------------------------------
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


def _site_key(site: Any) -> str | None:
    if site is None:
        return None
    key = "".join(ch for ch in str(site).lower() if ch.isalpha())
    return _SITE_ALIASES.get(key, key)


def default_card_name(site: Any, is_phantom: bool) -> str:
    """The built-in card for a case of ``site`` (see :data:`DEFAULT_CARDS`)."""
    key = (_site_key(site), bool(is_phantom))
    if key not in DEFAULT_CARDS:
        raise EnvError(
            f"no default scorecard for site {site!r} ({'phantom' if is_phantom else 'patient'} "
            f"case); pass scorecard= with a built-in card {available_cards()} or a card file"
        )
    return DEFAULT_CARDS[key]


class CardChooser:
    """The scorecard of each case: the one given at make time (name, file or ``Scorecard``),
    else the built-in default of the case's site (:data:`DEFAULT_CARDS`); with ``rescale``,
    rescaled to the case's highest prescription (:meth:`Scorecard.rescaled`) when the card
    has a prescription that differs from it."""

    def __init__(self, scorecard: str | Path | Scorecard | None, rescale: bool = False) -> None:
        self._cards: dict[str, Scorecard] = {}
        self._rescaled: dict[tuple[int, float, int], Scorecard] = {}
        self.rescale = bool(rescale)
        if scorecard is None or isinstance(scorecard, Scorecard):
            self.fixed = scorecard
        else:
            self.fixed = self.load(scorecard)

    def load(self, name: str | Path) -> Scorecard:
        key = str(name)
        if key not in self._cards:
            try:
                self._cards[key] = load_card(name)
            except DosegymError as exc:
                raise EnvError(f"scorecard {key!r}: {exc}") from exc
        return self._cards[key]

    def name_for(self, site: Any, is_phantom: bool) -> str:
        return self.fixed.name if self.fixed is not None else default_card_name(site, is_phantom)

    def card_for(self, case: Case) -> Scorecard:
        if self.fixed is not None:
            card = self.fixed
        else:
            is_phantom = case.meta.get("format") == "phantom"
            card = self.load(default_card_name(case.meta.get("site"), is_phantom))
        rx = max(case.prescriptions, key=lambda p: p.dose_gy, default=None)
        if not self.rescale or rx is None or card.prescription_gy in (None, rx.dose_gy):
            return card
        key = (id(card), rx.dose_gy, rx.fractions)
        if key not in self._rescaled:
            self._rescaled[key] = card.rescaled(rx.dose_gy, rx.fractions)
        return self._rescaled[key]


# --------------------------------------------------------------------------------------
# Per-case data
# --------------------------------------------------------------------------------------
_PREPARED: OrderedDict[tuple[str, str], tuple[Case, ModelInput, Resampler]] = OrderedDict()
_PREPARED_SIZE = 32


def prepare_case(source: CaseSource, index: int, spec: ModelSpec) -> tuple[Case, ModelInput, Resampler]:
    """Case ``index`` of ``source`` on the model grid (``to_model``), cached per process for
    cases read from paths/ids, so that several envs on one source share the work."""
    ref = source.refs[index]
    key = None if isinstance(ref, Case) else (str(ref), spec.model_dump_json())
    if key is not None and key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    case = source.load(index)
    try:
        mi, res = to_model(case, spec)
    except DosegymError as exc:
        raise EnvError(f"case {source.key(index)!r}: the model cannot take this case: {exc}") from exc
    if key is not None:
        _PREPARED[key] = (case, mi, res)
        while len(_PREPARED) > _PREPARED_SIZE:
            _PREPARED.popitem(last=False)
    return case, mi, res


class SoftScorer:
    """GuidedDose's soft scorecard of one case on its model grid: normalised model-grid
    doses ``x`` ``(B, C, Z, Y, X)`` -> Gy (``x[:, 0] * unit_gy``, zero outside the body), scored
    by :class:`~dosegym.scorecards.soft_card.SoftScorecard` at ``temperature_gy``.
    ``unit_gy``: Gy of 1.0 in model units (the case's highest prescription)."""

    def __init__(self, card: Scorecard, case: Case, res: Resampler, temperature_gy: float) -> None:
        mcase = model_grid_case(case, res.model_grid, lambda a: res.to_model(a, "linear").numpy())
        self.soft = SoftScorecard(card.bind(mcase, on_unmatched="report"))
        self.unit_gy = float(res.rx_max_gy)
        self.temperature_gy = float(temperature_gy)

    def dose_gy(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model-grid Gy of ``x``, clamped at 0 as decoding does unless ``clamp=False``
        (guidance: the clamp would hide the gradient wherever x̂0 is negative)."""
        dose = (x[:, 0].clamp_min(0.0) if clamp else x[:, 0]) * self.unit_gy
        body = self.soft.body(dose.device)
        return dose if body is None else dose * body.to(dose.dtype)

    def item_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised soft item scores ``(B, n_items)`` of ``x``."""
        metrics = self.soft.metrics(self.dose_gy(x), temperature=self.temperature_gy)
        return self.soft.item_scores(self.soft.points(metrics))

    def group_directions(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item scores ``(n_items,)`` of x̂0 ``(1, C, Z, Y, X)`` and each objective group's ascent
        direction there, ``(n_groups, C, Z, Y, X)`` (:meth:`SoftScorecard.group_directions`)."""
        x = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            dose = self.dose_gy(x, clamp=False)
        return self.soft.group_directions(x, dose, self.dose_gy(x.detach()), temperature=self.temperature_gy)


@dataclass
class CaseData:
    """One case as the envs use it: the case, its model-grid input and resampler, its card
    (bound), and lazily computed extras (device tensors, baseline, soft scorer)."""

    index: int
    key: str
    case: Case
    model_input: ModelInput
    resampler: Resampler
    card: Scorecard
    bound: BoundScorecard
    fit: CardFit
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def rx_gy(self) -> float:
        return float(self.resampler.rx_max_gy)

    @property
    def cond_input(self) -> ModelInput:
        """The model input without the generate slot's clean tensor (the model never sees
        it, and cases with and without a reference dose must collate into one batch)."""
        if "cond_input" not in self.extras:
            mi = self.model_input
            gen = mi.generate_slot
            tensors = {k: v for k, v in mi.tensors.items() if k != gen}
            self.extras["cond_input"] = ModelInput(
                tensors, dict(mi.roles), mi.rx_max_gy, mi.batched, dict(mi.available), mi.case_ids
            )
        return self.extras["cond_input"]


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; a model in training mode is put back in
    it after (a model already in eval mode, as loaded checkpoints are, is left alone: the
    mode switch walks every submodule, a measurable cost per step for small models)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train(True)


# --------------------------------------------------------------------------------------
# The reverse chain
# --------------------------------------------------------------------------------------
class ReverseChain:
    """B reverse-diffusion episodes in lockstep under a frozen policy.

    The chain owns its scheduler (the policy's sampler and config), so an agent that calls
    ``policy.timesteps`` elsewhere does not move it. ``distribution()`` is the Gaussian of the
    current step (one batched model forward, cached until the state changes). Every step
    whose x̂0 or mean is not finite raises ``ModelError`` naming the step and the episodes'
    cases (``keys``), so no NaN reaches an observation or a reward.
    """

    def __init__(self, policy: DosePolicy, steps: int) -> None:
        if int(steps) < 1:
            raise EnvError(f"steps must be >= 1, got {steps}")
        self.policy = policy
        self.steps = int(steps)
        cfg = policy.model.config.diffusion
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.scheduler = make_scheduler(policy.sampler, cfg)
        self.scheduler.set_timesteps(self.steps, device=policy.device)
        self.timesteps = self.scheduler.timesteps.clone()
        self.cond: ModelInput | None = None
        self.x: torch.Tensor | None = None
        self.generators: list[torch.Generator] = []
        self.keys: list[str] = []
        self.k = 0
        self._dist: ReverseStepOutput | None = None

    def start(
        self, cond: ModelInput, generators: Sequence[torch.Generator], keys: Sequence[str] = ()
    ) -> None:
        """Begin B = ``len(generators)`` episodes from ``x_T`` drawn from each generator
        (``keys``: the episodes' case names, for messages)."""
        self.cond, self.generators, self.k, self._dist = cond, list(generators), 0, None
        self.keys = list(keys)
        if len(self.generators) == 1:
            self.x = self.policy.initial_noise(cond, self.generators[0])
        else:
            self.x = torch.cat([self.policy.initial_noise(1, g) for g in self.generators])

    @property
    def running(self) -> bool:
        return self.x is not None and self.k < self.steps

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps[self.k]

    def timestep_fraction(self) -> float:
        """The next step's timestep over ``num_train_timesteps - 1`` (0 once the chain ended)."""
        if self.k >= self.steps:
            return 0.0
        return float(self.timesteps[self.k]) / max(1, self.num_train_timesteps - 1)

    def model_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert self.cond is not None
        with frozen(self.policy.model):
            return self.policy.model(x, t, self.cond)

    def step_from_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> ReverseStepOutput:
        """The Gaussian of the step from ``x`` at ``t`` given the model output (no noise)."""
        with torch.no_grad():
            step = reverse_step(
                self.scheduler, out, t, x, eta=self.policy.eta, variance_noise=torch.zeros_like(x)
            )
            finite = torch.isfinite(step.pred_original_sample).flatten(1).all(1)
            finite &= torch.isfinite(step.mean).flatten(1).all(1)
            if not bool(finite.all()):
                self._not_finite(finite, t)
        return step

    def _not_finite(self, finite: torch.Tensor, t: torch.Tensor) -> None:
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        cases = [self.keys[i] if i < len(self.keys) else f"episode {i}" for i in bad]
        raise ModelError(
            f"the model's prediction (x̂0 or step mean) is NaN or infinite at step "
            f"{self.k + 1}/{self.steps} (timestep {int(t)}) of case(s) {cases}; the policy's "
            "weights or its input are not finite (check the checkpoint)"
        )

    def distribution(self) -> ReverseStepOutput:
        """``mean``, ``std``, ``pred_original_sample`` (x̂0) of the current step (cached)."""
        if self._dist is None:
            assert self.x is not None
            self._dist = self.step_from_output(self.model_output(self.x, self.t), self.x, self.t)
        return self._dist

    def distribution_at(self, x: torch.Tensor) -> ReverseStepOutput:
        """The Gaussian of the current step from another state ``x`` (not cached)."""
        return self.step_from_output(self.model_output(x, self.t), x, self.t)

    def noise(self) -> torch.Tensor:
        """The next step noise of every episode, from its generator, as ``sample()`` draws it."""
        assert self.x is not None
        if len(self.generators) == 1:
            return step_noise(self.x.shape, self.generators[0], self.x.device)
        one = (1, *self.x.shape[1:])
        return torch.cat([step_noise(one, g, self.x.device) for g in self.generators])

    def output_for_x0(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output that implies x̂0 = ``x0`` at state ``x``, timestep ``t``."""
        a = self.scheduler.alphas_cumprod.to(x.device)[t.long()].to(x.dtype)
        pt = self.scheduler.config.prediction_type
        if pt == "epsilon":
            return (x - a.sqrt() * x0) / (1 - a).sqrt()
        if pt == "v_prediction":
            return (a.sqrt() * x - x0) / (1 - a).sqrt()
        return x0

    def advance(self, x_prev: torch.Tensor) -> None:
        self.x, self.k, self._dist = x_prev, self.k + 1, None


def log_prob_or_nan(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log-density averaged over elements (the policy's convention), NaN where the
    step is deterministic (std == 0: it has no density)."""
    s = std.reshape(std.shape[0], -1)[:, 0]
    safe = torch.where(s > 0, s, torch.ones_like(s)).reshape(std.shape)
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = lp.reshape(lp.shape[0], -1).mean(dim=1)
    return torch.where(s > 0, lp, torch.full_like(lp, math.nan))


# --------------------------------------------------------------------------------------
# The base env
# --------------------------------------------------------------------------------------
class DoseEnvBase(gym.Env):
    """Shared constructor arguments and helpers of the dose environments (not registered)."""

    metadata: dict[str, Any] = {"render_modes": list(RENDER_MODES), "render_fps": 4}

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
        *,
        allow_card_mismatch: bool = False,
        rescale_card: bool = False,
    ) -> None:
        if obs_backend not in OBS_BACKENDS:
            raise EnvError(f"obs_backend {obs_backend!r} is unknown; valid: {list(OBS_BACKENDS)}")
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise EnvError(f"render_mode {render_mode!r} is unknown; valid: {list(RENDER_MODES)} or None")
        if not (math.isfinite(x_bound) and x_bound > 0):
            raise EnvError(f"x_bound must be a finite number > 0, got {x_bound!r}")
        self.steps = count_arg("steps", steps)
        self._case_cache = count_arg("case_cache", case_cache)
        self.allow_card_mismatch = bool(allow_card_mismatch)
        self.policy = resolve_policy(policy, device)
        self.device = self.policy.device
        self.model_spec: ModelSpec = self.policy.spec
        self.source = CaseSource(cases, self._case_cache)
        self.cards = CardChooser(scorecard, rescale=rescale_card)
        self.reward_config = RewardConfig.coerce(reward)
        self.obs_backend = obs_backend
        self.render_mode = render_mode
        self.x_bound = float(x_bound)
        self.gen_shape = (SLOT_CHANNELS[self.model_spec.generate], *self.model_spec.shape)
        self.cond_slots = [s for s in self.model_spec.slots if s != self.model_spec.generate]
        self._cases: OrderedDict[int, CaseData] = OrderedDict()
        self._last_report: ScoreReport | None = None

    # -- cases --------------------------------------------------------------------------
    def case_data(self, index: int) -> CaseData:
        """Case ``index`` of the source, prepared (cached). A card that does not fit the
        case (:func:`~dosegym.scorecards.fit.card_fit`: matched items carry under half its
        maximum, or its prescription is not the case's) raises ``EnvError`` unless
        ``allow_card_mismatch``."""
        if index in self._cases:
            self._cases.move_to_end(index)
            return self._cases[index]
        case, mi, res = prepare_case(self.source, index, self.model_spec)
        card = self.cards.card_for(case)
        try:
            bound = card.bind(case)
        except DosegymError as exc:
            raise EnvError(
                f"case {self.source.key(index)!r} cannot be scored with card {card.name!r}: {exc}"
            ) from exc
        fit = card_fit(card, case, bound)
        if not fit.ok and not self.allow_card_mismatch:
            hint = (
                "rescale_card=True rescales the card to the case's prescription; " if fit.rx_mismatch else ""
            )
            raise EnvError(
                f"case {self.source.key(index)!r}: {fit.message()}; scores would stand for "
                f"the wrong plan. Use a card for this case ({hint}allow_card_mismatch=True "
                "scores with it anyway)"
            )
        cd = CaseData(index, self.source.key(index), case, mi, res, card, bound, fit)
        self._cases[index] = cd
        while len(self._cases) > self._case_cache:
            self._cases.popitem(last=False)
        return cd

    def _choose_case(self, rng: np.random.Generator, options: dict[str, Any] | None) -> CaseData:
        """The episode's case: ``options["case_index"]`` when given, else drawn from ``rng``."""
        options = options or {}
        unknown = sorted(set(options) - {"case_index"})
        if unknown:
            raise EnvError(f"reset options {unknown} are unknown; valid: ['case_index']")
        if "case_index" in options:
            index, n = options["case_index"], len(self.source)
            if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < n:
                raise EnvError(
                    f"reset option case_index={index!r} is out of range; the source has {n} cases: "
                    f"an integer in [0, {n - 1}]"
                )
            index = int(index)
            rng.integers(len(self.source))  # keep the draw sequence the same either way
        else:
            index = int(rng.integers(len(self.source)))
        return self.case_data(index)

    @staticmethod
    def _sampler_seed(rng: np.random.Generator) -> int:
        return int(rng.integers(_SEED_HIGH))

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
        """The condition part of an observation: computed once per case; each call gives
        fresh numpy copies (Gymnasium wants new data on every call) or, with the torch
        backend, the same device tensors (no copy: do not modify them in place)."""
        key = f"cond_obs_{self.obs_backend}_{self.device}"
        if key not in cd.extras:
            cd.extras[key] = self._make_cond_obs(cd)
        return self.fresh(cd.extras[key])

    def fresh(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Copies of numpy arrays (torch tensors are passed as they are)."""
        if self.obs_backend == "numpy":
            return {k: v.copy() for k, v in obs.items()}
        return dict(obs)

    def _make_cond_obs(self, cd: CaseData) -> dict[str, Any]:
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
        return obs

    def to_obs(self, t: torch.Tensor) -> Any:
        """A tensor as the observation backend wants it (numpy: a float32 copy)."""
        if self.obs_backend == "torch":
            return t.detach().clone()
        return t.detach().to("cpu", torch.float32).numpy().copy()

    # -- actions ------------------------------------------------------------------------
    def as_action(self, action: Any, space: spaces.Box, batch: int | None = None) -> torch.Tensor:
        """``action`` checked against ``space`` (shape, a floating dtype, finite, within the
        bounds: nothing is clipped) as a float32 tensor on the device, with a batch axis.
        The checks cost one min/max pass (on the host for numpy input, before the copy)."""
        shape = tuple(space.shape if batch is None else (batch, *space.shape))
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
        return a if batch is not None else a[None]

    def soft_scorer(self, cd: CaseData, temperature_gy: float) -> SoftScorer:
        """The case's soft scorer on the model grid (cached per temperature)."""
        key = f"soft@{float(temperature_gy)}"
        if key not in cd.extras:
            cd.extras[key] = SoftScorer(cd.card, cd.case, cd.resampler, temperature_gy)
        return cd.extras[key]

    # -- the final reward -----------------------------------------------------------------
    def device_extra(self, cd: CaseData, name: str) -> torch.Tensor | None:
        """``body`` (bool) or ``reference_gy`` of the case grid as device tensors (cached)."""
        key = f"{name}@{self.device}"
        if key not in cd.extras:
            arr = cd.case.body if name == "body" else cd.case.dose
            cd.extras[key] = (
                None if arr is None else torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
            )
        return cd.extras[key]

    def decode(self, cd: CaseData, x: torch.Tensor) -> torch.Tensor:
        """Gy on the case grid ``(Z, Y, X)`` of one model-grid sample ``x`` ``(C, Z, Y, X)``,
        decoded exactly as ``DosePolicy.predict`` decodes (batch of one); ``ModelError`` if
        any voxel is NaN or infinite."""
        dose = cd.resampler.decode(x[None, 0])[0]
        if not bool(torch.isfinite(dose).all()):
            n = int((~torch.isfinite(dose)).sum())
            raise ModelError(
                f"case {cd.key!r}: the decoded dose has {n} NaN or infinite voxels; the model "
                "output behind it is not finite (check the checkpoint's weights)"
            )
        return dose

    def pretrained_stats(self, cd: CaseData) -> tuple[float, torch.Tensor]:
        """``(mean points, mean dose Gy)`` of ``baseline_samples`` pretrained samples of the
        case (one batched chain seeded with ``baseline_seed``; cached per case)."""
        cfg = self.reward_config
        key = f"pretrained@{self.steps}/{cfg.baseline_samples}/{cfg.baseline_seed}/{self.device}"
        if key not in cd.extras:
            k = int(cfg.baseline_samples)
            cond = collate([cd.cond_input]).to(self.device).expand(k)
            gen = seeded_generator(cfg.baseline_seed)
            with frozen(self.policy.model):
                x0 = sample(self.policy.model, cond, self.policy.sampler, self.steps, gen, self.policy.eta)
                doses = [self.decode(cd, x0[i]) for i in range(k)]
            points = [cd.bound.score(d.float().cpu().numpy(), allow_high=True).total for d in doses]
            cd.extras[key] = (float(np.mean(points)), torch.stack(doses).mean(dim=0))
        return cd.extras[key]

    def finish(
        self,
        cd: CaseData,
        x_final: torch.Tensor,
        pretrained_x0: torch.Tensor | None,
        kl: float | None,
    ) -> tuple[float, dict[str, Any]]:
        """Reward and info of an episode's end: score the decoded ``x_final`` ``(C, Z, Y, X)``,
        fidelity against the anchor (``pretrained_x0`` on the model grid, or the Bandit's
        pretrained mean when None), plus this step's KL (see :mod:`dosegym.envs.reward`)."""
        cfg = self.reward_config
        with torch.no_grad():
            dose = self.decode(cd, x_final)
            report = cd.bound.score(dose.float().cpu().numpy(), allow_high=True)
            self._last_report = report
            baseline = self.pretrained_stats(cd)[0] if cfg.scale == "baseline" else None
            s = score_term(report.total, report.maximum, cfg.scale, baseline)
            body = self.device_extra(cd, "body")
            reference = self.device_extra(cd, "reference_gy")
            anchor_name = cfg.fidelity
            if anchor_name == "auto":
                anchor_name = "reference" if reference is not None else "pretrained"
            if anchor_name == "reference":
                if reference is None:
                    raise EnvError(
                        f"reward.fidelity='reference' but case {cd.key!r} has no reference dose; "
                        "use fidelity='auto' or 'pretrained'"
                    )
                anchor = reference
            elif pretrained_x0 is not None:
                anchor = self.decode(cd, pretrained_x0)
            else:
                anchor = self.pretrained_stats(cd)[1]
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
        if reference is not None:
            info["reference_mae_gy"] = (
                fid_gy if anchor_name == "reference" else masked_mae_gy(dose, reference, body)
            )
        return reward, info

    # -- rendering ----------------------------------------------------------------------
    def current_x0(self) -> tuple[CaseData, torch.Tensor] | None:
        """The current case and x̂0 ``(C, Z, Y, X)`` to render; None before the first reset."""
        raise NotImplementedError

    def render(self) -> np.ndarray | str | None:
        """``rgb_array``: axial / coronal / sagittal slices of the current x̂0 (Gy, case grid)
        through the isocenter, isodose colours and structure outlines; ``ansi``: the score
        table of the current x̂0. None without a render mode."""
        if self.render_mode is None:
            return None
        current = self.current_x0()
        if current is None:
            raise EnvError("render() before reset(): there is no case yet")
        cd, x0 = current
        from dosegym.envs import render as _render

        with torch.no_grad():
            dose = self.decode(cd, x0).float().cpu().numpy()
        if self.render_mode == "ansi":
            return _render.ansi(cd.bound.score(dose, allow_high=True))
        return _render.rgb_array(cd.case, dose, title=f"{cd.case.case_id}: x̂0 (Gy)")
