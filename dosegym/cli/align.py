"""``dosegym align``: align a dose model to a scorecard with one agent, measured on held-out cases.

The run folder ``--out DIR`` (new, empty, or an earlier ``dosegym align`` run with ``--resume``):

- ``run.json``: what the run was asked (agent, full config, cases, eval cases, card, model
  checkpoint, ``num_envs``); a resume compares against it;
- ``before.json``: the evaluation of the eval cases before training (kept for a resume);
- ``checkpoint/``: the agent with its training state (``Agent.save(..., training_state=True)``),
  written atomically at every evaluation during training and at the end (agents that
  learn only);
- ``tb/``: TensorBoard logs: ``train/*`` scalars per iteration and ``eval/*`` scalars per
  evaluation against samples trained, and the config's hyperparameter table (``tb/hparams``);
- ``doses/before/``, ``doses/after/``: the doses of the first ``--keep-doses`` eval cases
  (first eval seed; :mod:`dosegym.report.saved`), what ``dosegym report`` draws;
- ``result.json``: the versioned result (:mod:`dosegym.agents.result`), validated.

The agent's rollout env is the native vector env of the kind its class asks for
(``Agent.env_kind``: ``"denoise"`` -> DenoiseDose with ``obs_backend="torch"`` and no
pretrained log-prob, ``"guided"`` -> GuidedDose, ``"bandit"`` -> ScorecardBandit, whose action is
a whole dose: DRaFT), ``--num-envs`` episodes in lockstep (default
a learner's ``samples_per_iteration`` over the processes), on the train cases with the config's
reward and sampler steps. Under ``accelerate launch`` every process trains (the budget and
``samples_per_iteration`` count the samples of all of them); only the main one (``RANK`` 0)
checks and writes ``--out``, evaluates and shows the progress bar.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from dosegym.cli._common import console, err_console, friendly_errors
from dosegym.errors import AgentError

ALIGN_WRITER = "dosegym align"
RUN_FILE = "run.json"
BEFORE_FILE = "before.json"
CHECKPOINT_DIR = "checkpoint"
TB_DIR = "tb"
#: Run options a resume must keep (besides the config); ``--force`` lets them differ too.
RUN_KEYS = ("agent", "cases", "eval_cases", "scorecard", "checkpoint", "num_envs")
#: Config fields that fix the shape of what trains: a resume can never change them.
TRAINS_FIELDS = ("train", "lora_rank", "lora_alpha", "lora_targets", "samples_per_iteration")
#: ``Agent.env_kind`` -> the native vector env it gets.
ENV_KINDS = {
    "denoise": "dosegym.envs.denoise:DenoiseDoseVectorEnv",
    "guided": "dosegym.envs.guided:GuidedDoseVectorEnv",
    "bandit": "dosegym.envs.bandit:ScorecardBanditVectorEnv",
}
#: Eval cases whose doses (first eval seed, before and after) a run keeps for its report.
KEEP_DOSES = 4
#: The training metrics shown on the progress bar: info key -> label.
BAR_FIELDS = {"reward_mean": "reward", "score_mean": "score", "kl_mean": "KL", "mae_gy": "MAE"}


def world_size() -> int:
    """The number of processes of an ``accelerate launch`` (its ``WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """False on the non-main processes of an ``accelerate launch`` (``RANK`` > 0). Read from the
    launcher's environment: an accelerate ``PartialState`` made here, before the agent's
    ``Accelerator(cpu=...)``, would fix a single-process state on CPUs."""
    return int(os.environ.get("RANK", "0")) == 0


def default_eval_cases(cases: str) -> str:
    """The held-out split of a shipped-phantom source (``phantoms:SITE[/train]`` ->
    ``phantoms:SITE/test``); ``AgentError`` for other sources (they need ``--eval-cases``)."""
    from dosegym.data.sites import parse_phantom_ref

    base = cases.removesuffix("/train")
    parsed = parse_phantom_ref(base)
    if parsed is None or parsed[1] is not None:
        raise AgentError(
            f"--eval-cases is needed for --cases {cases!r}: only a shipped-phantom source "
            "('phantoms:SITE' or 'phantoms:SITE/train') has a default (its 'test' split)"
        )
    return f"{base}/test"


def case_refs(spec: str | list[str], option: str) -> list[str]:
    """The case references of a source (paths or ``phantoms:SITE/N`` ids); ``AgentError`` names ``option``."""
    from dosegym.envs.sources import CaseSource
    from dosegym.errors import DosegymError

    try:
        source = CaseSource(spec)
    except DosegymError as exc:
        raise AgentError(f"{option}: {exc}") from None
    return [source.key(i) for i in range(len(source))]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every (nested) key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(missing)"), new.get(k, "(missing)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened into TensorBoard's hyperparameter table (lists as text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(hparams(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def make_env(kind: str, num_envs: int, **kwargs: Any) -> Any:
    """The native vector env of ``kind`` (:data:`ENV_KINDS`) with ``num_envs`` episodes."""
    if kind not in ENV_KINDS:
        raise AgentError(f"the agent asks for an env of kind {kind!r}; valid kinds: {sorted(ENV_KINDS)}")
    module, name = ENV_KINDS[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    if kind == "denoise":
        from dosegym.envs.denoise import DenoiseConfig

        kwargs["obs_backend"] = "torch"
        if "pretrained_log_prob" in DenoiseConfig.__dataclass_fields__:
            kwargs["pretrained_log_prob"] = False  # one model forward per step when w_kl == 0
    return cls(num_envs=num_envs, **kwargs)


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


class Logger:
    """TensorBoard scalars (lazy import of ``SummaryWriter``) and the rich progress bar."""

    def __init__(self, out: Path, total: int, start: int, progress: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / TB_DIR), purge_step=start or None)
        self.bar = Progress(
            TextColumn("[bold]align"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("samples {task.fields[stats]}"),
            TimeRemainingColumn(),
            console=err_console,
            disable=not progress,
        )
        self.task = self.bar.add_task("align", total=total, completed=start, stats="")
        self.bar.start()

    def iteration(self, info: dict[str, Any]) -> None:
        step = int(info["samples"])
        for k, v in info.items():
            if k not in ("samples", "eval") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)
        stats = " ".join(f"{label} {_number(info.get(k))}" for k, label in BAR_FIELDS.items())
        self.bar.update(self.task, completed=step, stats=stats + " Gy")
        if isinstance(info.get("eval"), dict):
            self.evaluation(info["eval"], step)

    def evaluation(self, summary: dict[str, Any], step: int) -> None:
        for k, v in summary.items():
            if k == "pass_rate":
                for item, rate in v.items():
                    self.tb.add_scalar(f"eval/pass_rate/{item}", rate, step)
            elif isinstance(v, (int, float)) and math.isfinite(v) and k not in ("cases", "seeds"):
                self.tb.add_scalar(f"eval/{k}", v, step)

    def close(self, config: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> None:
        self.bar.stop()
        if config is not None and metrics is not None:
            self.tb.add_hparams(hparams(config), metrics, run_name="hparams")
        self.tb.close()


@friendly_errors
def align(
    agent: str = typer.Option(..., "--agent", help="Agent name (see dosegym.agents.available())."),
    samples: int = typer.Option(..., "--samples", min=1, help="Training budget in complete samples."),
    out: Path = typer.Option(..., "--out", help="Run folder: new, empty, or an earlier run (--resume)."),
    scorecard: str | None = typer.Option(
        None, "--scorecard", help="Built-in card name or card file (default: each site's built-in card)."
    ),
    cases: str = typer.Option(
        "phantoms:headneck/train", "--cases", help="Training cases (a case source, e.g. train-pats/)."
    ),
    eval_cases: str | None = typer.Option(
        None, "--eval-cases", help="Held-out cases (default for phantoms: the 'test' split of the site)."
    ),
    config: Path | None = typer.Option(None, "--config", help="Agent config YAML (fields of its config)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Overrides the config's seed."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Overrides sample_num_steps."),
    eval_every: int | None = typer.Option(
        None, "--eval-every", min=1, help="Overrides eval_every (iterations between evaluations)."
    ),
    num_envs: int | None = typer.Option(
        None, "--num-envs", min=1, help="Episodes stepped at once (default samples_per_iteration)."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:N, mps)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Model checkpoint folder to align (default: the shipped model)."
    ),
    eval_seeds: str = typer.Option("0", "--eval-seeds", help="Comma-separated seeds of the evaluation."),
    diversity_samples: int = typer.Option(
        4, "--diversity-samples", min=0, help="Samples per eval case for the diversity (0: none)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
    force: bool = typer.Option(False, "--force", help="Resume even when the config or options differ."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    keep_doses: int = typer.Option(
        KEEP_DOSES,
        "--keep-doses",
        min=-1,
        help="Eval cases whose doses are kept for `dosegym report` (-1: all).",
    ),
) -> None:
    """Align the model to a scorecard with an agent; evaluate before and after on held-out cases."""
    outcome = run_align(AlignOptions(**locals()))
    if outcome is None:
        return
    s0, s1 = outcome.before["summary"], outcome.after["summary"]
    mae = f", MAE {_number(s0['mae_gy'])} -> {_number(s1['mae_gy'])} Gy" if s1["mae_gy"] is not None else ""
    console.print(
        f"{agent}: {outcome.doc['samples_trained']} samples; eval score {s0['score_mean']:.3f} -> "
        f"{s1['score_mean']:.3f}{mae}; {outcome.path}",
        soft_wrap=True,
    )


@dataclass
class AlignOptions:
    """The options of one ``dosegym align`` run, as Python (the command's flags, same names)."""

    agent: str
    samples: int
    out: Path
    scorecard: str | None = None
    cases: str | list[str] = "phantoms:headneck/train"
    eval_cases: str | list[str] | None = None
    config: Path | None = None
    seed: int | None = None
    steps: int | None = None
    eval_every: int | None = None
    num_envs: int | None = None
    device: str = "cpu"
    checkpoint: Path | None = None
    eval_seeds: str = "0"
    diversity_samples: int = 4
    resume: bool = False
    force: bool = False
    progress: bool = True
    keep_doses: int = KEEP_DOSES
    #: Config fields set over the config file's (``dosegym demo``'s budget).
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlignOutcome:
    """What :func:`run_align` did: the result document and where it went, the evaluations
    before and after (``evaluate(...).to_dict()``), and the trained agent."""

    doc: dict[str, Any]
    path: Path
    before: dict[str, Any]
    after: dict[str, Any]
    learner: Any


def run_align(o: AlignOptions) -> AlignOutcome | None:
    """One ``dosegym align`` run into ``o.out`` (see the module docstring); None on the
    non-main processes of an ``accelerate launch``."""
    from dosegym.agents import registry
    from dosegym.agents.base import SHIPPED
    from dosegym.agents.evaluate import PolicyPredictor, evaluate
    from dosegym.agents.result import write_result
    from dosegym.data.atomic import atomic_folder, atomic_path, check_output_path, json_text
    from dosegym.diffusion.chain import check_num_steps
    from dosegym.diffusion.checkpoint import resolve_device
    from dosegym.diffusion.policy import load_pretrained
    from dosegym.report.saved import write_doses
    from dosegym.scorecards.registry import load_card

    agent, samples, out, scorecard, cases = o.agent, o.samples, Path(o.out), o.scorecard, o.cases
    config, checkpoint, resume, force = o.config, o.checkpoint, o.resume, o.force
    diversity_samples = o.diversity_samples
    started = time.perf_counter()
    main = is_main_process()  # the others neither check nor write --out: the main one's refusal stops them
    if main:
        check_output_path(out, writer=ALIGN_WRITER)  # before any work
    earlier = _read_json(out / RUN_FILE) if main else None
    if earlier is not None and not resume:
        raise AgentError(f"{out}: holds an earlier align run; continue it with --resume, or give a new --out")
    if main and resume and earlier is None:
        raise AgentError(f"{out}: no earlier align run to resume (no {RUN_FILE}); run without --resume")
    cls = registry.get(agent)
    cfg = cls.Config.from_yaml(config) if config is not None else cls.Config.coerce(None)
    if scorecard is not None:
        load_card(scorecard)  # an unknown card fails here, listing the built-in ones
    train_refs = case_refs(cases, "--cases")
    eval_refs = case_refs(o.eval_cases or default_eval_cases(cases), "--eval-cases")
    overrides: dict[str, Any] = {**o.overrides, "eval_cases": eval_refs}
    for key, value in (("seed", o.seed), ("sample_num_steps", o.steps), ("eval_every", o.eval_every)):
        if value is not None:
            overrides[key] = value
    cfg = cls.Config.coerce(cfg, **overrides)
    seeds = _seeds(o.eval_seeds)
    dev = resolve_device(o.device, "--device")
    b = o.num_envs or (cfg.samples_per_iteration // world_size() if cls.learns else 1)  # per process
    run = {
        "agent": agent,
        "config": cfg.to_dict(),
        "cases": train_refs,
        "eval_cases": eval_refs,
        "scorecard": scorecard,
        "checkpoint": str(checkpoint) if checkpoint else SHIPPED,
        "num_envs": b,
    }
    if earlier is not None:
        _check_resume(earlier, run, force)
    if main:
        with atomic_folder(out, ALIGN_WRITER) as tmp:
            (tmp / RUN_FILE).write_text(json_text(run), encoding="utf-8")

    policy = load_pretrained(checkpoint, device=dev, eta=cfg.sample_eta)
    check_num_steps(cfg.sample_num_steps, policy.model.config.diffusion, "--steps (sample_num_steps)")
    env = make_env(
        cls.env_kind,
        b,
        policy=policy,
        cases=train_refs,
        scorecard=scorecard,
        steps=cfg.sample_num_steps,
        reward=cfg.reward_config(),
        device=dev,
        allow_card_mismatch=cfg.allow_card_mismatch,
    )
    ckpt = out / CHECKPOINT_DIR
    base = str(checkpoint) if checkpoint else SHIPPED
    if resume and cls.learns and (ckpt / "agent.json").is_file():
        learner = cls.load(ckpt, env=env, policy=policy, resume=True)
        if force:
            learner.config = cfg
    else:
        import torch

        torch.manual_seed(cfg.seed)  # what trains starts the same for the same seed (LoRA init)
        learner = cls(env, policy, cfg, base_checkpoint=base)
    start_samples = int(learner.samples_trained)
    wall_before = float(learner.curves[-1]["wall_s"]) if getattr(learner, "curves", None) else 0.0

    eval_list = learner.eval_cases()
    before = _read_json(out / BEFORE_FILE) if resume and main else None
    if main and before is None:
        # an agent that trains nothing (Best-of-N) is compared with the pretrained policy's own sample
        baseline = (
            learner
            if cls.learns
            else PolicyPredictor(policy, scorecard, steps=cfg.sample_num_steps, eta=cfg.predict_eta)
        )
        evaluated = evaluate(
            baseline,
            eval_list,
            seeds,
            diversity_samples,
            o.progress,
            o.keep_doses,
            "predict + score (before)",
        )
        before = evaluated.to_dict()
        write_doses(out, "before", evaluated.doses, eval_list, eval_refs)
        with atomic_path(out / BEFORE_FILE) as tmp:
            tmp.write_text(json_text(before), encoding="utf-8")

    logger = Logger(out, samples, start_samples, o.progress) if main else None
    closed = False
    try:
        if logger is not None and before is not None and start_samples == 0:
            logger.evaluation(before["summary"], 0)

        def callback(a: Any, info: dict[str, Any]) -> None:
            if logger is None:
                return
            logger.iteration(info)
            if "eval" in info and a.learns:
                a.save(ckpt, training_state=True)

        remaining = samples - int(learner.samples_trained)  # learn() trains that many more
        if (
            learner.learns
            and remaining >= learner.samples_per_iteration
            or not learner.learns
            and remaining > 0
        ):
            if before is not None and not learner.eval_history:  # the "before" evaluation, once
                learner.eval_history.append(
                    {"iteration": 0, "samples": 0, "wall_s": 0.0, **before["summary"]}
                )
            learner.learn(remaining, callback=callback)
        if not main:
            return
        if learner.learns:
            learner.save(ckpt, training_state=True)
        evaluated = evaluate(
            learner, eval_list, seeds, diversity_samples, o.progress, o.keep_doses, "predict + score (after)"
        )
        after = evaluated.to_dict()
        write_doses(out, "after", evaluated.doses, eval_list, eval_refs)
        assert logger is not None and before is not None
        logger.evaluation(after["summary"], int(learner.samples_trained))
        s0, s1 = before["summary"], after["summary"]
        metrics = {"hparam/score_before": s0["score_mean"], "hparam/score_after": s1["score_mean"]}
        if s1["mae_gy"] is not None:
            metrics["hparam/mae_after_gy"] = s1["mae_gy"]
        logger.close(cfg.to_dict(), metrics)
        closed = True
    finally:
        if logger is not None and not closed:
            logger.close()
    doc = learner.result(
        wall_s=wall_before + time.perf_counter() - started,
        scorecard=scorecard,
        train_cases=train_refs,
        eval_cases=eval_refs,
        before=before,
        after=after,
    )
    path = write_result(out, doc)
    return AlignOutcome(doc=doc, path=path, before=before, after=after, learner=learner)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise AgentError(f"--eval-seeds {text!r}: give distinct integers >= 0, comma-separated, e.g. 0,1,2")
    return seeds


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AgentError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(doc, dict):
        raise AgentError(f"{path}: not a JSON object")
    return doc


def _check_resume(earlier: dict[str, Any], run: dict[str, Any], force: bool) -> None:
    """Refuse a resume whose config or run options differ from the run's, unless ``force``
    (never for the fields that fix what trains)."""
    old_cfg, new_cfg = earlier.get("config", {}), run["config"]
    fixed = [f for f in TRAINS_FIELDS if old_cfg.get(f) != new_cfg.get(f)]
    if fixed:
        raise AgentError(
            "--resume cannot change what trains: "
            + "; ".join(f"{f}: {old_cfg.get(f)!r} -> {new_cfg.get(f)!r}" for f in fixed)
        )
    diff = differences({k: earlier.get(k) for k in RUN_KEYS}, {k: run[k] for k in RUN_KEYS})
    diff += [f"config.{d}" for d in differences(old_cfg, new_cfg)]
    if diff and not force:
        raise AgentError(
            "--resume with a different config or options refused (pass --force to continue with the new "
            "ones): " + "; ".join(diff)
        )
