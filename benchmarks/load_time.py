"""Load time of a case, by format: OpenKBP CSV folder (baseline) vs the NIfTI/MHA/NRRD folder.

For each of the three real OpenKBP patients in ``../shared/data/openkbp`` it times
``read_case`` on the CSV folder and on the same case written as a case folder with each
image extension: one untimed warm-up read, then the median of ``--repeats`` reads (5 by
default). Ratios are against the CSV read of the same case, measured in the same run.

Add a timing by appending ``(label, load)`` to the list ``entries()`` returns: ``label`` is
``"FORMAT / CASE"`` and ``load`` a zero-argument callable. An entry whose case has no CSV
baseline gets its ratio against the mean CSV time (marked ``*``).

    python benchmarks/load_time.py [--repeats 5] [--data ../shared/data/openkbp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from data_paths import OPENKBP, OPENKBP_PATIENTS

from dosegym.data import read_case, write_case

PATIENTS = OPENKBP_PATIENTS
BASELINE = "openkbp-csv"
EXTENSIONS = (".nii.gz", ".mha", ".nrrd")

Entry = tuple[str, Callable[[], object]]


def entries(data: Path, workdir: Path) -> list[Entry]:
    """The timings to run: the CSV baseline and every case-folder extension, per patient,
    then one shipped phantom per site."""
    out: list[Entry] = []
    for rel in PATIENTS:
        src = data / rel
        name = src.name
        out.append((f"{BASELINE} / {name}", lambda src=src: read_case(src)))
        case = read_case(src)
        for ext in EXTENSIONS:
            folder = write_case(case, workdir / f"{name}{ext.replace('.', '_')}", ext=ext)
            out.append((f"nifti-folder{ext} / {name}", lambda folder=folder: read_case(folder)))
    for site in ("headneck", "prostate", "lung"):  # shipped phantoms (48x64x64 .npz)
        ident = f"phantoms:{site}/0"
        out.append((f"phantom-npz / {site}_000", lambda ident=ident: read_case(ident)))
    return out


def median_seconds(load: Callable[[], object], repeats: int) -> float:
    load()  # warm-up: imports, file cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=OPENKBP)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            (label, median_seconds(load, args.repeats)) for label, load in entries(args.data, Path(tmp))
        ]
    base = {label.split(" / ", 1)[1]: t for label, t in results if label.startswith(BASELINE + " /")}
    mean_base = statistics.mean(base.values())
    print(f"median of {args.repeats} reads each (after one warm-up read); ratio = time / CSV time")
    print(f"{'format / case':<32} {'median ms':>10} {'ratio':>8}")
    by_format: dict[str, list[float]] = {}
    for label, t in results:
        fmt, case = label.split(" / ", 1)
        ref, mark = (base[case], "") if case in base else (mean_base, "*")
        print(f"{label:<32} {t * 1000:>10.1f} {t / ref:>7.2f}{mark or ' '}")
        by_format.setdefault(fmt, []).append(t / ref)
    print("\nmean ratio per format (vs CSV):")
    for fmt, ratios in by_format.items():
        print(f"  {fmt:<24} {statistics.mean(ratios):.2f}")


if __name__ == "__main__":
    main()
