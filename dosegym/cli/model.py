"""``dosegym pretrain``, ``dosegym train-refiner`` and ``dosegym predict``: train the Any2Any dose
model and its native-resolution refiner, predict a dose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from dosegym.cli._common import console, friendly_errors
from dosegym.errors import ModelError

PREDICT_WRITER = "dosegym predict"  # the writer name in a prediction folder's output marker


@friendly_errors
def pretrain(
    config: Path = typer.Option(
        ..., "--config", help="Pretraining YAML (e.g. configs/pretrain_shipped.yaml, the shipped recipe)."
    ),
    openkbp: Path | None = typer.Option(
        None,
        "--openkbp",
        help="OpenKBP root (with train-pats/) or its train-pats folder; overrides data.openkbp_dir.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out exactly where its checkpoint stopped."
    ),
    out: Path = typer.Option(
        Path("runs/pretrain"),
        "--out",
        help="Run folder: checkpoint/, tb/ (TensorBoard), config.yaml; new, empty, or an earlier run's.",
    ),
    cache: Path | None = typer.Option(
        None,
        "--cache",
        help="Cache folder for preprocessed cases (default $DOSEGYM_CACHE or ~/.cache/dosegym).",
    ),
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="'diffusion' (default) or 'regression' (deterministic L1 baseline).",
    ),
    until: int | None = typer.Option(
        None, "--until", help="Stop after this step (resume later with --resume)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Pretrain the Any2Any dose diffusion model (works under `accelerate launch` too)."""
    from dosegym.diffusion.config import PretrainConfig
    from dosegym.diffusion.train import pretrain as run

    cfg = PretrainConfig.from_yaml(config)
    data_updates: dict = {}
    if openkbp is not None:
        data_updates["openkbp_dir"] = str(openkbp)
    if cache is not None:
        data_updates["cache_dir"] = str(cache)
    if data_updates:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=data_updates)})
    if objective is not None:
        if objective not in ("diffusion", "regression"):
            raise ModelError(f"--objective {objective!r} is invalid; valid: diffusion, regression")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"objective": objective})})
    result = run(cfg, out, resume=resume, until=until, progress=progress)
    if not result.main_process:
        return
    console.print(
        f"step {result.step}/{cfg.train.steps} on {result.num_cases} cases, loss {result.loss:.4f}, "
        f"{result.seconds:.1f} s; checkpoint {result.checkpoint}"
    )


@friendly_errors
def train_refiner(
    config: Path | None = typer.Option(
        None, "--config", help="Refiner training YAML (configs/refiner/shipped.yaml: the shipped recipe)."
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="Model checkpoint whose grid the refiner serves (default: the shipped one).",
    ),
    openkbp: Path | None = typer.Option(
        None,
        "--openkbp",
        help="OpenKBP root (with train-pats/) or its train-pats folder; overrides data.openkbp_dir.",
    ),
    out: Path = typer.Option(
        Path("runs/refiner"),
        "--out",
        help="Run folder: refiner/ (copy it into a checkpoint as refiner/), train_state.pt, config.yaml.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out exactly where it stopped."
    ),
    until: int | None = typer.Option(
        None, "--until", help="Stop after this step (resume later with --resume)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: torch's)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train the native-resolution refiner that decodes a checkpoint's coarse dose onto the case grid."""
    import torch

    from dosegym.diffusion.policy import shipped_checkpoint_dir
    from dosegym.diffusion.refiner_train import RefinerTrainConfig
    from dosegym.diffusion.refiner_train import train_refiner as run

    cfg = RefinerTrainConfig.from_yaml(config) if config is not None else RefinerTrainConfig()
    if openkbp is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"openkbp_dir": str(openkbp)})})
    if threads is not None:
        torch.set_num_threads(threads)
    result = run(
        cfg, checkpoint or shipped_checkpoint_dir(), out, resume=resume, until=until, progress=progress
    )
    console.print(
        f"step {result.step}/{cfg.steps} on {result.num_cases} cases, loss {result.loss:.4f}, "
        f"{result.seconds:.1f} s; refiner {result.refiner_dir} (copy it into the checkpoint as refiner/)"
    )


def _write_volume(array: np.ndarray, grid, path: Path) -> None:
    from dosegym.data.nifti import write_image

    write_image(np.asarray(array, dtype=np.float32), grid, path)


@friendly_errors
def predict(
    case: str = typer.Option(
        ..., "--case", help="Any supported case (OpenKBP, NIfTI folder, DICOM folder, phantom, GDP-HMM .npz)."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Checkpoint folder (default: the shipped model)."
    ),
    steps: int = typer.Option(20, "--steps", min=1, help="Sampling steps (1 .. the model's timesteps)."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddim, ddpm or dpm_solver."),
    eta: float = typer.Option(0.0, "--eta", min=0.0, help="DDIM eta (0 = deterministic)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise: 0 .. 2**64 - 1."),
    samples: int = typer.Option(
        1, "--samples", min=1, help="Number of samples; K > 1 also writes their voxel-wise std."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder (default prediction_<case id>): new, empty, or an earlier prediction folder.",
    ),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:N, mps)."),
    trusted: bool = typer.Option(False, "--trusted", help="Allow unpickling (GDP-HMM .npz cases)."),
    prescriptions: Path | None = typer.Option(
        None, "--prescriptions", help="GDP-HMM PTV_DICT.json with the prescriptions."
    ),
) -> None:
    """Predict a dose (Gy) on the case's own grid: NIfTI, plus RTDOSE for DICOM input."""
    from dosegym.data import read_case
    from dosegym.data.atomic import atomic_folder, check_output_path, json_text
    from dosegym.data.io import detect_format
    from dosegym.diffusion.chain import SEED_MAX, check_num_steps
    from dosegym.diffusion.checkpoint import resolve_device
    from dosegym.diffusion.policy import load_pretrained
    from dosegym.diffusion.schedulers import SAMPLERS

    if out is not None:  # every option is checked before the case is read or a model loaded
        check_output_path(out, writer=PREDICT_WRITER)
    if sampler not in SAMPLERS:
        raise ModelError(f"--sampler {sampler!r} is unknown; valid: {', '.join(SAMPLERS)}")
    if not 0 <= seed <= SEED_MAX:
        raise ModelError(f"--seed must be an integer in [0, 2**64 - 1], got {seed}")
    dev = resolve_device(device, "--device")
    fmt = detect_format(case)
    kwargs = {"trusted": trusted, "prescriptions_json": prescriptions} if fmt == "gdphmm" else {}
    c = read_case(case, **kwargs)
    dest = check_output_path(out or Path(f"prediction_{c.case_id}"), writer=PREDICT_WRITER)
    policy = load_pretrained(checkpoint, device=dev)
    check_num_steps(steps, policy.model.config.diffusion, "--steps")
    dose = policy.predict(c, steps=steps, sampler=sampler, seed=seed, samples=samples, eta=eta)
    stack = dose[None] if samples == 1 else dose
    mean = stack.mean(axis=0)
    files = ["dose.nii.gz"]
    with atomic_folder(dest, PREDICT_WRITER) as tmp:
        _write_volume(mean, c.grid, tmp / "dose.nii.gz")
        if samples > 1:
            for k in range(samples):
                _write_volume(stack[k], c.grid, tmp / f"dose_sample_{k:02d}.nii.gz")
                files.append(f"dose_sample_{k:02d}.nii.gz")
            _write_volume(stack.std(axis=0), c.grid, tmp / "dose_std.nii.gz")
            files.append("dose_std.nii.gz")
        if fmt == "dicom":
            from dosegym.data.dicom import write_rtdose

            write_rtdose(mean, c, tmp / "rtdose.dcm")
            files.append("rtdose.dcm")
        doc = {
            "case": str(case),
            "case_id": c.case_id,
            "checkpoint": str(checkpoint) if checkpoint else "shipped",
            "sampler": sampler,
            "steps": steps,
            "eta": eta,
            "seed": seed,
            "samples": samples,
            "grid": c.grid.to_dict(),
            "dose_max_gy": float(mean.max()),
            "files": files,
        }
        (tmp / "prediction.json").write_text(json_text(doc))
    console.print(
        f"{c.case_id}: dose max {float(mean.max()):.2f} Gy -> {dest} ({', '.join(files)})", soft_wrap=True
    )
