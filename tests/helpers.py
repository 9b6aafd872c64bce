"""Helpers shared by test folders (import with ``from helpers import ...``; ``tests/`` is on
``sys.path`` through the root conftest): the tiny model config, a small vector env, user folders."""

from __future__ import annotations

from pathlib import Path

import gymnasium

from dosegym.diffusion import DosePolicy, ModelConfig, ModelSpec, UNetConfig


def tiny_policy_config() -> ModelConfig:
    """A 16^3 model grid and a 4-channel U-Net: the tiny model of the env and agent tests."""
    spec = ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0))
    unet = UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2, attention_heads=1)
    return ModelConfig(spec=spec, unet=unet)


def user_folder(path: Path) -> Path:
    """A folder of the user's own files (what the old writers deleted)."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "plan.dcm").write_bytes(b"\0" * 10)
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative posix path -> bytes)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def make_env(policy: DosePolicy, scorecard: str = "phantom_headneck", **kw):
    """A DenoiseDose vector env of 2 episodes on ``phantoms:headneck/28`` (nothing is reset)."""
    kw.setdefault("cases", "phantoms:headneck/28")
    return gymnasium.make_vec(
        "dosegym/DenoiseDose-v0",
        num_envs=2,
        vectorization_mode="vector_entry_point",
        policy=policy,
        scorecard=scorecard,
        steps=4,
        **kw,
    )
