"""Training data of pretraining: sources, the preprocessed cache, cases in memory.

Sources: the shipped phantoms' ``train`` split and/or OpenKBP ``train-pats`` (never
``validation-pats``), as ``cfg.data`` names them (:func:`training_sources`). Every source is
preprocessed once (:func:`dosegym.diffusion.slots.to_model`) into a compact cache of
model-grid tensors: one ``float16`` ``.npy`` per case (all slots stacked on the channel axis,
memory-mapped at training time) plus a JSON index, under ``<cache>/pretrain/<spec hash>/``
(``<cache>`` = ``data.cache_dir``, ``$DOSEGYM_CACHE`` or ``~/.cache/dosegym``). Reading
OpenKBP CSVs each step would dominate the step time. :func:`training_cases` turns what
``pretrain(..., sources=...)`` is given (source cases, ``Case`` objects, ready training
cases) into the cases batches are drawn from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dosegym.data.atomic import atomic_path, json_text
from dosegym.data.case import Case
from dosegym.data.sites import PhantomId
from dosegym.diffusion.config import DataConfig, PretrainConfig
from dosegym.diffusion.slots import ModelInput, ModelSpec, Role, to_model
from dosegym.errors import DosegymError, ModelError

CACHE_VERSION = 1


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


def training_sources(cfg: PretrainConfig | DataConfig) -> list[SourceCase]:
    """Every training case the data config (``cfg`` or its ``data``) names, phantoms first,
    capped at ``max_cases``."""
    from dosegym.data import read_case

    data = cfg if isinstance(cfg, DataConfig) else cfg.data
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
            p = PhantomId.parse(pid)
            out.append(
                SourceCase(
                    _safe(pid),
                    pid,
                    lambda s=p.site, i=p.index: phantoms.load_shipped_phantom(s, i),
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


class TrainingCase(Protocol):
    """What training draws its batches from: a ``label`` (recorded in the run's ``data.json``)
    and the case's unbatched model input for a spec."""

    label: str

    def model_input(self, spec: ModelSpec) -> ModelInput: ...


@dataclass(frozen=True)
class MemoryCase:
    """A training case held in memory: its model input, built once (e.g. from a ``Case`` or a
    :class:`CachedCase` read once instead of at every step)."""

    key: str
    label: str
    inputs: ModelInput

    def model_input(self, spec: ModelSpec) -> ModelInput:
        return self.inputs


Source = SourceCase | Case | TrainingCase


def training_cases(
    cfg: PretrainConfig, sources: Sequence[Source] | None = None, progress: bool = True
) -> list[TrainingCase]:
    """The cases pretraining draws batches from.

    ``sources`` ``None``: the cases ``cfg.data`` names (:func:`training_sources`), preprocessed
    into the cache. Otherwise either :class:`SourceCase` items only (preprocessed into the
    cache, :func:`build_cache`), or any mix of ``Case`` objects (preprocessed in memory with
    ``cfg.model.spec``, labelled by ``case_id``) and ready training cases (:class:`CachedCase`,
    :class:`MemoryCase`, anything with ``label`` and ``model_input(spec)``). ``Case``
    objects without the generate slot are skipped, as in the cache.
    """
    items = training_sources(cfg) if sources is None else list(sources)
    spec = cfg.model.spec
    queued = [s for s in items if isinstance(s, SourceCase)]
    if queued and len(queued) != len(items):
        raise ModelError(
            "sources: SourceCase items go through the cache and cannot be mixed with cases or "
            "ready training cases; give one kind"
        )
    if queued:
        return build_cache(cfg, queued, progress=progress)
    out: list[TrainingCase] = []
    for item in items:
        if isinstance(item, Case):
            mi, _ = to_model(item, spec)
            if spec.generate in mi.tensors:
                out.append(MemoryCase(_safe(item.case_id), item.case_id, mi))
        elif callable(getattr(item, "model_input", None)) and isinstance(getattr(item, "label", None), str):
            out.append(item)
        else:
            raise ModelError(
                f"sources: {type(item).__name__} is not a training source; valid: SourceCase, Case, "
                "or a case with label and model_input(spec) (CachedCase, MemoryCase)"
            )
    if not out:
        raise ModelError(f"sources: no training case (with the generate slot {spec.generate!r}) given")
    return out
