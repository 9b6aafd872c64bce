"""Fuzz every reader and ``dosegym score --validate`` with random bytes and small mutations of
real files: each call reads or raises a ``DosegymError``, within a time bound, never another
exception (issue 15, "Done when").

Environment: ``DOSEGYM_FUZZ_EXAMPLES=N`` runs N examples per target (default a few, ~1 min in
all); ``DOSEGYM_FUZZ_FINDINGS=DIR`` keeps going after a failure and saves each distinct one
(reader, exception type, innermost dosegym frame) under ``DIR/<n>/`` with its input, the
traceback and a one-line ``repro.py``. Example of a long run::

    DOSEGYM_FUZZ_EXAMPLES=300 DOSEGYM_FUZZ_FINDINGS=/tmp/fuzz_findings nice pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuzzing import (
    MAAS_CARDS,
    PATIENT,
    TIME_LIMIT_S,
    Mutation,
    Outcome,
    Seeds,
    Worker,
    array_mutations,
    byte_mutations,
    copy_seed,
    element_mutations,
    gz_mutations,
    materialise,
    member_mutations,
    repro_line,
    tree_mutations,
)
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from shared_data import need

EXAMPLES = int(os.environ.get("DOSEGYM_FUZZ_EXAMPLES", "0")) or None
FINDINGS = os.environ.get("DOSEGYM_FUZZ_FINDINGS")
SEED = int(os.environ.get("DOSEGYM_FUZZ_SEED", "0"))  # added to each target's fixed seed
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("DOSEGYM_FUZZ_SHRINK") else [])
_seen: dict[tuple[str, str, str], int] = {}


@dataclass(frozen=True)
class Target:
    """One reader fed one (mutated) seed file."""

    name: str
    seed: str  # a key of Seeds
    file: str | None  # the file to mutate inside a folder seed (None: the seed is the file)
    mutations: st.SearchStrategy[Mutation]
    reader: str  # "read_case", "gdphmm", "load_card", "validate" or "dose"
    examples: int = 60


TEXT = byte_mutations(text=True)
BINARY = byte_mutations(text=False)
DICOM = st.one_of(TEXT, element_mutations(), element_mutations())
CARD = st.one_of(TEXT, tree_mutations(), tree_mutations())
TARGETS = [
    *(
        Target(f"openkbp/{f}", "openkbp", f, TEXT, "read_case", 40)
        for f in ("voxel_dimensions.csv", "possible_dose_mask.csv", "dose.csv", "PTV63.csv", "ct.csv")
    ),
    Target("nifti/case.json", "nifti_gz", "case.json", CARD, "read_case"),
    Target("nifti/dose.nii.gz", "nifti_gz", "dose.nii.gz", st.one_of(BINARY, gz_mutations()), "read_case"),
    Target(
        "nifti/PTV70.nii.gz",
        "nifti_gz",
        "structures/PTV70.nii.gz",
        st.one_of(BINARY, gz_mutations()),
        "read_case",
    ),
    Target("nifti/ct.mha", "nifti_mha", "ct.mha", TEXT, "read_case"),
    Target("nifti/ct.nrrd", "nifti_nrrd", "ct.nrrd", TEXT, "read_case"),
    Target(
        "phantom.npz",
        "phantom",
        None,
        st.one_of(BINARY, member_mutations(), array_mutations()),
        "read_case",
        120,
    ),
    Target(
        "gdphmm.npz", "gdphmm", None, st.one_of(BINARY, member_mutations(), array_mutations()), "gdphmm", 120
    ),
    *(
        Target(f"dicom/{f}", "dicom", f, DICOM, "read_case")
        for f in ("RS.dcm", "RD.dcm", "CT.0012.dcm", "RP.dcm")
    ),
    *(Target(f"load_card/{k}", k, None, CARD, "load_card") for k in ("yaml_card", *MAAS_CARDS)),
    *(Target(f"validate/{k}", k, None, CARD, "validate") for k in ("yaml_card", *MAAS_CARDS)),
    Target("dose/.npy", "dose_npy", None, st.one_of(BINARY, array_mutations()), "dose", 120),
    Target("dose/.nii.gz", "dose_nii", None, st.one_of(BINARY, gz_mutations()), "dose", 120),
]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    """The real seed files; missing shared data fails the test under CI=true (else skips)."""
    need(PATIENT, *MAAS_CARDS.values())
    return Seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The process that runs the calls (restarted after a crash or a hang)."""
    w = Worker(tmp_path_factory.mktemp("fuzz-worker"))
    yield w
    w.close()


def record(
    target: Target, mutation: Mutation, path: Path, out: Outcome, repro: str, root: Path
) -> tuple[tuple[str, str, str], str]:
    """Save a distinct failure under ``FINDINGS/<n>/``; return its key and one-line summary."""
    exc = out.error or "bad result"
    key = (target.reader if target.reader != "read_case" else f"read_case:{target.seed}", exc, out.frame)
    summary = f"{target.name} {mutation!r}: {exc} at {key[2]}: {out.detail.strip().splitlines()[-1:]} "
    if key in _seen:
        return key, f"[{FINDINGS}/{_seen[key]}] {summary}"
    base = Path(FINDINGS)
    base.mkdir(parents=True, exist_ok=True)
    n = len([d for d in base.iterdir() if d.is_dir()]) + 1
    _seen[key] = n
    case_dir = base / str(n)
    rel = path.relative_to(root)  # path: what the reader was given (a file or a folder)
    materialise(root / rel.parts[0], case_dir / "input")
    (case_dir / "repro.py").write_text(repro.replace(str(path), str(case_dir / "input" / rel)) + "\n")
    (case_dir / "finding.txt").write_text(
        f"target: {target.name}\nreader: {key[0]}\nexception: {exc}\ntop dosegym frame: {key[2]}\n"
        f"elapsed: {out.elapsed_s:.2f} s\nmutation: {mutation!r}\n\n{out.detail}\n"
    )
    return key, f"[{FINDINGS}/{n}] {summary}"


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_reader_reads_or_raises_a_dosegym_error(target: Target, seeds, worker) -> None:
    """Each mutated input reads, or raises a DosegymError, within the time bound."""
    failures: dict[tuple[str, str, str], list[str]] = {}  # distinct failure -> its summaries

    @settings(
        max_examples=EXAMPLES or target.examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=PHASES,
        suppress_health_check=list(HealthCheck),
    )
    @seed(zlib.crc32(target.name.encode()) + SEED)  # deterministic, but a different stream per target
    @given(mutation=target.mutations)
    def run(mutation: Mutation) -> None:
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            root = Path(tmp)
            copy = copy_seed(seeds[target.seed], root, target.file)
            path = copy / target.file if target.file else copy
            mutation.apply(path)
            out = worker.call(target.reader, copy)
            if out.ok:
                return
            repro = repro_line(target.reader, str(copy))
            if FINDINGS:
                key, summary = record(target, mutation, copy, out, repro, root)
                failures.setdefault(key, []).append(summary)
                return
            raise AssertionError(
                f"{target.name}: {mutation!r} -> {out.error or 'wrong value'} at {out.frame} after "
                f"{out.elapsed_s:.1f} s (bound {TIME_LIMIT_S} s)\n{out.detail}\n"
                f"reproduce with a file mutated as above (DOSEGYM_FUZZ_FINDINGS=DIR keeps it) and: {repro}"
            )

    run()
    assert not failures, "\n".join(f"{len(s)}x {s[0]}" for s in failures.values())
