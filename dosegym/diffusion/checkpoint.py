"""Checkpoints: a folder with safetensors weights and a JSON config with a format version.

Layout (a folder output, see :mod:`dosegym.data.atomic`: written to a temporary folder and
moved into place; a later save replaces only the files an earlier one wrote)::

    DIR/config.json          {"format": "dosegym-any2any", "format_version": 1,
                              "model": ModelConfig, "step": N, "dosegym_version": ...}
    DIR/model.safetensors    the weights to use (the EMA weights of a training run)
    DIR/train/raw.safetensors   training only: the raw (non-EMA) weights
    DIR/train/state.pt          training only: optimizer, LR schedule, step, RNG state
    DIR/train/config.yaml       training only: the whole PretrainConfig

Loading checks the format name and version, then that the stored weights match the network
the config describes (names and shapes), and says what differs when they do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dosegym._version import __version__
from dosegym.data.atomic import atomic_folder, json_text
from dosegym.diffusion.config import ModelConfig, parse_config
from dosegym.errors import ModelError

FORMAT_NAME = "dosegym-any2any"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WRITER = "dosegym checkpoint"  # the writer name in the output marker (see dosegym.data.atomic)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """Fields that differ, as ``field: checkpoint X vs expected Y``."""
    a, b = _flatten(found.model_dump(mode="json")), _flatten(expected.model_dump(mode="json"))
    return [
        f"{k}: checkpoint {a.get(k, '(missing)')!r} vs expected {b.get(k, '(missing)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def save_checkpoint(
    path: str | Path,
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    step: int = 0,
    train_files: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see module docstring).

    ``train_files``: optional ``raw`` (state dict), ``state`` (dict for ``torch.save``) and
    ``config_yaml`` (text) written under ``train/``.
    """
    dest = Path(path)
    with atomic_folder(dest, WRITER) as tmp:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dosegym_version": __version__,
            "step": int(step),
            "model": config.model_dump(mode="json"),
        }
        (tmp / CONFIG_FILE).write_text(json_text(doc))
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
        if train_files:
            (tmp / "train").mkdir()
            if "raw" in train_files:
                raw = {k: v.detach().contiguous().cpu() for k, v in train_files["raw"].items()}
                save_file(raw, str(tmp / "train" / "raw.safetensors"))
            if "state" in train_files:
                torch.save(train_files["state"], tmp / "train" / "state.pt")
            if "config_yaml" in train_files:
                (tmp / "train" / "config.yaml").write_text(train_files["config_yaml"])
    return dest


def read_checkpoint_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ``ModelConfig`` of a checkpoint folder and its JSON document; checks the format."""
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: not a dosegym checkpoint (no {CONFIG_FILE})")
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: unreadable checkpoint config ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"{cfg_path}: checkpoint config is not UTF-8 JSON ({exc.reason})") from exc
    check_format(doc, cfg_path, FORMAT_NAME, FORMAT_VERSION)
    return parse_config(ModelConfig, doc.get("model", {}), f"{cfg_path} field 'model'"), doc


def check_format(doc: Any, path: Path, name: str, version: int) -> None:
    """``ModelError`` naming ``path`` unless ``doc`` is a JSON object of format ``name``, ``version``."""
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: checkpoint config must be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != name:
        raise ModelError(f"{path}: format {doc.get('format')!r}, expected {name!r}")
    if doc.get("format_version") != version:
        raise ModelError(
            f"{path}: format_version {doc.get('format_version')!r}; this dosegym ({__version__}) reads "
            f"format_version {version}"
        )


def load_weights(model: torch.nn.Module, file: str | Path) -> None:
    """Load a safetensors state dict into ``model``; ``ModelError`` lists missing, unexpected
    and wrongly-shaped tensors."""
    where = str(file)
    try:
        state = load_file(str(file))
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise ModelError(
            f"{where}: cannot read weights ({exc}); the file is damaged or not a safetensors file: "
            "copy the checkpoint again or retrain it"
        ) from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
        raise ModelError(f"{where}: weights do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def _devices_here() -> list[str]:
    here = ["cpu"]
    if torch.cuda.is_available():
        here += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        here.append("mps")
    return here


def resolve_device(device: torch.device | str, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` this machine has; else ``ModelError`` naming ``what``
    (e.g. the CLI option) and the devices valid here."""
    here = _devices_here()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"{what} {device!r} is not a torch device; valid here: {', '.join(here)}") from None
    if dev.type == "cpu" or str(dev) in here:
        return dev
    backend = getattr(torch, dev.type, None)  # another accelerator (xpu, ...) torch knows of
    if dev.type not in ("cuda", "mps") and getattr(backend, "is_available", lambda: False)():
        return dev
    raise ModelError(f"{what} {device!r} is not available on this machine; valid here: {', '.join(here)}")


def load_model(path: str | Path, device: torch.device | str = "cpu", expected: ModelConfig | None = None):
    """Build the network a checkpoint describes and load its ``model.safetensors``.

    ``expected``: a config the checkpoint must match (else ``ModelError`` listing each
    differing field).
    """
    from dosegym.diffusion.model import Any2Any

    folder = Path(path)
    config, _ = read_checkpoint_config(folder)
    if expected is not None:
        diff = config_differences(config, expected)
        if diff:
            raise ModelError(f"{folder}: checkpoint does not match the model config: " + "; ".join(diff))
    dev = resolve_device(device)
    model = Any2Any(config)
    load_weights(model, folder / WEIGHTS_FILE)
    return model.to(dev).eval()
