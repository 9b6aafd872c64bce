"""``dosegym data``: inspect, convert and generate cases."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dosegym.cli._common import console, friendly_errors

app = typer.Typer(help="Inspect, convert and generate cases.", no_args_is_help=True)


@app.command("info")
@friendly_errors
def info(
    path: str = typer.Argument(
        ...,
        help="A case: OpenKBP folder, NIfTI folder, GDP-HMM .npz, DICOM folder, phantom .npz "
        "or 'phantoms:SITE/N'.",
    ),
    trusted: bool = typer.Option(
        False, "--trusted", help="Allow unpickling (GDP-HMM .npz files are pickled dicts)."
    ),
    prescriptions: Path | None = typer.Option(
        None, "--prescriptions", help="GDP-HMM PTV_DICT.json with the prescriptions."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
) -> None:
    """Print a summary of a case: grid, structures (cc), prescriptions, beams, dose."""
    from dosegym.data import read_case
    from dosegym.data.io import detect_format

    kwargs = {}
    if detect_format(path) == "gdphmm":
        kwargs = {"trusted": trusted, "prescriptions_json": prescriptions}
    case = read_case(path, **kwargs)
    s = case.summary()
    if as_json:
        from dosegym.data.atomic import json_text

        console.print_json(json_text(s))
        return
    g = s["grid"]
    console.print(f"[bold]{s['case_id']}[/]  ({s['format']}: {s['source']})")
    console.print(
        f"grid {tuple(g['shape'])} (z, y, x), spacing {tuple(round(v, 3) for v in g['spacing_mm'])} mm, "
        f"origin {tuple(round(v, 1) for v in g['origin_mm'])} mm"
    )
    if s["grid_source"]:
        console.print(f"grid source: {s['grid_source']} ({s['grid_reason']})", soft_wrap=True, markup=False)
    if s["ct_hu"]:
        console.print(f"CT {s['ct_hu']['min']:.0f} .. {s['ct_hu']['max']:.0f} HU")
    else:
        console.print("CT none")
    for note in s["notes"]:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    if s["body_cc"] is not None:
        console.print(f"body {s['body_cc']:.1f} cc")
    table = Table("structure", "role", "volume (cc)", "Rx (Gy / fx)", "mean dose (Gy)")
    targets = set(case.targets)
    for name, cc in s["structures"].items():
        rx = case.prescription_for(name)
        mean = "" if case.dose is None else f"{case.dose[case.structures[name]].mean():.2f}"
        table.add_row(
            name,
            "target" if name in targets else "OAR",
            f"{cc:.2f}",
            f"{rx.dose_gy:g} / {rx.fractions}" if rx else "",
            mean,
        )
    console.print(table)
    if s["beams"]:
        b = s["beams"]
        console.print(
            f"beams {b['technique']}, {len(b['gantry_deg'])} gantry angles "
            f"{[round(a, 1) for a in b['gantry_deg'][:12]]}{' ...' if len(b['gantry_deg']) > 12 else ''}, "
            f"isocenter {tuple(round(v, 1) for v in b['isocenter_mm'])} mm"
        )
    if s["dose_gy"]:
        console.print(
            f"dose max {s['dose_gy']['max']:.2f} Gy, mean in body {s['dose_gy']['mean_in_body']:.2f} Gy"
        )


@app.command("convert")
@friendly_errors
def convert(
    src: str = typer.Argument(..., help="Any supported case (see 'dosegym data info --help')."),
    out: Path = typer.Argument(
        ...,
        help="Output folder (NIfTI layout: case.json, ct, dose, structures/): new, empty, or a case "
        "folder written by dosegym before.",
    ),
    ext: str = typer.Option(".nii.gz", "--ext", help="Image extension: .nii.gz, .mha or .nrrd."),
    trusted: bool = typer.Option(False, "--trusted", help="Allow unpickling GDP-HMM .npz files."),
    prescriptions: Path | None = typer.Option(None, "--prescriptions", help="GDP-HMM PTV_DICT.json."),
) -> None:
    """Convert any supported input into the NIfTI folder layout."""
    from dosegym.data import read_case, write_case
    from dosegym.data.atomic import check_output_path
    from dosegym.data.io import detect_format
    from dosegym.data.nifti import CASE_WRITER, check_image_ext

    check_image_ext(ext)
    check_output_path(out, writer=CASE_WRITER)  # before the source is read
    kwargs = {}
    if detect_format(src) == "gdphmm":
        kwargs = {"trusted": trusted, "prescriptions_json": prescriptions}
    case = read_case(src, **kwargs)
    path = write_case(case, out, format="nifti", ext=ext)
    console.print(f"wrote {path} ({len(case.structures)} structures)")


@app.command("phantoms")
@friendly_errors
def phantoms(
    out: Path = typer.Option(
        Path("phantoms"),
        "--out",
        help="Output folder for the phantom .npz files: new, empty, or a set written here before.",
    ),
    n: int = typer.Option(4, "--n", min=1, help="Number of phantoms per site."),
    site: list[str] = typer.Option(["headneck"], "--site", help="Site(s): headneck, prostate, lung."),
    seed: int = typer.Option(0, "--seed", help="Seed of the anatomy generator: 0 .. 2**64 - 1."),
    dose: str = typer.Option(
        "auto",
        "--dose",
        help="Reference dose: 'pyradplan' (physics extra), 'shipped' (copy the shipped set: "
        "seed 0, indices 0..31), 'none' (anatomy only), or 'auto' (pyradplan if installed, else "
        "the shipped file when it exists, else anatomy only with a warning).",
    ),
) -> None:
    """Generate procedural phantoms (anatomy, PTVs, OARs, beams, reference dose) as .npz files."""
    from dosegym.data.phantoms import generate_phantom_set

    paths = generate_phantom_set(out, sites=site, n=n, seed=seed, dose=dose)
    console.print(f"wrote {len(paths)} phantoms to {out}")
