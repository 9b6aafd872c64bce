"""What trains: LoRA adapters (peft) on a copy of the policy's denoiser, or all its weights.

:func:`trainable_policy` copies ``policy.model`` (the given policy is never changed, so its
frozen reference stays ``policy.reference()``) and either injects LoRA adapters with
``peft.inject_adapter_in_model`` into its ``Conv3d`` and ``Linear`` layers (``train="lora"``;
only the adapters require grad, the copy stays an ``Any2Any``) or leaves every weight
trainable (``train="full"``). :func:`save_trainable` writes only what trains:

* LoRA: ``adapter.safetensors`` (peft's adapter state dict) + ``adapter.json`` (format
  version, rank, alpha, target modules);
* full: ``weights.safetensors`` (the whole state dict) + ``weights.json``.

:func:`load_trainable` puts them back on a fresh copy of the base model (the shipped or
any other checkpoint the run was trained from).

Rollouts and predictions sample from :class:`MergedCopy`: a plain copy of the LoRA denoiser
with ``W + scale * B A`` folded into each adapted layer (:func:`lora_delta`), the same
outputs to float rounding at the base model's cost (peft's unmerged layers run two more
convolutions per Conv3d: +50 % per forward of the shipped model on this CPU). The trained model
is never merged in place (merge then unmerge would drift its base weights by rounding).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dosegym.data.atomic import json_text
from dosegym.diffusion import DosePolicy
from dosegym.errors import AgentError

FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FULL_WEIGHTS = "weights.safetensors"
FULL_CONFIG = "weights.json"
ADAPTER_NAME = "default"
#: Layer types that get adapters by default (peft >= 0.14 supports Conv3d).
LORA_LAYER_TYPES = (nn.Conv3d, nn.Linear)


def lora_target_names(model: nn.Module) -> list[str]:
    """Full names of every ``Conv3d`` and ``Linear`` layer of ``model`` (the default targets)."""
    return [name for name, mod in model.named_modules() if name and isinstance(mod, LORA_LAYER_TYPES)]


def _check_targets(model: nn.Module, targets: list[str]) -> list[str]:
    layers = dict(model.named_modules())
    bad = [t for t in targets if not isinstance(layers.get(t), LORA_LAYER_TYPES)]
    if bad:
        raise AgentError(
            f"lora_targets {bad} are not Conv3d/Linear layers of the denoiser; "
            f"valid: {lora_target_names(model)}"
        )
    if not targets:
        raise AgentError(f"lora_targets is empty; valid: {lora_target_names(model)} (or 'auto')")
    return list(targets)


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | str = "auto") -> list[str]:
    """Inject LoRA adapters into ``model`` in place; freeze everything else. Returns the targets."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_target_names(model) if targets == "auto" else _check_targets(model, list(targets))
    cfg = LoraConfig(
        r=int(rank), lora_alpha=float(alpha), target_modules=names, lora_dropout=0.0, bias="none"
    )
    model.requires_grad_(False)
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return names


def trainable_policy(
    policy: DosePolicy, train: str, rank: int = 8, alpha: float = 8.0, targets: Any = "auto"
):
    """A new :class:`DosePolicy` on a copy of ``policy.model`` with what trains set up (see the
    module docstring); returns ``(policy, info)``, ``info`` the JSON description of what trains."""
    model = copy.deepcopy(policy.model)
    if train == "full":
        model.requires_grad_(True)
        info: dict[str, Any] = {"train": "full"}
    elif train == "lora":
        names = inject_lora(model, rank, alpha, targets)
        info = {"train": "lora", "rank": int(rank), "alpha": float(alpha), "target_modules": names}
    else:
        raise AgentError(f"train {train!r} is unknown; valid: ['lora', 'full']")
    out = DosePolicy(
        model, sampler=policy.sampler, eta=policy.eta, device=policy.device, refiner=policy.refiner
    )
    info["trainable_parameters"] = sum(p.numel() for p in trainable_parameters(model))
    return out, info


class MergedCopy:
    """A plain (adapter-free) copy of the LoRA denoiser ``model`` for sampling; :meth:`sync`
    folds the adapters' current weights into it (call it after every update, before sampling).
    The copy never requires grad and stays in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.source = model
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        if not self.layers:
            raise AgentError("MergedCopy: the model has no LoRA layers")
        plain = copy.deepcopy(model)
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, copy.deepcopy(layer.base_layer))
        self.model = plain.eval().requires_grad_(False)
        self.sync()

    @torch.no_grad()
    def sync(self) -> nn.Module:
        """Fold the adapters' weights into the copy; the copy."""
        for name, layer in self.layers.items():
            self.model.get_submodule(name).weight.copy_(layer.base_layer.weight + lora_delta(layer))
        return self.model


def lora_delta(layer: nn.Module) -> torch.Tensor:
    """``scale * B A`` of a peft LoRA ``Linear`` or ``Conv3d`` layer in the shape of its base
    weight (``A``: ``(r, in)`` or ``(r, in, kz, ky, kx)``; ``B``: ``(out, r)`` or
    ``(out, r, 1, 1, 1)``). Not peft's ``get_delta_weight``: peft 0.21's squeezes a 1x1x1
    Conv3d's factors into the wrong shape."""
    a = layer.lora_A[ADAPTER_NAME].weight
    b = layer.lora_B[ADAPTER_NAME].weight
    base = layer.base_layer
    if getattr(base, "groups", 1) != 1 or b.shape[2:].numel() != 1:
        raise AgentError(f"MergedCopy: cannot fold a LoRA layer over {base} (grouped or spatial B)")
    flat = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
    return flat.reshape(base.weight.shape) * layer.scaling[ADAPTER_NAME]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (the adapters in LoRA mode)."""
    return [p for p in model.parameters() if p.requires_grad]


def trained_state(model: nn.Module, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What trains, as a state dict: the adapters (LoRA) or every weight (full)."""
    if info["train"] == "lora":
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    else:
        state = model.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_trainable(folder: Path, model: nn.Module, info: dict[str, Any]) -> list[str]:
    """Write what trains into ``folder`` (a temporary folder of an atomic write); the file names."""
    from safetensors.torch import save_file

    weights, config = (
        (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if info["train"] == "lora" else (FULL_WEIGHTS, FULL_CONFIG)
    )
    save_file(trained_state(model, info), str(folder / weights))
    (folder / config).write_text(json_text({"format_version": FORMAT_VERSION, **info}))
    return [weights, config]


def read_trainable_info(folder: Path) -> dict[str, Any]:
    """The JSON description of what trains in a saved agent folder."""
    for name in (ADAPTER_CONFIG, FULL_CONFIG):
        path = folder / name
        if path.is_file():
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise AgentError(f"{path}: unreadable ({exc})") from exc
            if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
                raise AgentError(f"{path}: format_version must be {FORMAT_VERSION}")
            return info
    raise AgentError(f"{folder}: holds no {ADAPTER_CONFIG} or {FULL_CONFIG}: not a saved agent")


def load_trainable(folder: Path, base: DosePolicy) -> tuple[DosePolicy, dict[str, Any]]:
    """A trainable copy of ``base`` with the weights saved in ``folder`` loaded onto it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_trainable_info(folder)
    if info.get("train") == "lora":
        policy, _ = trainable_policy(base, "lora", info["rank"], info["alpha"], info["target_modules"])
        file = folder / ADAPTER_WEIGHTS
    else:
        policy, _ = trainable_policy(base, "full")
        file = folder / FULL_WEIGHTS
    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise AgentError(f"{file}: cannot read the trained weights ({exc})") from exc
    if info["train"] == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, state, adapter_name=ADAPTER_NAME)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise AgentError(
                f"{file}: adapters do not fit the base model (missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]})"
            )
    else:
        try:
            policy.model.load_state_dict(state)
        except RuntimeError as exc:
            raise AgentError(f"{file}: weights do not fit the base model ({exc})") from exc
        policy = DosePolicy(
            policy.model, sampler=base.sampler, eta=base.eta, device=base.device, refiner=base.refiner
        )
    info.pop("format_version", None)
    return policy.to(base.device), info
