"""``AgentConfig``: the fields every alignment agent shares (pydantic v2, YAML round-trip).

Each field has a one-line docstring (the CleanRL habit); an agent subclasses the config and
adds its own fields the same way. ``extra="forbid"``: a misspelled field is an
:class:`~dosegym.errors.AgentError` that lists the valid ones (:meth:`AgentConfig.coerce`,
:meth:`AgentConfig.from_yaml`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dosegym.data.atomic import atomic_path
from dosegym.errors import AgentError

#: Default LoRA targets: every ``Conv3d`` and ``Linear`` layer of the denoiser.
AUTO_TARGETS = "auto"


class RewardFields(BaseModel):
    """The fields of :class:`dosegym.envs.reward.RewardConfig`, as a nested model (YAML)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    w_score: float = 1.0
    """Weight of the scorecard term."""
    w_fid: float = 0.0
    """Weight of the fidelity term (MAE in Gy to the anchor dose)."""
    w_kl: float = 0.0
    """Weight of the KL term to the frozen reference (0: the env never runs the reference)."""
    scale: Literal["raw", "normalised", "baseline"] = "normalised"
    """How the score term is scaled: raw points, normalised total, or gain over the baseline."""
    fidelity: Literal["auto", "pretrained", "reference"] = "auto"
    """The fidelity anchor: the pretrained model's dose, the reference plan, or auto."""
    baseline_samples: int = Field(4, ge=1)
    """Pretrained samples that estimate the baseline points."""
    baseline_seed: int = 0
    """Seed of those baseline samples."""
    score: Literal["exact", "dense"] = "exact"
    """The score term: the exact card, or the dense score (soft metrics, leaky failing ends)."""
    dense_temperature_gy: float = Field(2.0, gt=0)
    """Dense score: the soft metrics' temperature in Gy."""
    dense_leak: float = Field(1.0, ge=0)
    """Dense score: points fall past each curve's failing end at this share of its mean slope."""

    @field_validator("w_score", "w_fid", "w_kl")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("must be a finite number >= 0")
        return v

    def build(self) -> Any:
        """The env's :class:`~dosegym.envs.reward.RewardConfig` of these fields."""
        from dosegym.envs.reward import RewardConfig

        return RewardConfig(**self.model_dump())


class AgentConfig(BaseModel):
    """The shared fields of every agent's config (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    samples_per_iteration: int = Field(8, ge=1)
    """Complete samples (episodes) collected per iteration; the budget is counted in samples."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of the optimizer."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_iterations: int = Field(0, ge=0)
    """Iterations of linear warmup from 0 to ``learning_rate``."""
    seed: int = 0
    """Seed of every random choice of the run (rollout noise, case order, eval samples)."""
    reward: RewardFields = Field(default_factory=RewardFields)
    """Reward composition (the env's ``RewardConfig`` fields)."""
    sample_num_steps: int = Field(20, ge=1)
    """Sampler steps of a rollout and of ``predict``."""
    sample_eta: float = Field(1.0, ge=0)
    """DDIM eta of rollouts (1: every step stochastic; larger explores more)."""
    predict_eta: float = Field(0.0, ge=0)
    """DDIM eta of ``predict`` (0: deterministic given the initial noise, like DosePolicy.predict)."""
    eval_cases: list[str] = Field(default_factory=list)
    """Cases evaluated before training and every ``eval_every`` iterations (sources or ids)."""
    eval_every: int = Field(10, ge=1)
    """Evaluation cadence, in iterations."""
    train: Literal["lora", "full"] = "lora"
    """What trains: LoRA adapters on the denoiser (default) or every weight."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(8.0, gt=0)
    """LoRA alpha (the adapter is scaled by alpha / r)."""
    lora_targets: list[str] | Literal["auto"] = AUTO_TARGETS
    """Module names that get adapters; ``"auto"``: every Conv3d and Linear layer of the denoiser."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of forward passes (``"no"``: float32, the CPU default)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Minibatches whose gradients add up before one optimizer step."""
    allow_card_mismatch: bool = False
    """Train and score with a card that does not fit the cases (card_fit); refused by default."""

    #: The registry name of the agent this config belongs to (set by each subclass).
    agent_name: ClassVar[str] = ""

    # -- construction ------------------------------------------------------------------
    @classmethod
    def coerce(cls, value: AgentConfig | dict[str, Any] | None = None, **overrides: Any) -> AgentConfig:
        """A config of this class from ``None`` (defaults), a dict of fields or a config
        (of this class or a parent), with ``overrides``; ``AgentError`` names each bad field
        and lists the valid ones."""
        if value is None:
            data: dict[str, Any] = {}
        elif isinstance(value, AgentConfig):
            data = value.model_dump()
            if not isinstance(value, cls):
                data = {k: v for k, v in data.items() if k in cls.model_fields}
        elif isinstance(value, dict):
            data = dict(value)
        else:
            raise AgentError(
                f"{cls.__name__}: expected a config, a dict of its fields or None, got {type(value).__name__}"
            )
        data.update(overrides)
        try:
            return cls(**data)
        except ValidationError as exc:
            raise AgentError(_explain(cls, exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON/YAML values, with the agent's name first."""
        return {"agent": self.agent_name, **self.model_dump(mode="json")}

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; with ``path``, also written there atomically."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> AgentConfig:
        """A config from a YAML file (or YAML text holding a mapping); the file's ``agent``
        key, when present, must be this config's agent."""
        text = str(path_or_text)
        is_path = isinstance(path_or_text, Path) or (
            "\n" not in text and (text.endswith((".yaml", ".yml")) or Path(text).is_file())
        )
        if is_path:
            where = str(path_or_text)
            try:
                text = Path(path_or_text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise AgentError(f"{where}: cannot read the agent config ({exc})") from exc
        else:
            where, text = "agent config text", str(path_or_text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AgentError(f"{where}: not valid YAML ({exc})") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise AgentError(f"{where}: an agent config is a mapping of fields, got {type(data).__name__}")
        agent = data.pop("agent", None)
        name = cls.agent_name
        if agent not in (None, "", name):
            raise AgentError(f"{where}: the config is for agent {agent!r}, not {name!r}")
        try:
            return cls.coerce(data)
        except AgentError as exc:
            raise AgentError(f"{where}: {exc}") from None

    # -- derived -----------------------------------------------------------------------
    def reward_config(self) -> Any:
        """The env's ``RewardConfig`` of :attr:`reward`."""
        return self.reward.build()

    def learning_rate_at(self, iteration: int, total_iterations: int) -> float:
        """The learning rate of iteration ``iteration`` (0-based) of ``total_iterations``."""
        if self.warmup_iterations and iteration < self.warmup_iterations:
            return self.learning_rate * (iteration + 1) / self.warmup_iterations
        if self.lr_schedule == "constant":
            return self.learning_rate
        span = max(1, total_iterations - self.warmup_iterations)
        progress = min(1.0, (iteration - self.warmup_iterations) / span)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def valid_fields(cls: type[BaseModel]) -> list[str]:
    """The field names a user may give."""
    return list(cls.model_fields)


def _explain(cls: type[AgentConfig], exc: ValidationError) -> str:
    parts = []
    unknown = False
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            unknown = True
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"field {loc!r}: {err['msg']} (got {err.get('input')!r})")
    msg = f"{cls.__name__}: " + "; ".join(parts)
    if unknown:
        msg += f"; valid fields: {valid_fields(cls)}"
        if any(
            e["type"] == "extra_forbidden" and len(e["loc"]) > 1 and e["loc"][0] == "reward"
            for e in exc.errors()
        ):
            msg += f"; valid reward fields: {list(RewardFields.model_fields)}"
    return msg
