"""The constructor arguments of the dose environments, and their checks.

:class:`EnvConfig` holds the arguments every env kind takes; each kind adds its own fields
in a subclass (``DenoiseConfig``, ``GuidedConfig``, ``BanditConfig`` beside the kinds).
``gym.make(id, scorecard=..., cases=..., ...)`` passes keywords; ``Config.coerce`` turns
``None``, a config, a dict and/or keywords into a checked config and names the valid
keywords (and the closest one) when one is unknown. Every check raises ``EnvError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from dosegym.diffusion.policy import DosePolicy
from dosegym.envs.reward import RewardConfig
from dosegym.errors import EnvError
from dosegym.scorecards.scorecard import Scorecard

OBS_BACKENDS = ("numpy", "torch")
RENDER_MODES = ("rgb_array", "ansi")

C = TypeVar("C", bound="EnvConfig")
#: The check of a ``temperature_gy`` field (soft-metric smoothing), see ``EnvConfig.CHECKS``.
TEMPERATURE_CHECK = (">0", "a finite number of Gy > 0")


def count_arg(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer >= ``minimum``, else ``EnvError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise EnvError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_arg(name: str, value: Any, what: str = "a finite number > 0", allow_zero: bool = False) -> float:
    """``value`` as a ``float`` when finite and > 0 (>= 0 with ``allow_zero``), else ``EnvError``."""
    ok = (
        isinstance(value, numbers.Real) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        raise EnvError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_seed(seed: Any) -> int | None:
    """A reset seed: None or an integer >= 0 (``EnvError`` otherwise)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise EnvError(f"reset(seed={seed!r}): a seed must be None or an integer >= 0")
    return int(seed)


@dataclass(frozen=True, eq=False)
class EnvConfig:
    """The arguments every dose env takes (documented on
    :class:`~dosegym.envs.denoise.DenoiseDoseEnv`); ``reward`` is coerced to a
    :class:`~dosegym.envs.reward.RewardConfig`, counts to ``int``."""

    policy: DosePolicy | None = None
    cases: Any = "phantoms:headneck"
    scorecard: str | Path | Scorecard | None = None
    steps: int = 20
    reward: RewardConfig | dict[str, Any] | None = None
    device: str | torch.device | None = None
    obs_backend: str = "numpy"
    render_mode: str | None = None
    case_cache: int = 16
    allow_card_mismatch: bool = False
    rescale_card: bool = False

    #: A kind's own numeric fields and their checks: field -> ("count", "") for integers
    #: >= 1, or (">0" | ">=0", what the message says a valid value is).
    CHECKS: ClassVar[dict[str, tuple[str, str]]] = {}

    def __post_init__(self) -> None:
        if self.obs_backend not in OBS_BACKENDS:
            raise EnvError(f"obs_backend {self.obs_backend!r} is unknown; valid: {list(OBS_BACKENDS)}")
        if self.render_mode is not None and self.render_mode not in RENDER_MODES:
            raise EnvError(
                f"render_mode {self.render_mode!r} is unknown; valid: {list(RENDER_MODES)} or None"
            )
        self._set(steps=count_arg("steps", self.steps), case_cache=count_arg("case_cache", self.case_cache))
        self._set(reward=RewardConfig.coerce(self.reward))
        self._set(allow_card_mismatch=bool(self.allow_card_mismatch), rescale_card=bool(self.rescale_card))
        for name, (rule, what) in self.CHECKS.items():
            value = getattr(self, name)
            if rule == "count":
                self._set(**{name: count_arg(name, value)})
            else:
                self._set(**{name: positive_arg(name, value, what, allow_zero=rule == ">=0")})

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def reward_config(self) -> RewardConfig:
        assert isinstance(self.reward, RewardConfig)
        return self.reward

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def coerce(
        cls: type[C],
        value: C | dict[str, Any] | None = None,
        keywords: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        extra: Sequence[str] = (),
    ) -> C:
        """A config from ``value`` (None, a config of this class or a dict of fields) updated
        with ``keywords``. An unknown field raises ``EnvError`` naming it, the closest valid
        keyword and every valid one (``extra``: keywords taken besides, e.g. ``num_envs``;
        ``name``: who is asking, default the class)."""
        if isinstance(value, cls):
            fields = {f: getattr(value, f) for f in cls.field_names()}
        elif value is None or isinstance(value, dict):
            fields = dict(value or {})
        else:
            raise EnvError(
                f"config must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}"
            )
        fields.update(keywords or {})
        valid = [*extra, *cls.field_names()]
        bad = sorted(set(fields) - set(cls.field_names()))
        if bad:
            close = difflib.get_close_matches(bad[0], valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EnvError(
                f"{name or cls.__name__}: unknown keyword argument(s) {bad}{hint}; valid keywords: {valid}"
            )
        return cls(**fields)
