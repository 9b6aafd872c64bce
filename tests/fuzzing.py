"""Seeds, mutations and the worker process of the fuzz test (tests/test_fuzz.py).

A *seed* is a real input (a file, or a folder with one file to mutate); a *mutation* is a
small, describable change of that file's bytes or of its parsed contents. A ``Worker`` runs
each reader in a separate process under a time and memory bound and classifies the outcome.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import strategies as st
from shared_data import LUNG_JSON, PROSTATE_JSON, PT_108, REPO

PATIENT = PT_108
MAAS_CARDS = {"maas_lung": LUNG_JSON, "maas_prostate": PROSTATE_JSON}
YAML_CARD = REPO / "dosegym" / "scorecards" / "cards" / "phantom_headneck.yaml"
PHANTOM = REPO / "dosegym" / "assets" / "phantoms" / "headneck" / "headneck_028.npz"
GDPHMM_NAME = "HNC_001+A4Ac+MOS_25934.npz"
CT_LINES = 4000  # ct.csv of the OpenKBP seed keeps its header and this many rows
TIME_LIMIT_S = 10.0
MEMORY_HEADROOM = 4 << 30  # address space a call may add before MemoryError

# ---------------------------------------------------------------------------------- mutations

NUMBER = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
TEXT_TOKENS = [
    t.encode() for t in "NaN nan inf -inf -1 0 1e30 -1e30 1e308 x 99999999999999999999 -0 0.5".split()
]
TEXT_TOKENS.append(b"")
TREE_TOKENS: list[Any] = [None, -1, 0, 0.5, 1e30, -1e30, 1e308, math.nan, math.inf, "x", "", "NaN", 2**63]
TREE_TOKENS += [[], {}, True, [1, 2]]
ARRAY_VARIANTS = "nan inf neg huge zero empty scalar flat string float drop bigint".split()
HEAD = 2048  # a head-biased position falls within the first HEAD bytes


def _pos(n: int, where: tuple[bool, float], end: bool = False) -> int:
    head, frac = where
    span = min(n, HEAD) if head else n
    return min(int(frac * (span + (1 if end else 0))), n if end else max(n - 1, 0))


@dataclass
class Mutation:
    """One change of a file: ``kind`` and its parameters (``inner`` for nested mutations)."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    inner: Mutation | None = None

    def __repr__(self) -> str:
        parts = [
            f"{k}={v!r}" if not isinstance(v, bytes) or len(v) < 40 else f"{k}=<{len(v)} bytes>"
            for k, v in self.args.items()
        ]
        inner = f", inner={self.inner!r}" if self.inner else ""
        return f"Mutation({self.kind!r}, {', '.join(parts)}{inner})"

    def apply_bytes(self, data: bytes) -> bytes:
        """The mutated bytes (byte and text kinds)."""
        a, n = self.args, len(data)
        if self.kind == "random":
            return a["blob"]
        if self.kind == "flip":
            buf = bytearray(data)
            for where, xor in a["flips"]:
                if buf:
                    buf[_pos(n, where)] ^= xor
            return bytes(buf)
        if self.kind == "truncate":
            return data[: _pos(n, a["at"], end=True)]
        if self.kind == "insert":
            p = _pos(n, a["at"], end=True)
            return data[:p] + a["blob"] + data[p:]
        if self.kind == "delete":
            p = _pos(n, a["at"])
            return data[:p] + data[p + a["count"] :]
        if self.kind == "dupline":
            lines = data.splitlines(keepends=True)
            if not lines:
                return data
            i = _pos(len(lines), a["at"])
            return b"".join(lines[: i + 1] + lines[i:])
        if self.kind == "token":
            matches = list(NUMBER.finditer(data))
            if not matches:
                return data
            m = matches[_pos(len(matches), a["at"])]
            return data[: m.start()] + a["token"] + data[m.end() :]
        raise AssertionError(f"not a byte mutation: {self.kind}")

    def apply(self, path: Path) -> None:
        """Mutate the file at ``path`` in place."""
        data = path.read_bytes()
        if self.kind == "gz":
            path.write_bytes(gzip.compress(self.inner.apply_bytes(gzip.decompress(data)), mtime=0))
        elif self.kind == "member":
            _mutate_member(path, self.args["at"], self.inner)
        elif self.kind == "tree":
            _mutate_tree(path, self.args)
        elif self.kind == "array":
            _mutate_arrays(path, self.args)
        elif self.kind == "element":
            _mutate_dicom_element(path, self.args)
        else:
            path.write_bytes(self.apply_bytes(data))


_where = st.tuples(st.booleans(), st.floats(0.0, 1.0, exclude_max=True))
_small_blob = st.binary(min_size=1, max_size=8)


def byte_mutations(text: bool = True) -> st.SearchStrategy[Mutation]:
    """Random bytes, byte flips, truncation, insertion/deletion; with ``text`` also a
    duplicated line and a number replaced by a token (NaN, -1, 1e30, "x", "" ...)."""
    kinds = [
        st.builds(lambda b: Mutation("random", {"blob": b}), st.binary(max_size=4096)),
        st.builds(
            lambda f: Mutation("flip", {"flips": f}),
            st.lists(st.tuples(_where, st.integers(1, 255)), min_size=1, max_size=8),
        ),
        st.builds(lambda w: Mutation("truncate", {"at": w}), _where),
        st.builds(lambda w, b: Mutation("insert", {"at": w, "blob": b}), _where, _small_blob),
        st.builds(lambda w, c: Mutation("delete", {"at": w, "count": c}), _where, st.integers(1, 8)),
    ]
    if text:
        kinds += [
            st.builds(lambda w: Mutation("dupline", {"at": w}), _where),
            st.builds(
                lambda w, t: Mutation("token", {"at": w, "token": t}), _where, st.sampled_from(TEXT_TOKENS)
            ),
        ]
    return st.one_of(kinds)


def gz_mutations() -> st.SearchStrategy[Mutation]:
    """Mutate the decompressed bytes of a ``.gz`` file, then compress again."""
    return st.builds(lambda m: Mutation("gz", inner=m), byte_mutations(text=False))


def member_mutations() -> st.SearchStrategy[Mutation]:
    """Mutate the bytes of one member of a zip (``.npz``) and write the zip again."""
    return st.builds(lambda w, m: Mutation("member", {"at": w}, inner=m), _where, byte_mutations(text=False))


def tree_mutations() -> st.SearchStrategy[Mutation]:
    """Replace or delete one node of a parsed JSON/YAML document."""
    return st.builds(
        lambda w, op, t: Mutation("tree", {"at": w, "op": op, "token": t}),
        _where,
        st.sampled_from(["replace", "delete", "duplicate"]),
        st.sampled_from(TREE_TOKENS),
    )


def array_mutations() -> st.SearchStrategy[Mutation]:
    """Replace one array of an ``.npz``/``.npy`` (or value of a pickled dict) by a variant."""
    return st.builds(
        lambda w, v: Mutation("array", {"at": w, "variant": v}), _where, st.sampled_from(ARRAY_VARIANTS)
    )


def element_mutations() -> st.SearchStrategy[Mutation]:
    """Set one DICOM data element (any depth, not PixelData) to a token, or delete it."""
    return st.builds(
        lambda w, op, t: Mutation("element", {"at": w, "op": op, "token": t}),
        _where,
        st.sampled_from(["replace", "delete"]),
        st.sampled_from(TEXT_TOKENS),
    )


def _mutate_member(path: Path, where: tuple[bool, float], inner: Mutation) -> None:
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    i = _pos(len(members), where)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, (name, data) in enumerate(members):
            zf.writestr(name, inner.apply_bytes(data) if k == i else data)
    path.write_bytes(buf.getvalue())


def _nodes(doc: Any, trail: tuple = ()) -> list[tuple]:
    out = [trail]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*trail, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*trail, i))
    return out


def _mutate_tree(path: Path, a: dict[str, Any]) -> None:
    is_json = path.suffix.lower() == ".json"
    text = path.read_text(encoding="utf-8")
    doc = json.loads(text) if is_json else yaml.safe_load(text)
    nodes = _nodes(doc)[1:] or [()]
    trail = nodes[_pos(len(nodes), a["at"])]
    token = json.loads(json.dumps(a["token"]))  # a fresh copy
    if not trail:
        doc = token
    else:
        parent = doc
        for k in trail[:-1]:
            parent = parent[k]
        key = trail[-1]
        if a["op"] == "replace":
            parent[key] = token
        elif a["op"] == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
        else:
            parent[f"{key}_copy"] = parent[key]
    path.write_text(json.dumps(doc, indent=1) if is_json else yaml.safe_dump(doc, sort_keys=False))


def _variant(value: Any, variant: str) -> Any:
    arr = np.asarray(value)
    numeric = arr.dtype.kind in "biuf"
    if variant in ("nan", "inf") and numeric and arr.size:
        out = arr.astype(np.float64)
        out.flat[arr.size // 2] = np.nan if variant == "nan" else np.inf
        return out
    if variant == "neg" and numeric:
        return -arr.astype(np.float64) - 1.0
    if variant == "huge" and numeric:
        return np.full(arr.shape, 1e30)
    if variant == "bigint" and numeric:
        return np.full(arr.shape, np.iinfo(np.int64).max // 7, np.int64)
    if variant == "zero":
        return np.zeros(arr.shape, arr.dtype if numeric else np.float64)
    if variant == "empty":
        return arr.reshape(-1)[:0]
    if variant == "scalar" and arr.size:
        return arr.reshape(-1)[0]
    if variant == "flat":
        return arr.reshape(-1)
    if variant == "string":
        return np.array("x")
    if variant == "float" and numeric:
        return arr.astype(np.float64) + 0.5
    return arr[..., None] if arr.ndim else np.array([arr, arr])


def _mutate_arrays(path: Path, a: dict[str, Any]) -> None:
    if path.suffix == ".npy":
        np.save(path, _variant(np.load(path), a["variant"]))
        return
    with np.load(path, allow_pickle=True) as z:
        arrays = {k: z[k] for k in z.files}
    if set(arrays) == {"arr_0"} and arrays["arr_0"].dtype == object:  # GDP-HMM: a pickled dict
        plan = arrays["arr_0"].item()
        key = sorted(plan)[_pos(len(plan), a["at"])]
        if a["variant"] == "drop":
            del plan[key]
        else:
            plan[key] = _variant(plan[key], a["variant"])
        np.savez(path, arr_0=plan)
        return
    key = sorted(arrays)[_pos(len(arrays), a["at"])]
    if a["variant"] == "drop":
        del arrays[key]
    else:
        arrays[key] = _variant(arrays[key], a["variant"])
    np.savez_compressed(path, **arrays)


def _walk(ds: Any) -> list[tuple[Any, Any]]:
    out = []
    for elem in ds:
        if elem.tag == 0x7FE00010:  # PixelData
            continue
        out.append((ds, elem))
        if elem.VR == "SQ":
            for item in elem.value:
                out += _walk(item)
    return out


_INT_VR = {
    "US": (0, 2**16 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1),
}


def _dicom_value(vr: str, token: str) -> Any:
    """``token`` as a value pydicom can write for ``vr`` (numbers clamped to its range)."""
    if vr not in _INT_VR and vr not in ("FL", "FD"):
        return token
    try:
        number = float(token or "0")
    except ValueError:
        number = 0.0
    if vr in ("FL", "FD"):
        return number
    lo, hi = _INT_VR[vr]
    return 0 if number != number else int(min(max(number, lo), hi))


def _mutate_dicom_element(path: Path, a: dict[str, Any]) -> None:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        pairs = _walk(ds)
        parent, elem = pairs[_pos(len(pairs), a["at"])]
        with pydicom.config.disable_value_validation():
            buf = io.BytesIO()
            try:
                if a["op"] == "delete" or elem.VR == "SQ":
                    del parent[elem.tag]
                else:
                    elem.value = _dicom_value(elem.VR, a["token"].decode())
                pydicom.dcmwrite(buf, ds)
            except Exception:  # noqa: BLE001 - a value pydicom refuses: leave the file as it was
                return
    path.write_bytes(buf.getvalue())


# -------------------------------------------------------------------------------------- seeds


class Seeds:
    """The seed inputs, each written under ``root`` on first use (a seed that cannot be
    built fails only the targets that use it): name -> path (file or folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._built:
            where = self.root / name
            where.mkdir(parents=True)
            builder = getattr(self, f"_{name}", None)
            self._built[name] = builder(where) if builder else self._card(where, name)
        return self._built[name]

    @staticmethod
    def _openkbp(where: Path) -> Path:
        out = where / PATIENT.name
        out.mkdir()
        for f in sorted(PATIENT.iterdir()):
            if f.name == "ct.csv":
                with open(f, "rb") as fh:
                    (out / f.name).write_bytes(b"".join(fh.readline() for _ in range(CT_LINES + 1)))
            else:
                shutil.copy(f, out / f.name)
        return out

    @staticmethod
    def _phantom(where: Path) -> Path:
        return Path(shutil.copy(PHANTOM, where / PHANTOM.name))

    @staticmethod
    def _nifti_gz(where: Path) -> Path:
        from dosegym.data import read_case, write_case

        return write_case(read_case(PHANTOM), where / "case")

    @staticmethod
    def _nifti_mha(where: Path) -> Path:
        from dosegym.data import read_case, write_case

        return write_case(read_case(PHANTOM), where / "case", ext=".mha")

    @staticmethod
    def _nifti_nrrd(where: Path) -> Path:
        from dosegym.data import read_case, write_case

        return write_case(read_case(PHANTOM), where / "case", ext=".nrrd")

    @staticmethod
    def _gdphmm(where: Path) -> Path:
        np.savez(where / GDPHMM_NAME, arr_0=gdphmm_plan())
        return where / GDPHMM_NAME

    @staticmethod
    def _dicom(where: Path) -> Path:
        return _import_dicom_fixtures().write_test_set(where / "dicom")

    @staticmethod
    def _dose_npy(where: Path) -> Path:
        from dosegym.data import read_case

        np.save(where / "dose.npy", read_case(PHANTOM).dose.astype(np.float32))
        return where / "dose.npy"

    @staticmethod
    def _dose_nii(where: Path) -> Path:
        from dosegym.data import read_case
        from dosegym.data.nifti import write_image

        case = read_case(PHANTOM)
        return write_image(case.dose.astype(np.float32), case.grid, where / "dose.nii.gz")

    @staticmethod
    def _card(where: Path, name: str) -> Path:
        src = YAML_CARD if name == "yaml_card" else MAAS_CARDS[name]
        return Path(shutil.copy(src, where / src.name))


def gdphmm_plan() -> dict[str, Any]:
    """A tiny GDP-HMM plan dict in the challenge layout (as tests/data/test_gdphmm.py builds it)."""
    shape = (6, 10, 8)
    rng = np.random.default_rng(1)

    def box(z, y, x) -> np.ndarray:
        m = np.zeros(shape, np.uint8)
        m[z, y, x] = 1
        return m

    return {
        "img": rng.integers(-1000, 1500, shape).astype(np.int16),
        "dose": rng.integers(0, 7_000_000, shape).astype(np.uint32),
        "dose_scale": 1e-5,
        "PTV70": box(slice(2, 4), slice(3, 7), slice(2, 6)),
        "SpinalCord": box(slice(None), slice(8, 9), slice(4, 5)),
        "Body": box(slice(None), slice(1, 9), slice(1, 7)),
        "all_mask": ["PTV70", "SpinalCord", "Body"],
        "isVMAT": True,
        "isocenter": np.array([3, 5, 4], np.float32),
        "angle_list": np.array([181.0, 179.0, 183.0], np.float32),
        "beam_plate": rng.random(shape).astype(np.float32),
        "angle_plate": rng.random(shape[1:]).astype(np.float32),
        "origin": (-100.0, -150.0, -20.0),
        "spacing": (2.5, 2.5, 2.0),
        "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        "size": shape,
    }


def _import_dicom_fixtures():
    if "dicom_fixtures" not in sys.modules:
        sys.path.insert(0, str(REPO / "tests" / "data"))
    import dicom_fixtures

    return dicom_fixtures


def copy_seed(seed: Path, dest: Path, mutated: str | None) -> Path:
    """A private copy of ``seed`` under ``dest`` to mutate: a folder's other files are
    symlinks (fast), the file ``mutated`` (relative) is a real copy. Returns the copy."""
    out = dest / seed.name
    if seed.is_file():
        shutil.copy(seed, out)
        return out
    for f in seed.rglob("*"):
        rel = f.relative_to(seed)
        if f.is_dir():
            (out / rel).mkdir(parents=True, exist_ok=True)
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if str(rel) == mutated:
            shutil.copy(f, out / rel)
        else:
            (out / rel).symlink_to(f)
    return out


def materialise(folder: Path, dest: Path) -> None:
    """Copy ``folder`` (or file) to ``dest`` resolving symlinks (for a reproducer)."""
    if folder.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder, dest / folder.name)
    else:
        shutil.copytree(folder, dest / folder.name, symlinks=False)


# ------------------------------------------------------------------------------ the calls


def perform(reader: str, path: str) -> str | None:
    """Call ``reader`` on ``path`` (in the worker); ``None`` if the value returned is right,
    else what is wrong with it. A ``DosegymError`` propagates (the caller accepts it)."""
    from dosegym.data import Case, read_case
    from dosegym.scorecards import Scorecard, load_card

    if reader in ("read_case", "gdphmm"):
        value = read_case(path, **({"trusted": True} if reader == "gdphmm" else {}))
        return None if isinstance(value, Case) else f"read_case returned {value!r}"
    if reader == "load_card":
        value = load_card(path)
        return None if isinstance(value, Scorecard) else f"load_card returned {value!r}"
    if reader == "dose":
        value = dose_reader()(Path(path), _dose_case())
        items = value if isinstance(value, tuple) else (value,)
        return None if any(isinstance(v, np.ndarray) for v in items) else f"returned {type(value)}"
    assert reader == "validate", reader
    from typer.testing import CliRunner

    from dosegym.cli.main import app

    result = CliRunner().invoke(app, ["score", "--validate", path])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code not in (0, 1, 2):
        cause = _root_cause(result.exception)  # the CLI's last-resort handler chains it
        if cause is not None:
            raise cause
        return f"exit code {result.exit_code}: {result.output[-500:]}"
    if "Traceback" in result.output:
        return f"traceback in the output: {result.output[-500:]}"
    return None


def _root_cause(exc: BaseException | None) -> BaseException | None:
    """The first exception in the chain of ``exc`` that is not the CLI's exit machinery."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if not isinstance(exc, SystemExit) and type(exc).__name__ not in ("Exit", "Abort"):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def repro_line(reader: str, path: str) -> str:
    """A one-line Python reproducer of ``perform(reader, path)``."""
    if reader in ("read_case", "gdphmm"):
        extra = ", trusted=True" if reader == "gdphmm" else ""
        return f"from dosegym.data import read_case; read_case({path!r}{extra})"
    if reader == "load_card":
        return f"from dosegym.scorecards import load_card; load_card({path!r})"
    if reader == "dose":
        fn = dose_reader()
        return (
            "from pathlib import Path; from dosegym.data import read_case; "
            f"from {fn.__module__} import {fn.__name__}; "
            f"{fn.__name__}(Path({path!r}), read_case({str(PHANTOM)!r}))"
        )
    command = ["dosegym", "score", "--validate", path]
    return f"import subprocess; raise SystemExit(subprocess.run({command!r}).returncode)"


def dose_reader() -> Callable[..., Any]:
    """The reader behind ``dosegym score --dose`` (wherever it lives)."""
    import importlib

    for module, name in (
        ("dosegym.cli.score", "_read_dose"),
        ("dosegym.cli.score", "read_dose"),
        ("dosegym.data", "read_dose"),
        ("dosegym.data.dose", "read_dose"),
    ):
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    raise AssertionError("the reader of `dosegym score --dose` was not found")


_CASE: list[Any] = []


def _dose_case():
    if not _CASE:
        from dosegym.data import read_case

        _CASE.append(read_case(PHANTOM))
    return _CASE[0]


# --------------------------------------------------------------------------- the worker process


@dataclass
class Outcome:
    """What one call did: ``ok`` (read, or raised a DosegymError) or the failure."""

    ok: bool
    elapsed_s: float
    error: str = ""  # exception type, "Timeout" or "Crash(SIGSEGV)"; "" when ok or a bad value
    frame: str = "-"  # innermost dosegym frame
    detail: str = ""


def top_frame(exc: BaseException | None) -> str:
    """The innermost traceback frame inside the dosegym package, as ``dosegym/x.py:line func``."""
    if exc is None or exc.__traceback__ is None:
        return "-"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/dosegym/" in f.filename and "/tests/" not in f.filename
    ]
    if not frames:
        return "-"
    f = frames[-1]
    return f"dosegym/{f.filename.split('/dosegym/', 1)[1]}:{f.lineno} {f.name}"


_FAULT_FRAME = re.compile(r'File "[^"]*/(dosegym/[^"]+)", line (\d+) in (\S+)')


def _serve(conn, fault_file: str) -> None:
    """The worker's loop: run each ``(reader, path)`` and send back a dict."""
    import faulthandler

    faulthandler.enable(open(fault_file, "w"))  # noqa: SIM115 - open for the process's life
    warnings.simplefilter("ignore")
    import dosegym.cli.main  # noqa: F401 - import everything before the memory limit
    import dosegym.data  # noqa: F401
    from dosegym.errors import DosegymError

    _dose_case()
    with open("/proc/self/statm") as fh:
        used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = used + MEMORY_HEADROOM if hard == resource.RLIM_INFINITY else min(hard, used + MEMORY_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    conn.send("ready")
    while (request := conn.recv()) is not None:
        t0 = time.monotonic()
        try:
            problem = perform(*request)
            out = {"ok": problem is None, "detail": problem or ""}
        except DosegymError as exc:
            out = {"ok": True, "detail": f"{type(exc).__name__}: {exc}"}
        except BaseException as exc:  # noqa: BLE001 - classifying is the point
            text = "".join(traceback.format_exception(exc))
            out = {"ok": False, "error": type(exc).__name__, "frame": top_frame(exc), "detail": text[-4000:]}
        out["elapsed_s"] = time.monotonic() - t0
        conn.send(out)


class Worker:
    """A separate process that runs the calls: a crash (segfault) or a hang ends only the
    worker (it is restarted), a memory bomb hits its address-space limit (MemoryError)."""

    def __init__(self, scratch: Path) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._scratch = scratch
        self._proc = None
        self._starts = 0

    def _start(self) -> None:
        self._starts += 1
        self._fault = self._scratch / f"faulthandler-{self._starts}.txt"
        self._conn, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, str(self._fault)), daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(120) or self._conn.recv() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(10)

    def call(self, reader: str, path: Path) -> Outcome:
        """Run ``perform(reader, path)`` in the worker within ``TIME_LIMIT_S``."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        t0 = time.monotonic()
        self._conn.send((reader, str(path)))
        if not self._conn.poll(TIME_LIMIT_S):
            self._kill()
            self._proc = None
            elapsed = time.monotonic() - t0
            return Outcome(False, elapsed, "Timeout", "-", f"no answer within {TIME_LIMIT_S} s (killed)")
        try:
            out = self._conn.recv()
        except (EOFError, ConnectionError):
            self._kill()
            code = self._proc.exitcode
            self._proc = None
            name = signal.Signals(-code).name if code is not None and code < 0 else f"exit {code}"
            dump = self._fault.read_text(errors="replace") if self._fault.exists() else ""
            frames = _FAULT_FRAME.findall(dump)  # most recent call first
            frame = f"{frames[0][0]}:{frames[0][1]} {frames[0][2]}" if frames else "-"
            return Outcome(False, time.monotonic() - t0, f"Crash({name})", frame, dump[:4000])
        outcome = Outcome(
            out["ok"], out["elapsed_s"], out.get("error", ""), out.get("frame", "-"), out["detail"]
        )
        if outcome.ok and outcome.elapsed_s > TIME_LIMIT_S:
            return Outcome(False, outcome.elapsed_s, "Timeout", "-", f"took {outcome.elapsed_s:.1f} s")
        return outcome
