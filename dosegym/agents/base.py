"""The :class:`Agent` contract (DESIGN.md "The agent contract") and the machinery every agent shares.

::

    agent = Agent(env, policy, config)            # env: a (vector) dosegym env; policy: DosePolicy
    agent.learn(total_samples=512, callback=None)
    agent.save("runs/ddpo")                       # config + what trains (LoRA adapters) only
    agent = Agent.load("runs/ddpo")               # on top of the checkpoint it was trained from
    dose_gy = agent.predict(case, seed=0)         # like DosePolicy.predict

Shared here: the config (:meth:`Agent.Config.coerce`), the card-fit check
(:meth:`Agent.check_card_fit`, before training and scoring: a card that does not fit a case
is refused unless ``allow_card_mismatch``), the budget check (:meth:`Agent.check_budget`: a
budget smaller than one iteration is refused with the minimum), the trainable copy of the
policy (:mod:`dosegym.agents.lora`; the given policy is never changed, its frozen reference
is :meth:`Agent.reference`), atomic saving and loading, and the ``result.json`` writer
(:func:`write_result`, schema :data:`RESULT_SCHEMA_VERSION`).

A saved agent folder (one atomic write, writer :data:`WRITER`): ``agent.json`` (agent name,
format version, base checkpoint and the fingerprint of its weights, samples trained),
``config.yaml`` and what trains (``adapter.safetensors`` + ``adapter.json`` or
``weights.safetensors`` + ``weights.json``; nothing for an agent that learns nothing).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dosegym._version import __version__
from dosegym.agents import lora
from dosegym.agents.config import AgentConfig
from dosegym.data.atomic import atomic_folder, atomic_path, json_text
from dosegym.data.case import Case
from dosegym.diffusion import DosePolicy, load_pretrained
from dosegym.errors import AgentError, DosegymError
from dosegym.scorecards.fit import CardFit, card_fit
from dosegym.scorecards.scorecard import Scorecard

WRITER = "dosegym agent"
AGENT_FILE = "agent.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
RESULT_FILE = "result.json"
#: Version of the ``result.json`` schema (see :func:`write_result`).
RESULT_SCHEMA_VERSION = 1
#: Packages whose versions every ``result.json`` records.
RESULT_PACKAGES = ("torch", "numpy", "peft", "gymnasium", "pydantic", "safetensors", "diffusers")
#: The base checkpoint of a policy loaded without a path.
SHIPPED = "shipped"

#: ``callback(agent, info) -> bool | None``; returning False stops ``learn``.
Callback = Callable[["Agent", dict[str, Any]], "bool | None"]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes): which base weights a run used."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Agent:
    """Base class of every alignment agent (see the module docstring).

    ``env``: a dosegym env (single or vector) or ``None`` (predict only, where the agent
    needs no card). ``policy``: the base :class:`DosePolicy` (default: the env's policy, else
    ``load_pretrained(base_checkpoint)``); it is never changed. ``config``: the agent's
    config, a dict of its fields or ``None``. ``base_checkpoint``: the folder the policy was
    loaded from (recorded so that :meth:`load` rebuilds on it; ``None``: the shipped one when
    the policy is loaded here, else unknown and checked by fingerprint).
    """

    #: Registry name (the key of :data:`dosegym.agents.registry.AGENTS`).
    name: ClassVar[str] = ""
    #: The config class of the agent.
    Config: ClassVar[type[AgentConfig]] = AgentConfig
    #: False for an agent that trains nothing (Best-of-N): no trainable copy, nothing saved.
    learns: ClassVar[bool] = True
    #: False for a learner that is not the denoiser (SB3 on GuidedDose): no trainable copy, no adapters.
    trains_denoiser: ClassVar[bool] = True

    def __init__(
        self,
        env: Any = None,
        policy: DosePolicy | None = None,
        config: AgentConfig | dict[str, Any] | None = None,
        *,
        base_checkpoint: str | Path | None = None,
    ) -> None:
        self.config = self.Config.coerce(config)
        self.env = env
        self.base_checkpoint = str(base_checkpoint) if base_checkpoint is not None else None
        if policy is None and env is not None:
            policy = getattr(env, "policy", None)
        if policy is None:
            policy = load_pretrained(base_checkpoint)
            self.base_checkpoint = self.base_checkpoint or SHIPPED
        if not isinstance(policy, DosePolicy):
            raise AgentError(f"policy must be a DosePolicy, got {type(policy).__name__}")
        if env is not None:
            spec = getattr(env, "model_spec", None)
            if spec is not None and spec != policy.spec:
                raise AgentError(
                    f"the env's model grid {spec.shape} at {spec.spacing_mm} mm is not the policy's "
                    f"{policy.spec.shape} at {policy.spec.spacing_mm} mm: make the env with "
                    "policy=this policy"
                )
        if self.config.mixed_precision == "fp16" and policy.device.type == "cpu":
            raise AgentError("mixed_precision 'fp16' needs a GPU; valid on CPU: ['no', 'bf16']")
        num_envs = getattr(env, "num_envs", None)
        if self.learns and isinstance(num_envs, int) and self.samples_per_iteration % num_envs:
            raise AgentError(
                f"samples_per_iteration {self.samples_per_iteration} is not a multiple of the env's "
                f"num_envs {num_envs} (every rollout batch steps all of them); give a multiple of {num_envs}"
            )
        self.base_policy = policy
        self.base_fingerprint = weights_fingerprint(policy.model)
        self.samples_trained = 0
        self.trains: dict[str, Any] = {"train": "nothing"}
        self.policy = policy
        self.iteration = 0
        self.curves: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        if self.learns and self.trains_denoiser:
            c = self.config
            self.policy, self.trains = lora.trainable_policy(
                policy, c.train, c.lora_rank, c.lora_alpha, c.lora_targets
            )

    # -- what trains --------------------------------------------------------------------
    def reference(self) -> DosePolicy:
        """The frozen reference for KL terms: the base policy's :meth:`DosePolicy.reference`."""
        return self.base_policy.reference()

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train (the LoRA adapters, or every weight; none for Best-of-N)."""
        return lora.trainable_parameters(self.policy.model) if self.learns and self.trains_denoiser else []

    # -- checks -------------------------------------------------------------------------
    @property
    def samples_per_iteration(self) -> int:
        """Samples one iteration costs (the budget unit)."""
        return int(self.config.samples_per_iteration)

    def check_budget(self, total_samples: int) -> int:
        """The number of whole iterations ``total_samples`` buys; ``AgentError`` with the
        minimum when it buys none."""
        if isinstance(total_samples, bool) or not isinstance(total_samples, (int, np.integer)):
            raise AgentError(f"total_samples must be an integer, got {total_samples!r}")
        per = self.samples_per_iteration
        if total_samples < per:
            raise AgentError(
                f"a budget of {int(total_samples)} samples is smaller than one iteration of "
                f"{self.name or type(self).__name__} "
                f"({per} samples); the minimum is total_samples={per}"
            )
        return int(total_samples) // per

    def card_for(self, case: Case) -> Scorecard:
        """The card that scores ``case``: the env's (the card given to it, else the site's default)."""
        env = getattr(self.env, "unwrapped", self.env)  # gym.make wraps; wrappers hide attributes
        cards = getattr(env, "cards", None) if env is not None else None
        if cards is None:
            raise AgentError(
                f"{type(self).__name__} has no env to take the scorecard of case {case.case_id!r} from: "
                "give the agent an env (env=...) made with scorecard=..."
            )
        try:
            return cards.card_for(case)
        except DosegymError as exc:
            raise AgentError(f"case {case.case_id!r}: no scorecard: {exc}") from exc

    def check_card_fit(self, cases: Iterable[Case]) -> list[CardFit]:
        """:func:`~dosegym.scorecards.fit.card_fit` of every case's card; ``AgentError`` for a
        poor fit unless ``config.allow_card_mismatch``."""
        fits = []
        for case in cases:
            card = self.card_for(case)
            try:
                fit = card_fit(card, case)
            except DosegymError as exc:
                raise AgentError(
                    f"case {case.case_id!r} cannot be scored with card {card.name!r}: {exc}"
                ) from exc
            if not fit.ok and not self.config.allow_card_mismatch:
                raise AgentError(
                    f"{fit.message()}; training or scoring with it would align the model to the wrong plan. "
                    "Use a card for this case, or set allow_card_mismatch=True to use it anyway"
                )
            fits.append(fit)
        return fits

    def eval_cases(self) -> list[Case]:
        """The config's ``eval_cases``, read (phantom ids, paths or sources)."""
        if not self.config.eval_cases:
            return []
        from dosegym.envs.sources import CaseSource

        try:
            source = CaseSource(list(self.config.eval_cases))
            return [source.load(i) for i in range(len(source))]
        except DosegymError as exc:
            raise AgentError(f"eval_cases: {exc}") from exc

    # -- the contract -------------------------------------------------------------------
    def learn(self, total_samples: int, callback: Callback | None = None) -> Agent:
        """Collect rollouts through the env and update what trains, for ``total_samples``
        samples (whole iterations). Returns ``self``."""
        raise NotImplementedError

    def predict(self, case: Case, seed: int = 0) -> np.ndarray:
        """The dose of ``case`` in Gy on its grid, ``(Z, Y, X)`` ``float32`` (like ``DosePolicy.predict``)."""
        c = self.config
        return self.policy.predict(
            case, steps=c.sample_num_steps, sampler=self.policy.sampler, seed=seed, eta=c.predict_eta
        )

    def save(self, folder: str | Path, training_state: bool = False) -> Path:
        """Write the agent atomically into ``folder`` (see the module docstring); with
        ``training_state`` also what :meth:`load` with ``resume=True`` needs to continue."""
        dest = Path(folder)
        with atomic_folder(dest, WRITER) as tmp:
            (tmp / CONFIG_FILE).write_text(self.config.to_yaml(), encoding="utf-8")
            denoiser = self.learns and self.trains_denoiser
            files = lora.save_trainable(tmp, self.policy.model, self.trains) if denoiser else []
            files += self._save_extra(tmp, training_state)
            doc = {
                "format_version": FORMAT_VERSION,
                "agent": self.name,
                "dosegym_version": __version__,
                "base_checkpoint": self.base_checkpoint,
                "base_fingerprint": self.base_fingerprint,
                "samples_trained": int(self.samples_trained),
                "trains": self.trains,
                "files": [CONFIG_FILE, *files],
            }
            (tmp / AGENT_FILE).write_text(json_text(doc), encoding="utf-8")
        return dest

    @classmethod
    def load(
        cls, folder: str | Path, env: Any = None, policy: DosePolicy | None = None, resume: bool = False
    ) -> Agent:
        """An agent saved by :meth:`save`, on top of its base checkpoint (``policy`` given: that
        policy, checked by fingerprint). Call it on the agent's class;
        :func:`dosegym.agents.load` picks the class from the folder."""
        folder = Path(folder)
        doc = read_agent_file(folder)
        if not cls.name:
            raise AgentError(
                f"{folder}: load a {doc['agent']!r} agent through its class "
                f"(dosegym.agents.get({doc['agent']!r}).load) or dosegym.agents.load"
            )
        if doc["agent"] != cls.name:
            raise AgentError(f"{folder}: holds a {doc['agent']!r} agent, not {cls.name!r}")
        config = cls.Config.from_yaml(folder / CONFIG_FILE)
        base = doc.get("base_checkpoint")
        if policy is None:
            if base in (None, "given"):
                raise AgentError(
                    f"{folder}: the agent was trained on a policy given in memory, not a checkpoint: "
                    "pass policy= the same base policy"
                )
            policy = load_pretrained(None if base == SHIPPED else base)
        if weights_fingerprint(policy.model) != doc.get("base_fingerprint"):
            raise AgentError(
                f"{folder}: the base policy's weights are not the ones the agent was trained from "
                f"(base checkpoint {base!r}); load it on that checkpoint"
            )
        agent = cls.__new__(cls)
        agent.config, agent.env = config, env
        agent.base_checkpoint = base
        agent.base_policy, agent.base_fingerprint = policy, doc["base_fingerprint"]
        agent.samples_trained = int(doc.get("samples_trained", 0))
        agent.policy, agent.trains = policy, {"train": "nothing"}
        agent.iteration, agent.curves, agent.eval_history = 0, [], []
        if cls.learns and cls.trains_denoiser:
            agent.policy, agent.trains = lora.load_trainable(folder, policy)
            agent.trains["trainable_parameters"] = sum(p.numel() for p in agent.parameters())
        agent._after_load(folder, resume)
        return agent

    def _save_extra(self, folder: Path, training_state: bool) -> list[str]:
        """Hook of subclasses: write their own files into ``folder`` (the temporary folder of
        :meth:`save`'s atomic write); their names."""
        return []

    def _after_load(self, folder: Path, resume: bool) -> None:
        """Hook of subclasses: rebuild their own state after :meth:`load` from ``folder``."""

    def _after_iteration(self, metrics: dict[str, float], callback: Callback | None = None) -> bool:
        """(Provisional: the shared learning loop replaces it.) Count the iteration, refuse a
        non-finite reward, loss or gradient norm, record the curve, call ``callback``; False: stop."""
        self.iteration += 1
        self.samples_trained += self.samples_per_iteration
        bad = [
            k for k in ("reward_mean", "loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])
        ]
        if bad:
            raise AgentError(
                f"iteration {self.iteration}: {bad} not finite ({ {k: metrics[k] for k in bad} }); "
                "the last good checkpoint is the last one saved"
            )
        info = {"iteration": self.iteration, "samples": self.samples_trained, **metrics}
        self.curves.append(info)
        return not (callback is not None and callback(self, info) is False)

    def result(self, **fields: Any) -> dict[str, Any]:
        """The ``result.json`` document of this agent (see :func:`write_result`)."""
        return result_document(self.name, self.config, samples_trained=self.samples_trained, **fields)


def read_agent_file(folder: Path) -> dict[str, Any]:
    path = folder / AGENT_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgentError(f"{folder}: not a saved agent (no {AGENT_FILE})") from None
    except (OSError, ValueError) as exc:
        raise AgentError(f"{path}: unreadable ({exc})") from exc
    if (
        not isinstance(doc, dict)
        or doc.get("format_version") != FORMAT_VERSION
        or not isinstance(doc.get("agent"), str)
    ):
        raise AgentError(f"{path}: not an agent file of format_version {FORMAT_VERSION}")
    return doc


def package_versions(names: Sequence[str] = RESULT_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when missing), with python and dosegym."""
    out: dict[str, str | None] = {"python": platform.python_version(), "dosegym": __version__}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def result_document(agent: str, config: AgentConfig, **fields: Any) -> dict[str, Any]:
    """``{"schema_version", "agent", "config", "seed", "packages", **fields}``: the stub of the
    versioned ``result.json`` schema that later fields (scores before/after, curves) extend."""
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "agent": agent,
        "config": config.to_dict(),
        "seed": int(config.seed),
        "packages": package_versions(),
        **fields,
    }


def write_result(path: str | Path, document: dict[str, Any]) -> Path:
    """Write a ``result.json`` document atomically (strict JSON); ``path`` may be a run folder."""
    dest = Path(path)
    if dest.is_dir():
        dest = dest / RESULT_FILE
    if document.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise AgentError(f"result document: schema_version must be {RESULT_SCHEMA_VERSION}")
    with atomic_path(dest) as tmp:
        tmp.write_text(json_text(document), encoding="utf-8")
    return dest
