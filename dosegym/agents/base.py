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
is :meth:`Agent.reference`), atomic saving and loading, and the ``result.json`` document
(:meth:`Agent.result`; the schema, writer and reader are in :mod:`dosegym.agents.result`).

**The learning loop** (:meth:`Agent.learn`, the template every learning agent fills in with
:meth:`Agent.train_iteration`): check the budget, :meth:`Agent.setup_training` (the shared
optimizer step :class:`~dosegym.agents.optim.Optim`, once; a resumed state applied), evaluate
the ``eval_cases`` before the first iteration, then per iteration ``metrics =
train_iteration()`` and :meth:`Agent._after_iteration` (counts, non-finite checks, evaluation
every ``eval_every`` iterations and after the last, :attr:`Agent.curves`, the callback).
Agents that drive their own loop (SB3) call ``setup_training`` and ``_after_iteration`` the
same way. Rollout randomness comes from :meth:`Agent.rollout_seed` and
:meth:`Agent.generator`, functions of ``(config.seed, iteration, index, rank)``, so a resumed
run needs no env RNG state.

A saved agent folder (one atomic write, writer :data:`WRITER`): ``agent.json`` (agent name,
format version, base checkpoint and the fingerprint of its weights, samples trained),
``config.yaml`` and what trains (``adapter.safetensors`` + ``adapter.json`` or
``weights.safetensors`` + ``weights.json``; nothing for an agent that learns nothing) and,
saved with ``training_state=True``, ``training_state.pt`` (what :meth:`Agent.load` with
``resume=True`` needs to continue exactly: the optimizer's state, ``iteration``,
``samples_trained``, ``wall_s``, ``curves``, ``eval_history``, torch's and numpy's global RNG
states and the agent's own state, e.g. DDPO's stat tracker; plain tensors and lists, read
with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dosegym._version import __version__
from dosegym.agents import lora
from dosegym.agents.config import AgentConfig
from dosegym.agents.optim import Optim
from dosegym.agents.result import agent_result
from dosegym.data.atomic import atomic_folder, json_text
from dosegym.data.case import Case
from dosegym.diffusion import DosePolicy, load_pretrained
from dosegym.errors import AgentError, DosegymError
from dosegym.scorecards.fit import CardFit, card_fit
from dosegym.scorecards.scorecard import Scorecard

WRITER = "dosegym agent"
AGENT_FILE = "agent.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
TRAINING_STATE_FILE = "training_state.pt"
TRAINING_STATE_VERSION = 1
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
    #: The env ``dosegym align`` makes for the agent: ``"denoise"`` (DenoiseDose) or ``"guided"``.
    env_kind: ClassVar[str] = "denoise"
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
        if self.learns and self.trains_denoiser:
            c = self.config
            with torch.random.fork_rng(devices=[]):  # the adapters' initial weights follow the seed
                torch.manual_seed(c.seed % 2**63)
                self.policy, self.trains = lora.trainable_policy(
                    policy, c.train, c.lora_rank, c.lora_alpha, c.lora_targets
                )
        self._init_training()

    def _init_training(self) -> None:
        """The training state of a fresh agent (also set by :meth:`load`)."""
        self.iteration = 0
        self.total_iterations = 0
        self.wall_s = 0.0
        self.curves: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.optim: Optim | None = None
        self.last_checkpoint: str | None = None
        self._resume: dict[str, Any] | None = None
        self._wall_start = time.perf_counter()
        self._merged: lora.MergedCopy | None = None  # sampling_policy()'s copy and its policy
        self._sampling: DosePolicy | None = None

    # -- what trains --------------------------------------------------------------------
    def reference(self) -> DosePolicy:
        """The frozen reference for KL terms: the base policy's :meth:`DosePolicy.reference`."""
        return self.base_policy.reference()

    def sampling_policy(self) -> DosePolicy:
        """The policy rollouts and predictions sample from: with LoRA, a plain copy of the
        denoiser with the adapters' current weights folded in (:class:`~dosegym.agents.lora.MergedCopy`,
        synced on every call: ~10 ms for the shipped model; the same doses to float rounding,
        at the base model's cost per forward); otherwise :attr:`policy` itself."""
        if self.trains.get("train") != "lora":
            return self.policy
        if self._merged is None or self._merged.source is not self.policy.model:
            self._merged = lora.MergedCopy(self.policy.model)
            p = self.policy
            self._sampling = DosePolicy(
                self._merged.model, sampler=p.sampler, eta=p.eta, device=p.device, refiner=p.refiner
            )
        self._merged.sync()
        assert self._sampling is not None
        return self._sampling

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

    # -- the learning loop --------------------------------------------------------------
    def learn(self, total_samples: int, callback: Callback | None = None) -> Agent:
        """Collect rollouts through the env and update what trains, for ``total_samples``
        more samples (whole iterations; see the module docstring). Returns ``self``."""
        n = self.check_budget(total_samples)
        self.total_iterations = self.iteration + n  # the learning-rate horizon
        self._wall_start = time.perf_counter() - self.wall_s
        self.setup_training(n)
        if self.config.eval_cases and self.iteration == 0 and not self.eval_history:
            self._record_eval()
        for _ in range(n):
            if self._after_iteration(self.train_iteration(), callback) is False:
                break
        return self

    def train_iteration(self) -> dict[str, float]:
        """One iteration: collect ``samples_per_iteration`` rollouts and update; the metrics
        (``reward_mean``, ``reward_std``, ``score_mean``, ``kl_mean``, ``mae_gy``, ``loss``,
        ``grad_norm``, ``tied_fraction``, and the agent's own)."""
        raise NotImplementedError(f"{type(self).__name__} does not train by iterations")

    def grad_clip_norm(self) -> float:
        """The gradient-norm clip of the optimizer step: the config's ``train_max_grad_norm``
        where it has one (DDPO, GRPO, DRaFT, DiffusionNFT), else ``inf`` (none)."""
        return float(getattr(self.config, "train_max_grad_norm", math.inf))

    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (default ``config.gradient_accumulation_steps``)."""
        return int(self.config.gradient_accumulation_steps)

    def setup_training(self, iterations: int) -> None:
        """Before ``iterations`` more iterations (the horizon :attr:`total_iterations` is set):
        the optimizer step (made once), a resumed state applied. SB3 agents build their model
        here instead."""
        if self.learns and self.optim is None:
            self.optim = Optim(
                self.policy.model,
                self.parameters(),
                self.config,
                self.grad_clip_norm(),
                self.accumulation_steps(),
            )
        if self._resume is not None:
            if self.optim is not None and self._resume.get("optim") is not None:
                self.optim.load_state_dict(self._resume["optim"])
            self._resume = None

    @property
    def rank(self) -> int:
        """This process's rank under ``accelerate launch`` (0 alone)."""
        return self.optim.rank if self.optim is not None else 0

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.optim is None or self.optim.is_main

    def _stream(self, index: int, purpose: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.config.seed % 2**63, self.iteration, purpose, self.rank, index])

    def rollout_seed(self, index: int) -> int:
        """The env reset seed of rollout batch ``index`` of the current iteration on this rank
        (a function of ``(config.seed, iteration, index, rank)``)."""
        return int(self._stream(index, 0).generate_state(1, np.uint32)[0])

    def generator(self, index: int = 0) -> torch.Generator:
        """A CPU generator for the current iteration's training draws (shuffles, timesteps),
        seeded from ``(config.seed, iteration, index, rank)``."""
        seed = int(self._stream(index, 1).generate_state(2, np.uint32).astype(np.uint64) @ [1, 2**32])
        return torch.Generator("cpu").manual_seed(seed)

    def nonfinite_error(self, what: str) -> AgentError:
        """The error that stops a run on a non-finite value ``what`` (which case, which step)."""
        ckpt = self.last_checkpoint or "none (no checkpoint was saved in this run)"
        return AgentError(
            f"iteration {self.iteration + 1}: {what}. Training stopped before any update of this "
            f"iteration: the weights are those after iteration {self.iteration}, and the last good "
            f"checkpoint is {ckpt}"
        )

    def _after_iteration(self, metrics: dict[str, float], callback: Callback | None = None) -> bool:
        """Book an iteration: counts, non-finite checks, evaluation, curves, the callback.
        Returns False when the callback asks to stop."""
        for key in ("reward_mean", "loss", "grad_norm"):
            value = metrics.get(key)
            if value is not None and not math.isfinite(float(value)):
                raise self.nonfinite_error(f"the iteration's {key} is {value}")
        self.iteration += 1
        self.samples_trained += self.samples_per_iteration
        self.wall_s = time.perf_counter() - self._wall_start
        lr = self.config.learning_rate_at(self.iteration - 1, max(self.total_iterations, self.iteration))
        info: dict[str, Any] = {
            "iteration": self.iteration,
            "samples": self.samples_trained,
            "wall_s": self.wall_s,
            "lr": lr,
            **{k: float(v) for k, v in metrics.items()},
        }
        self.curves.append(dict(info))
        every = self.iteration % self.config.eval_every == 0 or self.iteration == self.total_iterations
        if self.config.eval_cases and every:
            info["eval"] = self._record_eval()
        if callback is not None and callback(self, info) is False:
            return False
        return True

    def _record_eval(self) -> dict[str, Any] | None:
        """Evaluate the eval cases (main process only) into :attr:`eval_history`."""
        if not self.is_main_process:
            return None
        summary = self.evaluate().summary()
        self.eval_history.append(
            {"iteration": self.iteration, "samples": self.samples_trained, "wall_s": self.wall_s, **summary}
        )
        return summary

    def evaluate(self, cases: Sequence[Case] | None = None, seeds: Sequence[int] | None = None) -> Any:
        """:func:`dosegym.agents.evaluate.evaluate` of this agent on ``cases`` (default the eval cases)."""
        from dosegym.agents.evaluate import evaluate

        kw = {} if seeds is None else {"seeds": tuple(seeds)}
        return evaluate(self, list(self.eval_cases() if cases is None else cases), **kw)

    # -- the contract -------------------------------------------------------------------
    def predict(self, case: Case, seed: int = 0) -> np.ndarray:
        """The dose of ``case`` in Gy on its grid, ``(Z, Y, X)`` ``float32`` (like ``DosePolicy.predict``)."""
        c = self.config
        p = self.sampling_policy()
        return p.predict(case, steps=c.sample_num_steps, sampler=p.sampler, seed=seed, eta=c.predict_eta)

    def save(self, folder: str | Path, training_state: bool = False) -> Path:
        """Write the agent atomically into ``folder`` (see the module docstring); with
        ``training_state``, also what :meth:`load` ``resume=True`` needs. Only the main
        process writes (the others return at once)."""
        dest = Path(folder)
        if not self.is_main_process:
            return dest
        with atomic_folder(dest, WRITER) as tmp:
            (tmp / CONFIG_FILE).write_text(self.config.to_yaml(), encoding="utf-8")
            denoiser = self.learns and self.trains_denoiser
            files = lora.save_trainable(tmp, self.policy.model, self.trains) if denoiser else []
            if training_state:
                torch.save(self.training_state(), tmp / TRAINING_STATE_FILE)
                files.append(TRAINING_STATE_FILE)
            files += self._save_extra(tmp, training_state)
            doc = {
                "format_version": FORMAT_VERSION,
                "agent": self.name,
                "dosegym_version": __version__,
                "base_checkpoint": self.base_checkpoint,
                "base_fingerprint": self.base_fingerprint,
                "samples_trained": int(self.samples_trained),
                "iteration": int(self.iteration),
                "trains": self.trains,
                "files": [CONFIG_FILE, *files],
            }
            (tmp / AGENT_FILE).write_text(json_text(doc), encoding="utf-8")
        self.last_checkpoint = str(dest)
        return dest

    def training_state(self) -> dict[str, Any]:
        """What a resumed run needs (see the module docstring), as plain tensors and lists."""
        np_state = np.random.get_state()  # noqa: NPY002 (user code's; the library draws from neither global RNG)
        return {
            "format_version": TRAINING_STATE_VERSION,
            "iteration": int(self.iteration),
            "samples_trained": int(self.samples_trained),
            "wall_s": float(self.wall_s),
            "curves": self.curves,
            "eval_history": self.eval_history,
            "optim": None if self.optim is None else self.optim.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "agent_state": self.agent_state(),
        }

    def agent_state(self) -> dict[str, Any]:
        """Hook of subclasses: their own training state (plain tensors, lists, numbers)."""
        return {}

    def load_agent_state(self, state: dict[str, Any]) -> None:
        """Hook of subclasses: restore :meth:`agent_state`."""

    def _apply_training_state(self, folder: Path) -> None:
        path = folder / TRAINING_STATE_FILE
        if not path.is_file():
            raise AgentError(
                f"{folder}: no {TRAINING_STATE_FILE} to resume from; the agent was saved without "
                "training_state=True (save(folder, training_state=True) writes it)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            raise AgentError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(state, dict) or state.get("format_version") != TRAINING_STATE_VERSION:
            raise AgentError(f"{path}: not a training state of format_version {TRAINING_STATE_VERSION}")
        self.iteration, self.samples_trained = int(state["iteration"]), int(state["samples_trained"])
        self.wall_s = float(state["wall_s"])
        self.curves, self.eval_history = list(state["curves"]), list(state["eval_history"])
        torch.set_rng_state(state["torch_rng"])
        kind, key, *rest = state["numpy_rng"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))  # noqa: NPY002
        self.load_agent_state(state["agent_state"])
        self._resume = {"optim": state["optim"]}

    @classmethod
    def load(
        cls, folder: str | Path, env: Any = None, policy: DosePolicy | None = None, resume: bool = False
    ) -> Agent:
        """An agent saved by :meth:`save`, on top of its base checkpoint (``policy`` given: that
        policy, checked by fingerprint). ``resume``: restore the training state too, so that
        the next :meth:`learn` continues exactly (the env must be made as before). Call it on
        the agent's class; :func:`dosegym.agents.load` picks the class from the folder."""
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
        agent.policy, agent.trains = policy, {"train": "nothing"}
        if cls.learns and cls.trains_denoiser:
            agent.policy, agent.trains = lora.load_trainable(folder, policy)
            agent.trains["trainable_parameters"] = sum(p.numel() for p in agent.parameters())
        agent._init_training()
        agent.samples_trained = int(doc.get("samples_trained", 0))
        agent.iteration = int(doc.get("iteration", 0))
        agent._after_load(folder, resume)
        if resume:
            agent._apply_training_state(folder)
        agent.last_checkpoint = str(folder)
        return agent

    def _save_extra(self, folder: Path, training_state: bool) -> list[str]:
        """Hook of subclasses: write their own files into ``folder`` (the temporary folder of
        :meth:`save`'s atomic write); their names."""
        return []

    def _after_load(self, folder: Path, resume: bool) -> None:
        """Hook of subclasses: rebuild their own state after :meth:`load` from ``folder``
        (before a resumed training state is applied)."""

    def result(self, **fields: Any) -> dict[str, Any]:
        """The ``result.json`` document of this agent (see :func:`write_result`)."""
        return agent_result(self, **fields)


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
