"""Pretraining of the Any2Any model (``dosegym pretrain``).

Data: the shipped phantoms' ``train`` split and/or OpenKBP ``train-pats`` (never
``validation-pats``). Every case is preprocessed once (:func:`dosegym.diffusion.slots.to_model`)
into a compact cache of model-grid tensors: one ``float16`` ``.npy`` per case (all slots
stacked on the channel axis, memory-mapped at training time) plus a JSON index, under
``<cache>/pretrain/<spec hash>/`` (``<cache>`` = ``data.cache_dir``, ``$DOSEGYM_CACHE`` or
``~/.cache/dosegym``). Reading OpenKBP CSVs each step would dominate the step time.

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
numbers of step ``s`` (batch, dropout,
timesteps, noise) come from generators seeded with ``(seed, process index, s)``, so a run
resumed from a checkpoint (weights, EMA, optimizer state, step, torch's global RNG state for
dropout) continues exactly as if it had not stopped.

Multi-device: the loop uses ``accelerate.Accelerator`` and runs unchanged under
``accelerate launch $(which dosegym) pretrain --config ...`` (GPUs; ``--mixed_precision bf16``
adds autocast) or ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N $(which dosegym)
pretrain ...`` (CPU processes). Each process draws its own batches; gradients are averaged
(DDP, unused parameters allowed: only the generated slot's head is used); the main process
writes logs and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dosegym.data.atomic import atomic_folder, atomic_path, check_output_path, json_text
from dosegym.data.case import Case
from dosegym.diffusion.checkpoint import (
    WEIGHTS_FILE,
    WRITER,
    config_differences,
    load_weights,
    read_checkpoint_config,
    save_checkpoint,
)
from dosegym.diffusion.config import PretrainConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.schedulers import make_scheduler
from dosegym.diffusion.slots import ModelInput, ModelSpec, Role, collate, to_model
from dosegym.errors import DosegymError, ModelError

CACHE_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
DATA_RECORD = "data.json"  # the exact training cases of a run (usable as data.cases_file)
RUN_WRITER = "dosegym pretrain run"  # the writer name in the run folder's output marker


# --------------------------------------------------------------------------------------
# Data: sources and the preprocessed cache
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceCase:
    """A training case not yet read: a unique file-safe ``key`` and how to load it."""

    key: str
    label: str
    load: Callable[[], Case]
    stamp: str


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_mtime_ns}-{st.st_size}"


def openkbp_train_folders(path: str | Path) -> list[Path]:
    """Patient folders of OpenKBP ``train-pats`` under ``path`` (a root holding
    ``train-pats/`` or the ``train-pats`` folder itself), sorted by patient number."""
    from dosegym.data.openkbp import is_openkbp_folder

    root = Path(path).expanduser()
    if (root / "train-pats").is_dir():
        root = root / "train-pats"
    if "validation" in root.name or "test" in root.name:
        raise ModelError(
            f"{root}: pretraining reads OpenKBP train-pats only, never validation or test patients"
        )
    if not root.is_dir():
        raise ModelError(
            f"{root}: no such folder (expected an OpenKBP root with train-pats/ or train-pats itself)"
        )
    folders = [p for p in root.iterdir() if is_openkbp_folder(p)]
    if not folders:
        raise ModelError(f"{root}: no OpenKBP patient folders (pt_N/ with voxel_dimensions.csv) inside")

    def number(p: Path) -> tuple[int, str]:
        m = re.search(r"(\d+)$", p.name)
        return (int(m.group(1)) if m else 1 << 30, p.name)

    return sorted(folders, key=number)


def training_sources(cfg: PretrainConfig) -> list[SourceCase]:
    """Every training case the data config names, phantoms first, capped at ``max_cases``."""
    from dosegym.data import read_case

    data = cfg.data
    out: list[SourceCase] = []
    if data.phantoms:
        from dosegym.data import phantoms

        try:
            sites = data.phantom_sites or phantoms.SITES
            ids = [i for site in sites for i in phantoms.shipped_phantom_ids(site, split="train")]
        except DosegymError as exc:
            raise ModelError(
                f"data.phantoms: the shipped phantom set is not usable ({exc}); "
                "set data.phantoms: false and give data.openkbp_dir"
            ) from exc
        for pid in ids:
            site, index = pid.split(":", 1)[1].split("/")
            out.append(
                SourceCase(
                    _safe(pid),
                    pid,
                    lambda s=site, i=int(index): phantoms.load_shipped_phantom(s, i),
                    _stamp(phantoms.shipped_phantom_dir() / "manifest.json"),
                )
            )
    if data.openkbp_dir:
        for folder in openkbp_train_folders(data.openkbp_dir):
            out.append(
                SourceCase(
                    _safe(f"openkbp_{folder.name}"),
                    f"openkbp:train-pats/{folder.name}",
                    lambda f=folder: read_case(f),
                    _stamp(folder / "dose.csv"),
                )
            )
    if not out:
        raise ModelError(
            "no training data: set data.phantoms: true and/or data.openkbp_dir (or --openkbp DIR)"
        )
    if data.cases_file:
        out = _only_listed(out, data.cases_file)
    return out[: data.max_cases] if data.max_cases else out


def read_case_list(path: str | Path) -> list[str]:
    """Case labels from a JSON list, or from the ``cases`` / ``data.cases`` of a run record."""
    p = Path(path).expanduser()
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"data.cases_file {p}: cannot read it as JSON ({exc})") from exc
    if isinstance(doc, dict):
        data = doc.get("data")
        doc = doc.get("cases", data.get("cases") if isinstance(data, dict) else None)
    if not isinstance(doc, list) or not doc or not all(isinstance(c, str) for c in doc):
        raise ModelError(
            f"data.cases_file {p}: expected a non-empty JSON list of case labels (or an object "
            "with 'cases' or 'data.cases'), e.g. [\"phantoms:headneck/3\", \"openkbp:train-pats/pt_1\"]"
        )
    return doc


def _only_listed(sources: list[SourceCase], cases_file: str) -> list[SourceCase]:
    wanted = read_case_list(cases_file)
    by_label = {s.label: s for s in sources}
    missing = [c for c in wanted if c not in by_label]
    if missing:
        raise ModelError(
            f"data.cases_file {cases_file}: {len(missing)} listed case(s) are not among the configured "
            f"sources (data.phantoms / data.openkbp_dir), e.g. {missing[:3]}"
        )
    return [by_label[c] for c in dict.fromkeys(wanted)]


def cache_root(cfg: PretrainConfig) -> Path:
    """The cache folder for this spec (see module docstring)."""
    base = cfg.data.cache_dir or os.environ.get("DOSEGYM_CACHE") or Path.home() / ".cache" / "dosegym"
    key = json.dumps({"v": CACHE_VERSION, "spec": cfg.model.spec.model_dump(mode="json")}, sort_keys=True)
    return Path(base).expanduser() / "pretrain" / hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case: ``array`` file (float16, slots stacked) and ``slots`` offsets."""

    key: str
    label: str
    array: Path
    slots: dict[str, tuple[int, int]]
    rx_max_gy: float

    def model_input(self, spec: ModelSpec) -> ModelInput:
        arr = np.load(self.array, mmap_mode="r")
        tensors = {
            s: torch.from_numpy(np.asarray(arr[o : o + n], dtype=np.float32))
            for s, (o, n) in self.slots.items()
            if s in spec.slots
        }
        roles: dict[str, Role] = {
            s: "generate" if s == spec.generate else ("condition" if s in tensors else "absent")
            for s in spec.slots
        }
        return ModelInput(tensors, roles, torch.tensor(self.rx_max_gy), False, {}, (self.key,))


def build_cache(cfg: PretrainConfig, sources: list[SourceCase], progress: bool = True) -> list[CachedCase]:
    """Preprocess every source once (atomic files); cases without the generate slot are skipped."""
    from tqdm.auto import tqdm

    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    spec = cfg.model.spec
    out: list[CachedCase] = []
    skipped: list[str] = []
    for src in tqdm(sources, desc="preprocess", disable=not progress, leave=False):
        meta_path = root / f"{src.key}.json"
        arr_path = root / f"{src.key}.npy"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is None or meta.get("stamp") != src.stamp or not arr_path.is_file():
            case = src.load()
            mi, _ = to_model(case, spec)
            slots, chunks, offset = {}, [], 0
            for s in spec.slots:
                if s in mi.tensors:
                    slots[s] = (offset, int(mi.tensors[s].shape[0]))
                    chunks.append(mi.tensors[s].numpy())
                    offset += slots[s][1]
            with atomic_path(arr_path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.concatenate(chunks).astype(np.float16))
            meta = {
                "stamp": src.stamp,
                "source": src.label,
                "slots": slots,
                "rx_max_gy": float(mi.rx_max_gy),
            }
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json_text(meta, indent=None))
        slots = {s: (int(o), int(n)) for s, (o, n) in meta["slots"].items()}
        if spec.generate not in slots:
            skipped.append(src.label)
            continue
        out.append(CachedCase(src.key, src.label, arr_path, slots, float(meta["rx_max_gy"])))
    if not out:
        raise ModelError(f"no training case has the generate slot {spec.generate!r} (skipped: {skipped[:5]})")
    return out


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
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
    step: int
    loss: float
    checkpoint: Path
    seconds: float
    num_cases: int
    main_process: bool = True


def _batch(cases: list[CachedCase], spec: ModelSpec, rng: np.random.Generator, size: int) -> ModelInput:
    idx = rng.integers(0, len(cases), size=size)
    return collate([cases[int(i)].model_input(spec) for i in idx])


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run (or resume) pretraining; checkpoints go to ``out_dir/checkpoint``, TensorBoard logs
    to ``out_dir/tb``. ``until``: stop after this step (a later ``resume`` continues).

    ``out_dir`` must be new, empty or a run folder this function wrote (see
    :mod:`dosegym.data.atomic`); that is checked before any work.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    tc, spec = cfg.train, cfg.model.spec
    check_output_path(out, writer=RUN_WRITER)
    if resume and not (ckpt_dir / "train" / "state.pt").is_file():
        raise ModelError(f"--resume: no training checkpoint to resume in {ckpt_dir}")
    if not resume and ckpt_dir.exists():
        raise ModelError(f"{ckpt_dir} exists; pass --resume to continue that run or choose another --out")
    if until is not None and until < 1:
        raise ModelError(f"until must be >= 1, got {until}")

    if resume:
        check_output_path(ckpt_dir, writer=WRITER)
        found, doc = read_checkpoint_config(ckpt_dir)
        expected = cfg.model
        if expected.backbone == "wan" and expected.wan is not None and expected.wan.pretrained_dir:
            expected = expected.model_copy(update={"wan": found.wan})
        diff = config_differences(found, expected)
        if diff:
            raise ModelError(
                f"--resume: {ckpt_dir} was trained with another model config: " + "; ".join(diff)
            )

    # Heads of the slots not generated, and encoders of slots absent or dropped in a batch,
    # get no gradient: DDP must look for unused parameters.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    with accelerator.main_process_first():
        cases = build_cache(cfg, training_sources(cfg), progress=progress and main)

    start = 0
    state = None
    if resume:
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
    model_config = model.config
    ema = EMA(model, tc.ema_decay)
    if state is not None:
        ema_model = Any2Any(model_config)
        load_weights(ema_model, ckpt_dir / WEIGHTS_FILE)
        ema.shadow = {k: v.detach().clone() for k, v in ema_model.state_dict().items()}
        del ema_model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    noise_sched = make_scheduler("ddpm", model_config.diffusion)
    gen_slot = spec.generate
    n_slots = len(spec.slots)
    cond_slots = torch.tensor([s != gen_slot for s in spec.slots])
    objective = model_config.objective
    if main:
        with atomic_folder(out, RUN_WRITER) as tmp:
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            record = {"count": len(cases), "cases": [c.label for c in cases]}
            (tmp / DATA_RECORD).write_text(json_text(record, indent=1))
    writer = SummaryWriter(str(out / "tb")) if main else None
    stop = min(tc.steps, until) if until is not None else tc.steps

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if not main:
            return
        raw = accelerator.unwrap_model(model).state_dict()
        save_checkpoint(
            ckpt_dir,
            model_config,
            ema.shadow,
            step,
            {
                "raw": raw,
                "config_yaml": cfg.to_yaml(),
                "state": {
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                },
            },
        )

    t0 = time.perf_counter()
    loss_value = float("nan")
    last_saved = start if resume else None
    bar = tqdm(
        total=stop,
        initial=start,
        desc="pretrain",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    model.train()
    for step in range(start, stop):
        t_step = time.perf_counter()
        rng = np.random.default_rng([tc.seed, accelerator.process_index, step])
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        batch = _batch(cases, spec, rng, tc.batch_size).to(device)
        drop = torch.from_numpy(rng.random((tc.batch_size, n_slots)) < tc.modality_dropout) & cond_slots
        x0 = batch.tensors[gen_slot]
        if objective == "diffusion":
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (tc.batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = t.to(device)
            x_t = noise_sched.add_noise(x0, noise, t)
            pt = model_config.diffusion.prediction_type
            target = {"epsilon": noise, "sample": x0}.get(pt)
            if target is None:
                target = noise_sched.get_velocity(x0, noise, t)
            pred = model(x_t, t, batch, drop.to(device))
            distance = F.l1_loss if tc.diffusion_loss == "l1" else F.mse_loss
            loss = distance(pred.float(), target.float())
        else:
            pred = model(None, torch.zeros(tc.batch_size, device=device), batch, drop.to(device))
            loss = F.l1_loss(pred.float(), x0.float())
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
            save(done)
            last_saved = done
    bar.close()
    if writer is not None:
        writer.close()
    return TrainResult(stop, loss_value, ckpt_dir, time.perf_counter() - t0, len(cases), main)
