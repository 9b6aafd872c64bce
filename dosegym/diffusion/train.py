"""Pretraining of the Any2Any model (``dosegym pretrain``).

Data: the cases ``cfg.data`` names, or those given as ``sources`` (the seam for callers that
bring their own: a carried cache, ``Case`` objects in memory); sources, the preprocessed
cache and in-memory cases live in :mod:`dosegym.diffusion.train_data`.

Objective ``diffusion``: uniform timesteps, ``x_t = sqrt(ab) x0 + sqrt(1-ab) eps``, MSE (or
L1, ``train.diffusion_loss``) to the target of ``prediction_type`` (eps, v or x0). Objective
``regression``: the same network with no noisy input and t = 0, L1 to x0 (the deterministic
baseline). Modality dropout: each condition slot of each sample is made ``absent`` with
probability ``modality_dropout``.

Optimisation: AdamW; learning rate with linear warmup then cosine decay to
``min_lr_ratio * lr``; gradient-norm clipping; EMA of the weights (decay warmed up as
``min(decay, (1 + step) / (10 + step))``); the EMA weights are what a checkpoint's
``model.safetensors`` holds.

Reproducibility and exact resume: the initial weights come from ``train.seed``; the random
numbers of step ``s`` (batch, dropout, timesteps, noise) come from generators seeded with
``(seed, process index, s)``, so a run resumed from a checkpoint (weights, EMA, optimizer
state, step, torch's global RNG state for dropout) continues exactly as if it had not stopped.

Multi-device: the loop uses ``accelerate.Accelerator`` and runs unchanged under
``accelerate launch $(which dosegym) pretrain --config ...`` (GPUs; ``--mixed_precision bf16``
adds autocast) or ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N $(which dosegym)
pretrain ...`` (CPU processes). Each process draws its own batches; gradients are averaged
(DDP, unused parameters allowed: only the generated slot's head is used); the main process
writes logs and checkpoints.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dosegym.data.atomic import atomic_folder, check_output_path, json_text
from dosegym.diffusion.checkpoint import (
    WEIGHTS_FILE,
    WRITER,
    config_differences,
    load_weights,
    read_checkpoint_config,
    save_checkpoint,
)
from dosegym.diffusion.config import ModelConfig, PretrainConfig, TrainConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.schedulers import make_scheduler
from dosegym.diffusion.slots import ModelInput, ModelSpec, collate
from dosegym.diffusion.train_data import Source, TrainingCase, training_cases, training_sources
from dosegym.errors import ModelError

CHECKPOINT_DIR = "checkpoint"
DATA_RECORD = "data.json"  # the exact training cases of a run (usable as data.cases_file)
RUN_WRITER = "dosegym pretrain run"  # the writer name in the run folder's output marker


class EMA:
    """Exponential moving average of a model's floating-point state (see module docstring)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Multiplier of ``train.lr`` at ``step`` (0-based): linear warmup, then cosine."""
    tc = cfg.train
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What a run did: last step, its loss, the checkpoint folder, seconds, cases and whether
    this process is the main one (the one that wrote)."""

    step: int
    loss: float
    checkpoint: Path
    seconds: float
    num_cases: int
    main_process: bool = True


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    *,
    sources: Sequence[Source] | None = None,
) -> TrainResult:
    """Run (or resume) pretraining; checkpoints go to ``out_dir/checkpoint``, TensorBoard logs
    to ``out_dir/tb``. ``until``: stop after this step (a later ``resume`` continues).

    ``sources``: the training data, by default the cases ``cfg.data`` names; else source
    cases, ``Case`` objects or ready training cases (see :func:`training_cases`). A resumed
    run must get the same data to continue exactly. ``out_dir`` must be new, empty or a run
    folder this function wrote (see :mod:`dosegym.data.atomic`); that is checked before any work.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    _check_run_folder(out, ckpt_dir, resume, until)
    resumed = _resumed_checkpoint(cfg, ckpt_dir) if resume else None
    # Heads of the slots not generated, and encoders of slots absent or dropped in a batch,
    # get no gradient: DDP must look for unused parameters.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    with accelerator.main_process_first():
        cases = training_cases(cfg, sources, progress=progress and accelerator.is_main_process)
    model, ema, optimizer, start = _initial_state(cfg, ckpt_dir, resumed)
    if accelerator.is_main_process:
        with atomic_folder(out, RUN_WRITER) as tmp:
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            record = {"count": len(cases), "cases": [c.label for c in cases]}
            (tmp / DATA_RECORD).write_text(json_text(record, indent=1))
    stop = min(cfg.train.steps, until) if until is not None else cfg.train.steps
    loss, seconds = _train_steps(cfg, out, accelerator, model, ema, optimizer, cases, start, stop, progress)
    return TrainResult(stop, loss, ckpt_dir, seconds, len(cases), accelerator.is_main_process)


def _check_run_folder(out: Path, ckpt_dir: Path, resume: bool, until: int | None) -> None:
    """The run folder may be written, and holds a checkpoint exactly when resuming."""
    check_output_path(out, writer=RUN_WRITER)
    if resume and not (ckpt_dir / "train" / "state.pt").is_file():
        raise ModelError(f"--resume: no training checkpoint to resume in {ckpt_dir}")
    if not resume and ckpt_dir.exists():
        raise ModelError(f"{ckpt_dir} exists; pass --resume to continue that run or choose another --out")
    if until is not None and until < 1:
        raise ModelError(f"until must be >= 1, got {until}")


def _resumed_checkpoint(cfg: PretrainConfig, ckpt_dir: Path) -> tuple[ModelConfig, dict]:
    """The model config and record of the checkpoint to resume; it must match ``cfg.model``."""
    check_output_path(ckpt_dir, writer=WRITER)
    found, doc = read_checkpoint_config(ckpt_dir)
    expected = cfg.model
    if expected.backbone == "wan" and expected.wan is not None and expected.wan.pretrained_dir:
        expected = expected.model_copy(update={"wan": found.wan})
    diff = config_differences(found, expected)
    if diff:
        raise ModelError(f"--resume: {ckpt_dir} was trained with another model config: " + "; ".join(diff))
    return found, doc


def _initial_state(
    cfg: PretrainConfig, ckpt_dir: Path, resumed: tuple[ModelConfig, dict] | None
) -> tuple[Any2Any, EMA, torch.optim.Optimizer, int]:
    """Model, EMA, optimizer and first step: fresh (weights seeded by ``train.seed``) or, when
    resuming, as the checkpoint left them (torch's global RNG state included)."""
    tc = cfg.train
    state = None
    start = 0
    if resumed is not None:
        found, doc = resumed
        model = Any2Any(found)
        load_weights(model, ckpt_dir / "train" / "raw.safetensors")
        state_file = ckpt_dir / "train" / "state.pt"
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise ModelError(f"{state_file}: cannot read the training state ({exc}); it is damaged") from exc
        start = int(doc["step"])
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global state
            torch.manual_seed(tc.seed)
            model = Any2Any(cfg.model)
    ema = EMA(model, tc.ema_decay)
    if state is not None:
        ema_model = Any2Any(model.config)
        load_weights(ema_model, ckpt_dir / WEIGHTS_FILE)
        ema.shadow = {k: v.detach().clone() for k, v in ema_model.state_dict().items()}
        del ema_model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    return model, ema, optimizer, start


def _batch(cases: list[TrainingCase], spec: ModelSpec, rng: np.random.Generator, size: int) -> ModelInput:
    idx = rng.integers(0, len(cases), size=size)
    return collate([cases[int(i)].model_input(spec) for i in idx])


def _loss(
    model: torch.nn.Module,
    config: ModelConfig,
    noise_sched,
    batch: ModelInput,
    drop: torch.Tensor,
    gen: torch.Generator,
    tc: TrainConfig,
) -> torch.Tensor:
    """The objective on one batch (see module docstring); ``drop``: (B, slots) dropped conditions."""
    device = drop.device
    x0 = batch.tensors[config.spec.generate]
    if config.objective == "regression":
        pred = model(None, torch.zeros(tc.batch_size, device=device), batch, drop)
        return F.l1_loss(pred.float(), x0.float())
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (tc.batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = t.to(device)
    x_t = noise_sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0}.get(config.diffusion.prediction_type)
    if target is None:
        target = noise_sched.get_velocity(x0, noise, t)
    pred = model(x_t, t, batch, drop)
    distance = F.l1_loss if tc.diffusion_loss == "l1" else F.mse_loss
    return distance(pred.float(), target.float())


def _train_steps(
    cfg: PretrainConfig,
    out: Path,
    accelerator,
    model: Any2Any,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    cases: list[TrainingCase],
    start: int,
    stop: int,
    progress: bool,
) -> tuple[float, float]:
    """Steps ``start`` .. ``stop - 1``: log, checkpoint every ``checkpoint_every`` steps and at
    ``stop``; a non-finite loss or gradient stops with ``ModelError``. Returns the last loss
    and the seconds the steps took."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    tc, spec = cfg.train, cfg.model.spec
    ckpt_dir = out / CHECKPOINT_DIR
    main = accelerator.is_main_process
    model_config = model.config
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    noise_sched = make_scheduler("ddpm", model_config.diffusion)
    cond_slots = torch.tensor([s != spec.generate for s in spec.slots])
    writer = SummaryWriter(str(out / "tb")) if main else None
    t0 = time.perf_counter()
    loss_value = float("nan")
    last_saved = start if start > 0 else None
    bar = tqdm(
        total=stop, initial=start, desc="pretrain", disable=not (progress and main), dynamic_ncols=True
    )
    model.train()
    for step in range(start, stop):
        t_step = time.perf_counter()
        rng = np.random.default_rng([tc.seed, accelerator.process_index, step])
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        batch = _batch(cases, spec, rng, tc.batch_size).to(device)
        drop = (
            torch.from_numpy(rng.random((tc.batch_size, len(spec.slots))) < tc.modality_dropout) & cond_slots
        )
        loss = _loss(model, model_config, noise_sched, batch, drop.to(device), gen, tc)
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * lr_factor(step, cfg)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        loss_value = float(accelerator.reduce(loss.detach(), "mean"))
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            kept = (
                f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
                if last_saved is not None
                else "no checkpoint had been written yet"
            )
            bar.close()
            raise ModelError(
                f"training stopped at step {step + 1}: loss {loss_value} / gradient norm {float(grad_norm)} "
                f"is not finite; {kept}. Lower train.lr or check the data"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(model), step)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if writer is not None and (done % tc.log_every == 0 or done == stop):
            writer.add_scalar("train/loss", loss_value, done)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], done)
            writer.add_scalar("train/grad_norm", float(grad_norm), done)
            writer.add_scalar("train/sec_per_step", time.perf_counter() - t_step, done)
        if done % tc.checkpoint_every == 0 or done == stop:
            _save(cfg, ckpt_dir, accelerator, model, model_config, ema, optimizer, done)
            last_saved = done
    bar.close()
    if writer is not None:
        writer.close()
    return loss_value, time.perf_counter() - t0


def _save(
    cfg: PretrainConfig,
    ckpt_dir: Path,
    accelerator,
    model: torch.nn.Module,
    model_config: ModelConfig,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> None:
    """Checkpoint after ``step`` (main process): EMA weights, raw weights, optimizer and RNG state."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "step": step}
    raw = accelerator.unwrap_model(model).state_dict()
    save_checkpoint(
        ckpt_dir, model_config, ema.shadow, step, {"raw": raw, "config_yaml": cfg.to_yaml(), "state": state}
    )


__all__ = [
    "CHECKPOINT_DIR",
    "DATA_RECORD",
    "EMA",
    "RUN_WRITER",
    "TrainResult",
    "lr_factor",
    "pretrain",
    "training_sources",  # re-exported: the cases ``pretrain`` trains on by default
]
