"""Training the native-resolution refiner (:mod:`dosegym.diffusion.refiner`) of a checkpoint.

The refiner learns super-resolution of the model grid's dose: each training case's
**reference** dose is put on the checkpoint's model grid (``to_model``) and upsampled back
(the reference round trip, the coarse input the refiner sees), and the target is the
reference dose itself on the case grid. Only the checkpoint's model grid (its ``spec``) is
used, never its weights: the refiner is trained once per grid and serves every model on it.

A step draws ``batch_size`` patches of ``patch_vox`` case voxels (z, y, x) from cases drawn
uniformly, each inside its case's crop (the body's bounding box plus the refiner's
``margin_vox``) and holding body voxels, mirrored left-right with probability 1/2
(``flip_lr``; the OAR groups are not lateral, so no channel swaps); optionally the coarse
input perturbed (off by default: measured, it stops the learning, see docs/decisions.md): a
gain ``1 + U(-coarse_gain, coarse_gain)`` and a smooth additive field of std ``coarse_noise``
(normalised dose; a random field on a grid 8 times coarser, trilinearly upsampled); the CT
is blanked with probability ``ct_dropout`` (cases without a CT).
The loss is the L1 distance to the reference (normalised dose) over body voxels. AdamW,
linear warmup then cosine. Every draw comes from ``(seed, step)``, so a resumed run
continues exactly.

Run folder ``OUT``: ``OUT/refiner/`` (a refiner folder: copy it into a checkpoint folder as
``refiner/`` to use it), ``OUT/train_state.pt`` (optimizer, step, loss curve),
``OUT/config.yaml`` and ``OUT/data.json`` (the training cases). Both are written atomically
every ``checkpoint_every`` steps and at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field

from dosegym.data.atomic import atomic_folder, atomic_path, json_text
from dosegym.data.case import Case
from dosegym.diffusion.checkpoint import read_checkpoint_config
from dosegym.diffusion.config import DataConfig, parse_config
from dosegym.diffusion.refiner import (
    REFINER_DIR,
    Refiner,
    RefinerConfig,
    RefinerInputs,
    load_refiner,
    save_refiner,
)
from dosegym.diffusion.slots import ModelSpec, to_model
from dosegym.diffusion.train_data import SourceCase, training_sources
from dosegym.errors import DosegymError, ModelError

STATE_FILE = "train_state.pt"
RUN_WRITER = "dosegym refiner run"


class RefinerTrainConfig(BaseModel):
    """A refiner training run (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    refiner: RefinerConfig = RefinerConfig()
    """The network."""
    data: DataConfig = DataConfig()
    """The training cases (as pretraining names them; OpenKBP train-pats only)."""
    steps: int = Field(3000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(4, ge=1)
    """Patches per step."""
    patch_vox: tuple[int, int, int] = (24, 48, 48)
    """Patch size in case voxels (z, y, x); cropped to a case's crop where that is smaller."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(200, ge=0)
    """Linear warmup steps, then cosine to ``min_lr_ratio * lr``."""
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    """The learning rate at the last step, as a share of ``lr``."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient norm clip."""
    coarse_noise: float = Field(0.0, ge=0)
    """Std of a smooth additive perturbation of the coarse input (normalised dose; 0: none)."""
    coarse_gain: float = Field(0.0, ge=0, lt=1)
    """Half-width of a random gain of the coarse input (0: none)."""
    flip_lr: bool = True
    """Mirror patches left-right (x) with probability 1/2."""
    ct_dropout: float = Field(0.1, ge=0, lt=1)
    """Probability that a patch's CT channel is blanked (0, as for a case without CT)."""
    checkpoint_every: int = Field(200, ge=1)
    """Steps between checkpoints."""
    log_every: int = Field(20, ge=1)
    """Steps between progress-bar updates of the loss."""
    seed: int = Field(0, ge=0)
    """Seed of every draw."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> RefinerTrainConfig:
        """Read and validate a YAML config; errors name the file and the field."""
        p = Path(path)
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise ModelError(f"{p}: cannot read config ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ModelError(f"{p}: not valid YAML ({exc})") from exc
        return parse_config(cls, doc, str(p))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


@dataclass(frozen=True)
class RefinerExample:
    """One training case in memory, cropped: its inputs, the coarse round trip and the
    reference (normalised dose, float16)."""

    label: str
    inputs: RefinerInputs
    coarse: np.ndarray
    target: np.ndarray


def make_example(case: Case, spec: ModelSpec, config: RefinerConfig, label: str) -> RefinerExample:
    """The example of ``case``: ``ModelError`` without a reference dose or a prescription."""
    if case.dose is None or case.max_prescription_gy is None:
        raise ModelError(f"{label}: the refiner trains on cases with a reference dose and a prescription")
    mi, res = to_model(case, spec)
    inputs = RefinerInputs.of(case, config)
    coarse = res.to_case(mi.tensors["dose"][0], "linear").clamp_min(0.0).numpy()
    target = case.dose / np.float32(case.max_prescription_gy)
    crop = inputs.crop
    return RefinerExample(label, inputs, coarse[crop].astype(np.float16), target[crop].astype(np.float16))


def lr_factor(step: int, cfg: RefinerTrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def draw_batch(
    examples: Sequence[RefinerExample], cfg: RefinerTrainConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The patches of ``step``: inputs ``(B, C, z, y, x)``, target ``(B, 1, z, y, x)`` and body
    mask ``(B, 1, z, y, x)``, drawn from ``(seed, step)`` (see the module docstring). Patches
    of one batch share the smallest size among their cases' crops."""
    rng = np.random.default_rng([cfg.seed, step])
    picks = [examples[int(i)] for i in rng.integers(len(examples), size=cfg.batch_size)]
    size = np.min([np.minimum(cfg.patch_vox, e.inputs.shape) for e in picks], axis=0)
    xs, ys, ms = [], [], []
    for ex in picks:
        body = ex.inputs.masks[0]
        for _ in range(20):  # a window with body voxels (nearly always the first)
            lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(ex.inputs.shape, size, strict=True)]
            window = tuple(slice(a, a + int(s)) for a, s in zip(lo, size, strict=True))
            if body[window].any():
                break
        coarse = torch.from_numpy(ex.coarse[window].astype(np.float32))[None]
        gain = 1.0 + float(rng.uniform(-cfg.coarse_gain, cfg.coarse_gain))
        coarse = coarse * gain + _smooth_noise(rng, tuple(int(s) for s in size), cfg.coarse_noise)
        x = ex.inputs.stack(coarse.clamp_min(0.0), cfg.refiner, window)[0]
        if rng.random() < cfg.ct_dropout:
            x[-4] = 0.0  # the CT channel (before the 3 spacing channels)
        y = torch.from_numpy(ex.target[window].astype(np.float32))[None]
        m = torch.from_numpy(body[window].astype(np.float32))[None]
        if cfg.flip_lr and rng.random() < 0.5:
            x, y, m = (t.flip(-1) for t in (x, y, m))
        xs.append(x)
        ys.append(y)
        ms.append(m)
    return torch.stack(xs), torch.stack(ys), torch.stack(ms)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int, int], std: float) -> torch.Tensor:
    """A smooth random field ``(1, z, y, x)`` of roughly ``std``: Gaussian values on a grid 8
    times coarser (at least 2 per axis), trilinearly upsampled."""
    if std == 0:
        return torch.zeros(1, *size)
    low = [max(2, math.ceil(s / 8) + 1) for s in size]
    field = torch.from_numpy(rng.normal(0.0, std, size=low).astype(np.float32))[None, None]
    return F.interpolate(field, size=size, mode="trilinear", align_corners=True)[0]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over ``mask`` voxels (normalised dose)."""
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class RefinerTrainResult:
    """What a run did: the last step, the mean loss of its last ``log_every`` steps, the
    refiner folder, the seconds it trained and the number of cases."""

    step: int
    loss: float
    refiner_dir: Path
    seconds: float
    num_cases: int


def load_examples(
    cfg: RefinerTrainConfig,
    spec: ModelSpec,
    sources: Sequence[SourceCase] | None = None,
    progress: bool = True,
) -> list[RefinerExample]:
    """Every training case of ``cfg.data`` (or ``sources``) as an example; a case without a
    reference dose raises ``ModelError`` naming it."""
    from tqdm.auto import tqdm

    items = training_sources(cfg.data) if sources is None else list(sources)
    out = []
    for src in tqdm(items, desc="refiner cases", unit="case", disable=not progress, leave=False):
        try:
            case = src.load()
        except DosegymError as exc:
            raise ModelError(f"training case {src.label}: {exc}") from exc
        out.append(make_example(case, spec, cfg.refiner, src.label))
    return out


def train_refiner(
    cfg: RefinerTrainConfig,
    checkpoint: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    *,
    examples: Sequence[RefinerExample] | None = None,
) -> RefinerTrainResult:
    """Train (or resume) the refiner for ``checkpoint``'s model grid into ``out_dir`` (see the
    module docstring). ``until``: stop after this step (a later ``resume`` continues);
    ``examples``: the training data (default: ``cfg.data``'s cases). A resumed run refuses a
    different config; ``out_dir`` must be new, empty or a refiner run folder."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    spec = read_checkpoint_config(checkpoint)[0].spec
    state_file = out / STATE_FILE
    if resume:
        if not state_file.is_file():
            raise ModelError(f"{out}: --resume, but there is no {STATE_FILE} to continue from")
        saved = RefinerTrainConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
        if saved != cfg:
            diff = [k for k in type(cfg).model_fields if getattr(saved, k) != getattr(cfg, k)]
            raise ModelError(
                f"{out}: --resume with a different config (fields {diff}); use the run's config.yaml"
            )
    elif state_file.exists():
        raise ModelError(
            f"{out}: holds a refiner run already; continue it with --resume or choose a new --out"
        )
    torch.manual_seed(cfg.seed)
    examples = list(examples) if examples is not None else load_examples(cfg, spec, progress=progress)
    if not examples:
        raise ModelError("the refiner has no training cases")
    refiner = Refiner(cfg.refiner)
    opt = torch.optim.AdamW(refiner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, curve = 0, []
    if resume:
        state = torch.load(state_file, weights_only=True)
        refiner.load_state_dict(load_refiner(out / REFINER_DIR).state_dict())
        refiner.requires_grad_(True)
        opt.load_state_dict(state["optimizer"])
        start, curve = int(state["step"]), [list(map(float, c)) for c in state["curve"]]
    labels = [e.label for e in examples]
    with atomic_folder(out, RUN_WRITER) as tmp:
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        (tmp / "data.json").write_text(json_text({"count": len(labels), "cases": labels}, indent=1))
    stop = min(cfg.steps, until) if until is not None else cfg.steps
    refiner.train()
    t0, recent = time.perf_counter(), []
    bar = tqdm(
        range(start, stop), desc="refiner", unit="step", disable=not progress, initial=start, total=stop
    )
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        x, y, m = draw_batch(examples, cfg, step)
        loss = masked_l1(refiner(x), y, m)
        if not torch.isfinite(loss):
            raise ModelError(
                f"refiner step {step + 1}: the loss is {float(loss)}; the last checkpoint is kept"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(refiner.parameters(), cfg.grad_clip)
        opt.step()
        recent.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == stop:
            curve.append([step + 1, float(np.mean(recent[-cfg.log_every :]))])
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop:
            _save(out, refiner, opt, step + 1, curve, cfg, spec, len(labels))
    bar.close()
    seconds = time.perf_counter() - t0
    last = float(np.mean(recent[-cfg.log_every :])) if recent else (curve[-1][1] if curve else math.nan)
    return RefinerTrainResult(stop, last, out / REFINER_DIR, seconds, len(examples))


def _save(
    out: Path,
    refiner: Refiner,
    opt: torch.optim.Optimizer,
    step: int,
    curve: list[list[float]],
    cfg: RefinerTrainConfig,
    spec: ModelSpec,
    num_cases: int,
) -> None:
    """The refiner folder, then the training state (a resume reads both at one step)."""
    record: dict[str, Any] = {
        "step": step,
        "steps": cfg.steps,
        "num_cases": num_cases,
        "model_spec": spec.model_dump(mode="json"),
        "loss": curve[-1][1] if curve else None,
    }
    save_refiner(out / REFINER_DIR, refiner, record)
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save({"step": step, "optimizer": opt.state_dict(), "curve": curve}, tmp)
