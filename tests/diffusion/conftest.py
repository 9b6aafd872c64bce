"""Shared fixtures of the diffusion tests: real OpenKBP patients and tiny models (16^3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared_data import PT_108, PT_196, REPO, TRAIN_PATS, need

from dosegym.diffusion.config import ModelConfig, PretrainConfig, UNetConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.slots import ModelSpec

TINY_YAML = REPO / "configs" / "pretrain_tiny.yaml"


def _need_openkbp() -> None:
    need(PT_108)


@pytest.fixture(scope="session")
def case():
    """Real OpenKBP patient pt_108 (128^3, dose, 9 structures, 3 prescriptions)."""
    _need_openkbp()
    from dosegym.data import read_case

    return read_case(PT_108)


@pytest.fixture(scope="session")
def case2():
    need(PT_108, PT_196)
    from dosegym.data import read_case

    return read_case(PT_196)


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0))


def tiny_config(spec: ModelSpec, **updates) -> ModelConfig:
    updates.setdefault("unet", UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4, attention_heads=2))
    return ModelConfig(spec=spec, **updates)


def randomise_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised weights (residual branches start as identity) random values, so
    that every input (timestep included) affects an untrained model's output, as in a
    trained one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture
def tiny_model(tiny_spec) -> Any2Any:
    torch.manual_seed(0)
    return randomise_zero_init(Any2Any(tiny_config(tiny_spec))).eval()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One preprocessed-case cache for the whole session."""
    return tmp_path_factory.mktemp("dosegym-cache")


def tiny_pretrain_config(cache: Path, **train) -> PretrainConfig:
    """configs/pretrain_tiny.yaml with the data path made absolute and a private cache."""
    _need_openkbp()
    cfg = PretrainConfig.from_yaml(TINY_YAML)
    data = cfg.data.model_copy(update={"openkbp_dir": str(TRAIN_PATS), "cache_dir": str(cache)})
    return cfg.model_copy(update={"data": data, "train": cfg.train.model_copy(update=train)})
