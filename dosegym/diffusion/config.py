"""Pydantic configs of the Any2Any model and its training; every config round-trips YAML.

``PretrainConfig`` = ``model`` (:class:`ModelConfig`: slots/grid, backbone, diffusion,
objective) + ``data`` (:class:`DataConfig`) + ``train`` (:class:`TrainConfig`). A checkpoint
stores the ``ModelConfig`` (JSON) beside its weights.

The field defaults are generic starting points, not a measured recipe (a checkpoint stores
every field, so they never change a trained model). The recipe is a file:
``configs/pretrain_shipped.yaml``, the run that produced the shipped checkpoint, is the base
of the other configs, which state only how they differ from it (``base:``, see
:meth:`PretrainConfig.from_yaml`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from dosegym.diffusion.slots import ModelSpec
from dosegym.errors import ModelError


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UNetConfig(_Config):
    """A small 3D U-Net: ``len(channel_mult)`` levels of ``num_res_blocks`` residual blocks,
    ``base_channels * mult`` channels each, stride-2 convolutions between levels.

    ``patch`` > 1 makes the slot encoders patch embeddings (kernel = stride = patch) so the
    U-Net runs on a grid ``patch`` times coarser (and the heads unpatchify).
    """

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    mid_attention: bool = True
    attention_heads: int = 4
    groups: int = 8
    patch: tuple[int, int, int] = (1, 1, 1)
    dropout: float = 0.0

    @field_validator("channel_mult")
    @classmethod
    def _mult(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {v}")
        return v

    @model_validator(mode="after")
    def _groups(self) -> UNetConfig:
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % self.groups]
        if self.base_channels < 1 or bad:
            raise ValueError(
                f"channels {bad or self.base_channels} are not divisible by groups={self.groups}"
            )
        if min(self.patch) < 1:
            raise ValueError(f"patch must be >= 1 on every axis, got {self.patch}")
        return self


class WanConfig(_Config):
    """The video-prior backbone: a diffusers ``WanTransformer3DModel`` with z as the frame axis.

    ``pretrained_dir``: a local diffusers folder (the transformer's own folder with
    ``config.json``, or a pipeline folder with ``transformer/``), loaded with no network.
    ``architecture``: the transformer's init arguments; filled from the pretrained folder
    when one is given, and what a checkpoint rebuilds the network from.
    ``patch_size``: the (z, y, x) patch of our slot encoders and heads, default the
    architecture's. The pretrained patch embedding is replaced anyway, so a larger patch
    costs no pretrained weight and cuts the tokens: 48 x 64 x 64 is 49152 tokens at
    (1, 2, 2) and 6144 at (2, 4, 4).
    """

    pretrained_dir: str | None = None
    architecture: dict[str, Any] | None = None
    patch_size: tuple[int, int, int] | None = None
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one(self) -> WanConfig:
        if self.pretrained_dir is None and self.architecture is None:
            raise ValueError("wan needs pretrained_dir (a local diffusers folder) or architecture")
        return self


class DiffusionConfig(_Config):
    """The forward process shared by training and every sampler (diffusers scheduler names).

    Defaults: 1000 steps, cosine (``squaredcos_cap_v2``) betas, v-prediction. v-prediction
    stays well-posed at the last, almost pure-noise, timestep of the cosine schedule, where
    epsilon-prediction divides by ``sqrt(alpha_bar) ~ 0``.

    ``snr_shift``: the resolution shift of "simple diffusion" (Hoogeboom et al. 2023) and of
    SD3/Wan's ``shift``: the schedule's log-SNR at every timestep is lowered by
    ``2 ln(snr_shift)`` (``alpha_bar' = sigmoid(logit(alpha_bar) - 2 ln snr_shift)``). A dose
    volume is smooth and large (48 x 64 x 64 voxels), so noise of a given SNR is far easier
    to average away than on the 64 x 64 images the cosine schedule was tuned on: unshifted,
    most training steps are spent on trivial denoising and the high-noise steps that map
    the conditions to a dose stay undertrained. 1.0 = the unshifted ``beta_schedule``.
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    snr_shift: float = 1.0

    @field_validator("snr_shift")
    @classmethod
    def _shift(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"snr_shift must be a positive number (1.0 = no shift), got {v}")
        return v


class ModelConfig(_Config):
    """Everything needed to rebuild the network: slots/grid, backbone, diffusion, objective.

    ``objective``: ``diffusion`` (denoiser) or ``regression`` (the deterministic baseline:
    one forward pass predicts the generate slot, trained with L1).
    """

    spec: ModelSpec = ModelSpec()
    backbone: Literal["unet", "wan"] = "unet"
    unet: UNetConfig = UNetConfig()
    wan: WanConfig | None = None
    diffusion: DiffusionConfig = DiffusionConfig()
    objective: Literal["diffusion", "regression"] = "diffusion"

    @model_validator(mode="after")
    def _wan(self) -> ModelConfig:
        if self.backbone == "wan" and self.wan is None:
            raise ValueError("backbone 'wan' needs a 'wan' section (pretrained_dir or architecture)")
        return self


class DataConfig(_Config):
    """Training data: the shipped phantoms' train split and/or OpenKBP ``train-pats``.

    ``openkbp_dir``: an OpenKBP root (with ``train-pats/``) or the ``train-pats`` folder
    itself; ``validation-pats`` is never read. ``cache_dir``: where preprocessed model-grid
    tensors go (default ``$DOSEGYM_CACHE`` or ``~/.cache/dosegym``, then ``pretrain/``).
    ``cases_file``: train on exactly the cases listed there (a JSON list of case labels such
    as ``phantoms:headneck/3`` and ``openkbp:train-pats/pt_1``, or the ``data.json`` /
    ``training.json`` of an earlier run), e.g. to retrain on the data a checkpoint saw;
    every listed case must be among the sources above.
    """

    phantoms: bool = True
    phantom_sites: tuple[str, ...] | None = None
    openkbp_dir: str | None = None
    max_cases: int | None = None
    cache_dir: str | None = None
    cases_file: str | None = None


class TrainConfig(_Config):
    """Optimisation: AdamW, cosine LR with linear warmup, EMA, gradient clipping.

    ``diffusion_loss``: the distance between the network output and the target of
    ``prediction_type`` (noise, v or x0), ``mse`` (the score-matching loss) or ``l1`` (as
    Palette; with ``prediction_type: sample`` it is the regression baseline's L1 on the
    dose at every noise level). The ``regression`` objective always uses L1.
    """

    steps: int = 20000
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    modality_dropout: float = 0.15
    diffusion_loss: Literal["mse", "l1"] = "mse"
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0

    @model_validator(mode="after")
    def _positive(self) -> TrainConfig:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.modality_dropout < 1:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        return self


class PretrainConfig(_Config):
    """A whole pretraining run (see module docstring)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PretrainConfig:
        """Read and validate a YAML config; errors name the file and the field.

        A top-level ``base: OTHER.yaml`` (a path relative to this file) reads that config
        first, then applies this file's keys over it: mappings merge key by key, any other
        value (a list too) replaces the base's, ``null`` sets ``None``. A base may have a
        base. ``to_yaml`` writes the resolved config, without ``base``.
        """
        p = Path(path)
        return parse_config(cls, _resolved_yaml(p, ()), str(p))


def _resolved_yaml(path: Path, seen: tuple[Path, ...]) -> Any:
    """The document of ``path`` with its ``base`` chain applied (see ``PretrainConfig.from_yaml``)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read config ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML ({exc})") from exc
    doc = doc or {}
    if not isinstance(doc, dict) or "base" not in doc:
        return doc
    base = doc.pop("base")
    if not isinstance(base, str) or not base:
        raise ModelError(f"{path}: base must be the path of another YAML config, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        chain = " -> ".join(str(s) for s in (*seen, path.resolve(), base_path.resolve()))
        raise ModelError(f"{path}: base {base!r} makes a circle ({chain}); a base cannot include itself")
    return _merged(_resolved_yaml(base_path, (*seen, path.resolve())), doc)


def _merged(base: Any, over: dict) -> dict:
    """``over`` applied to ``base``: mappings merge key by key, other values replace."""
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def parse_config(cls: type[BaseModel], doc: Any, where: str) -> Any:
    """Validate ``doc`` as ``cls``; a ``ModelError`` lists each bad field as ``a.b.c: why``."""
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ModelError(f"{where}: invalid {cls.__name__}: " + "; ".join(lines)) from exc
