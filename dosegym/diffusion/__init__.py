"""The Any2Any 3D dose diffusion model: slots, backbones, samplers, the policy, training.

Entry points: :func:`load_pretrained` -> :class:`DosePolicy` (the policy contract of
DESIGN.md), :func:`to_model` (``Case`` -> model-grid tensors + ``Resampler``), :class:`Any2Any`
(the network), :func:`reverse_step` (the Gaussian reverse step with its log-probability),
:class:`ReverseChain` (B chains in lockstep: per-sample generators, log-probs, x̂0),
:func:`dosegym.diffusion.train.pretrain` (training).
"""

from dosegym.diffusion.chain import ReverseChain, seeded_generator
from dosegym.diffusion.config import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    PretrainConfig,
    TrainConfig,
    UNetConfig,
    WanConfig,
)
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.policy import DosePolicy, load_pretrained
from dosegym.diffusion.schedulers import ReverseStepOutput, make_scheduler, reverse_step
from dosegym.diffusion.slots import (
    OAR_GROUPS,
    SLOTS,
    ModelInput,
    ModelSpec,
    Resampler,
    collate,
    make_resampler,
    to_model,
)

__all__ = [
    "OAR_GROUPS",
    "SLOTS",
    "Any2Any",
    "DataConfig",
    "DiffusionConfig",
    "DosePolicy",
    "ModelConfig",
    "ModelInput",
    "ModelSpec",
    "PretrainConfig",
    "Resampler",
    "ReverseChain",
    "ReverseStepOutput",
    "TrainConfig",
    "UNetConfig",
    "WanConfig",
    "collate",
    "load_pretrained",
    "make_resampler",
    "make_scheduler",
    "reverse_step",
    "seeded_generator",
    "to_model",
]
