"""What the benchmark scripts share: the model they time and the case they time it on."""

from __future__ import annotations

from pathlib import Path

import torch
from data_paths import PT_108

from dosegym.diffusion import Any2Any, DosePolicy, PretrainConfig, load_pretrained
from dosegym.diffusion.policy import shipped_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]


def build_policy(config: Path, device: str, random: bool = False) -> tuple[DosePolicy, str]:
    """The shipped checkpoint when there is one (and not ``random``), else random weights
    (seed 0) built from ``config`` (``configs/pretrain_tiny.yaml`` when it does not exist),
    DDIM eta 1; and the model's description."""
    if not random and (shipped_checkpoint_dir() / "config.json").is_file():
        return load_pretrained(device=device), "shipped checkpoint"
    if not config.is_file():
        config = ROOT / "configs" / "pretrain_tiny.yaml"
    cfg = PretrainConfig.from_yaml(config)
    torch.manual_seed(0)
    model = Any2Any(cfg.model)
    where = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    name = f"random weights from {where} ({model.num_parameters():,} parameters)"
    return DosePolicy(model, sampler="ddim", eta=1.0, device=device), name


def the_case():
    """OpenKBP ``pt_108`` from ``../shared/data`` when present, else a generated
    head-and-neck phantom; and its description."""
    if PT_108.is_dir():
        from dosegym.data import read_case

        return read_case(PT_108), "OpenKBP pt_108"
    from dosegym.data.phantoms import generate_anatomy

    return generate_anatomy("headneck", index=0, seed=0), "generated head-and-neck phantom"
