"""Helpers shared by test folders (import with ``from helpers import ...``; ``tests/`` is on
``sys.path`` through the root conftest): the tiny model configs and policies, a small vector
env, user folders. Test modules import from here, never from a ``conftest`` (several folders
have one, and which ``conftest`` a bare import finds depends on what pytest collected first)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import gymnasium
import torch
from shared_data import PT_108, REPO, TRAIN_PATS, need

from dosegym.diffusion import Any2Any, DosePolicy, ModelConfig, ModelSpec, PretrainConfig, UNetConfig

TINY_YAML = REPO / "configs" / "pretrain_tiny.yaml"


def tiny_policy_config() -> ModelConfig:
    """A 16^3 model grid and a 4-channel U-Net: the tiny model of the env and agent tests."""
    spec = ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0))
    unet = UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2, attention_heads=1)
    return ModelConfig(spec=spec, unet=unet)


def tiny_config(spec: ModelSpec, **updates) -> ModelConfig:
    """The diffusion tests' tiny U-Net (8 base channels) on ``spec``."""
    updates.setdefault("unet", UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4, attention_heads=2))
    return ModelConfig(spec=spec, **updates)


def tiny_policy_with(prediction_type: str) -> DosePolicy:
    """A tiny random policy predicting ``prediction_type`` with the shipped recipe's noise
    schedule (configs/pretrain_shipped.yaml: cosine schedule, SNR shift)."""
    shipped = PretrainConfig.from_yaml(REPO / "configs" / "pretrain_shipped.yaml").model.diffusion
    cfg = tiny_policy_config().model_copy(
        update={"diffusion": shipped.model_copy(update={"prediction_type": prediction_type})}
    )
    torch.manual_seed(0)
    return DosePolicy(Any2Any(cfg), sampler="ddim", eta=1.0)


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


def tiny_pretrain_config(cache: Path, **train) -> PretrainConfig:
    """configs/pretrain_tiny.yaml with the data path made absolute and a private cache."""
    need(PT_108)
    cfg = PretrainConfig.from_yaml(TINY_YAML)
    data = cfg.data.model_copy(update={"openkbp_dir": str(TRAIN_PATS), "cache_dir": str(cache)})
    return cfg.model_copy(update={"data": data, "train": cfg.train.model_copy(update=train)})


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


#: The Bandit agents' reward in tests: the dense score and the fidelity to the reference plan.
BANDIT_REWARD = {"score": "dense", "w_fid": 1.0, "fidelity": "reference"}


def make_bandit(policy: DosePolicy, num_envs: int = 2, cases: str = "phantoms:headneck/28", **reward):
    """A ScorecardBandit vector env of ``num_envs`` episodes (DRaFT's and DiffusionNFT's)."""
    return gymnasium.make_vec(
        "dosegym/ScorecardBandit-v0",
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        policy=policy,
        scorecard="phantom_headneck",
        cases=cases,
        steps=3,
        reward={**BANDIT_REWARD, **reward},
    )


def save_tiny_checkpoint(folder: Path) -> Path:
    """A model checkpoint of the tiny policy's random weights (seed 0) at ``folder``."""
    from dosegym.diffusion.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = tiny_policy_config()
    return save_checkpoint(folder, config, Any2Any(config).state_dict())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch(script: Path, *args: str, processes: int = 2, timeout: float = 300):
    """``script args`` on ``processes`` CPU processes under ``accelerate launch``
    (``ACCELERATE_USE_CPU=yes ... --multi_gpu``: accelerate's ``--cpu`` alone runs one
    process), the repository on ``PYTHONPATH``; the ``CompletedProcess`` (text output)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "ACCELERATE_USE_CPU": "yes"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
