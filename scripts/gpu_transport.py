#!/usr/bin/env python3
"""Carry a pretraining cache to a lent GPU machine and back (README: Training the model).

    python scripts/gpu_transport.py pack CONFIG.yaml OUT.npz     # here: preprocess, quantise, pack
    python scripts/gpu_transport.py unpack CONFIG.yaml IN.npz    # there: write the training cache

``pack`` builds the ordinary training cache (``dosegym.diffusion.train_data.build_cache``) and packs
every case into one compressed file: binary channels as bits, channels of at most 256 distinct
values exactly as uint8 indices, the dose quantised to uint16 over its range (error <= range /
131070, about 0.001 Gy at 70 Gy), the remaining conditions (CT, beam plate) to uint8. ``unpack``
writes the cache files with the same keys and stamps and returns the cases as sources for
``pretrain(..., sources=...)``, which then never needs the source data (it does not travel).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _span(slot: tuple[int, int] | None) -> tuple[int, int]:
    return (0, 0) if slot is None else (slot[0], slot[0] + slot[1])


def pack(config: str, out: str) -> None:
    from dosegym.diffusion.config import PretrainConfig
    from dosegym.diffusion.train_data import build_cache, training_sources

    cfg = PretrainConfig.from_yaml(config)
    sources = training_sources(cfg)
    cases = build_cache(cfg, sources)
    stamps = {s.key: (s.label, s.stamp) for s in sources}
    arrays: dict[str, np.ndarray] = {}
    index = []
    for c in cases:
        arr = np.load(c.array).astype(np.float32)
        entry = {
            "key": c.key,
            "label": stamps[c.key][0],
            "stamp": stamps[c.key][1],
            "slots": c.slots,
            "rx_max_gy": c.rx_max_gy,
            "shape": list(arr.shape),
            "channels": [],
        }
        dose_channels = range(*_span(c.slots.get("dose")))
        for ch, v in enumerate(arr):
            name = f"{c.key}__{ch}"
            levels = np.unique(v)
            if np.isin(levels, (0.0, 1.0)).all():
                arrays[name] = np.packbits(v.astype(bool).ravel())
                entry["channels"].append({"kind": "bits"})
            elif levels.size <= 256:
                arrays[name] = np.searchsorted(levels, v).astype(np.uint8)
                entry["channels"].append({"kind": "levels", "values": levels.tolist()})
            else:
                lo, hi = float(v.min()), float(v.max())
                top = 65535 if ch in dose_channels else 255
                q = np.round((v - lo) / max(hi - lo, 1e-12) * top)
                arrays[name] = q.astype(np.uint16 if top > 255 else np.uint8)
                entry["channels"].append({"kind": "quantised", "lo": lo, "hi": hi, "top": top})
        index.append(entry)
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)
    print(f"packed {len(index)} cases into {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")


def unpack(config: str, src: str) -> list:
    """Write the training cache of ``config`` from ``src``; returns its cases as
    ``SourceCase`` items (same keys, labels and stamps) that load nothing: the source data is
    not on this machine, and ``build_cache`` finds every case already cached."""
    from dosegym.diffusion.config import PretrainConfig
    from dosegym.diffusion.train_data import SourceCase, cache_root

    cfg = PretrainConfig.from_yaml(config)
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    with np.load(src) as z:
        index = json.loads(bytes(z["index"]).decode())
        for e in index:
            shape = e["shape"]
            chans = []
            for ch, info in enumerate(e["channels"]):
                raw = z[f"{e['key']}__{ch}"]
                if info["kind"] == "bits":
                    v = np.unpackbits(raw)[: int(np.prod(shape[1:]))].astype(np.float32)
                elif info["kind"] == "levels":
                    v = np.asarray(info["values"], np.float32)[raw]
                else:
                    v = raw.astype(np.float32) / info["top"] * (info["hi"] - info["lo"]) + info["lo"]
                chans.append(v.reshape(shape[1:]))
            np.save(root / f"{e['key']}.npy", np.stack(chans).astype(np.float16))
            meta = {
                "stamp": e["stamp"],
                "source": e["label"],
                "slots": e["slots"],
                "rx_max_gy": e["rx_max_gy"],
            }
            (root / f"{e['key']}.json").write_text(json.dumps(meta) + "\n")
    print(f"unpacked {len(index)} cases into {root}")
    return [
        SourceCase(e["key"], e["label"], lambda label=e["label"]: _not_here(label), e["stamp"]) for e in index
    ]


def _not_here(label: str):
    raise RuntimeError(f"{label}: the source is not on this machine; only its cache is")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    {"pack": pack, "unpack": unpack}[sys.argv[1]](sys.argv[2], sys.argv[3])
