"""The ``distckpt`` command: ls, inspect, verify, diff, audit, convert, gc, copy, launch.

Every command runs in one process, without ``jax.distributed``. Commands
that only read (ls, inspect, verify, diff, audit) never write to the
checkpoint. See docs/cli.md for an example session of each.

Exit codes: 0 success (clean, no differences); 1 a negative answer (verify
found corruption or no committed checkpoint, diff found differences, audit
found a damaged or corrupt step); 2 a usage error, or the command could not
run (a path that is not a checkpoint, a refused conversion, an I/O error).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # annotations only: the commands import the engine when they run
    from distckpt._sources import Source

EXIT_OK, EXIT_NEGATIVE, EXIT_TROUBLE = 0, 1, 2


class Trouble(click.ClickException):
    """The command could not run; printed as ``Error: ...``, exit code 2."""

    exit_code = EXIT_TROUBLE


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        rv = cli.main(args=argv, prog_name="distckpt", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return EXIT_NEGATIVE
    return rv if isinstance(rv, int) else EXIT_OK


def _version() -> str:
    from distckpt import __version__

    return __version__


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 success; 1 corruption or differences found; 2 usage error or "
    "could not run. See docs/cli.md.",
)
@click.version_option(_version(), prog_name="distckpt", message="%(prog)s %(version)s")
def cli() -> None:
    """Look at, check, compare, convert and clean distckpt checkpoints.

    Every command runs in a single process (no jax.distributed) and only the
    ones that say so (convert, gc) write anything.
    """


def _emit_json(doc: Any) -> None:
    """Prints ``doc`` as strict JSON, the one way every ``--json`` output is written.

    JSON has no NaN or infinities: a non-finite float (a NaN learning rate, a
    max rel of ``inf``) becomes the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``, so every JSON parser reads the output (docs/cli.md).
    """
    click.echo(json.dumps(strict_json(doc), indent=2, default=str, allow_nan=False))


def strict_json(x: Any) -> Any:
    """``x`` with every non-finite float (numpy ones too) replaced by its name as a string."""
    if isinstance(x, dict):
        return {strict_json(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0:
        x = x.item()  # a numpy scalar: its Python value
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def _error(e: BaseException) -> Trouble:
    return Trouble(str(e))


def _min_age_option(f: Any) -> Any:
    from distckpt._tools import scan as _scan

    return click.option(
        "--min-age",
        type=click.FloatRange(min=0),
        default=_scan.DEFAULT_MIN_AGE_S,
        show_default=True,
        metavar="SECONDS",
        help="A leftover modified less than this long ago may belong to a save in progress "
        "and is never called stale (nor removed by gc).",
    )(f)


def _slab_mb_option(f: Any) -> Any:
    from distckpt._tools import diff as _diff

    return click.option(
        "--slab-mb",
        type=click.IntRange(min=1),
        default=_diff.DEFAULT_SLAB_BYTES >> 20,
        show_default=True,
        help="Rows of a leaf are compared this many MiB at a time (bounds memory).",
    )(f)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _fmt_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def _fmt_sharding(sharding: dict | None) -> str:
    if not sharding:
        return "-"
    text = _fmt_layout(sharding)
    if sharding.get("memory_kind"):
        text += f" in {sharding['memory_kind']}"
    return text


def _fmt_layout(sharding: dict) -> str:
    kind = sharding.get("type")
    if kind == "NamedSharding":
        mesh = ", ".join(f"{k}={v}" for k, v in sharding.get("mesh", {}).items())

        def entry(p: Any) -> str:
            if p is None:
                return "None"
            if isinstance(p, list):
                return "(" + ", ".join(repr(a) for a in p) + ")"
            return repr(p)

        return f"mesh({mesh}) P({', '.join(entry(p) for p in sharding.get('spec', []))})"
    if kind == "SingleDeviceSharding":
        return "single device"
    if kind == "host":
        return "host (numpy)"
    return str(kind)


# --------------------------------------------------------------------------- ls


@cli.command("ls")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--best-metric",
    metavar="NAME",
    help="Metric that marks the best step (default: the first metric all steps recorded).",
)
@click.option(
    "--best-mode",
    type=click.Choice(["min", "max"]),
    default="min",
    show_default=True,
    help="Whether lower or higher values of the metric are better.",
)
@_min_age_option
def ls_command(
    directory: str, as_json: bool, best_metric: str | None, best_mode: str, min_age: float
) -> int:
    """List the steps of a CheckpointManager DIRECTORY (distckpt's or Orbax's).

    For each step: committed or not (and why not), size, processes, commit
    time, metrics and the best marker. Leftovers (interrupted saves,
    half-deleted steps, unreferenced attempts) are listed separately.
    Reads manifests only.
    """
    from distckpt._tools import scan as _scan

    try:
        orbax = _scan.scan_orbax(directory)
        scan = orbax or _scan.scan(directory, min_age_s=min_age)
    except OSError as e:
        raise _error(e) from e
    metric, best = _scan.best_step(scan.steps, best_metric, best_mode)
    if as_json:
        _emit_json(
            {
                "directory": scan.directory,
                "format": "orbax" if orbax else "distckpt",
                "is_checkpoint": scan.is_checkpoint,
                "best": {"metric": metric, "mode": best_mode, "step": best},
                "steps": [s.to_json() for s in scan.steps],
                "leftovers": [lo.to_json() for lo in scan.leftovers],
                "foreign": scan.foreign,
            }
        )
        return EXIT_OK
    if orbax:
        click.echo(
            f"{scan.directory}: an Orbax CheckpointManager directory (distckpt.restore reads "
            "its step directories)"
        )
    if scan.is_checkpoint:
        click.echo(f"{scan.directory} is a single checkpoint (not a manager directory)")
    elif not scan.steps:
        click.echo(f"{scan.directory}: no steps")
    rows = []
    for s in scan.steps:
        if s.state == "committed":
            rows.append(
                [
                    str(s.step),
                    "committed",
                    _scan.format_bytes(s.bytes),
                    str(s.process_count),
                    s.created or "-",
                    _fmt_metrics(s.metrics) + ("  *best" if s.step == best else ""),
                ]
            )
        else:
            rows.append([str(s.step), s.state, _scan.format_bytes(s.bytes), "-", "-", f"({s.why})"])
    if rows:
        _table(rows, ["STEP", "STATE", "SIZE", "PROCS", "CREATED (UTC)", "METRICS"])
    if metric and best is not None and not scan.is_checkpoint:
        click.echo(f"best: step {best} by {metric} ({best_mode})")
    if scan.leftovers:
        click.echo(
            "\nleftovers (never part of a committed step; `distckpt gc` removes stale ones):"
        )
        _table(
            [
                [
                    os.path.relpath(lo.path, scan.directory),
                    lo.kind,
                    _scan.format_bytes(lo.bytes),
                    _scan.format_age(lo.age_s),
                    "locked by a running save"
                    if lo.locked
                    else ("stale" if lo.stale else "recent: may be in use"),
                ]
                for lo in scan.leftovers
            ],
            ["PATH", "KIND", "SIZE", "AGE", "STATUS"],
        )
    return EXIT_OK


# --------------------------------------------------------------------------- inspect


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def inspect_command(path: str, as_json: bool) -> int:
    """Show the tree of the checkpoint at PATH without reading any array.

    Key path, global shape, dtype, sharding at save time (mesh axes and
    PartitionSpec), bytes; user metadata; format and library versions; the
    save timings and, for a manager's step, its step and metrics. An Orbax
    checkpoint (or the latest step of an Orbax CheckpointManager directory)
    and safetensors (a file, or a sharded directory: every tensor, its file)
    are described too.
    """
    from distckpt import _sources
    from distckpt._sources import orbax as _orbax
    from distckpt.errors import DistckptError

    try:
        steps = _orbax.manager_steps(path)
        if steps:
            latest = [s for s in steps if s.committed][-1]
            if not as_json:
                click.echo(
                    f"{path}: an Orbax CheckpointManager directory, steps "
                    f"{', '.join(str(s.step) for s in steps if s.committed)}; the latest:"
                )
            path = latest.path
        with _sources.open_source(path) as src:
            doc = _describe_source(src)
    except (DistckptError, OSError, ValueError) as e:
        raise _error(e) from e
    if as_json:
        _emit_json(doc)
        return EXIT_OK
    _print_description(doc)
    return EXIT_OK


def _describe_source(src: Source) -> dict:
    leaves: list[dict[str, Any]] = []
    for spec in src.leaves:
        entry: dict[str, Any] = {"path": spec.display, "key_path": [list(p) for p in spec.path]}
        entry["kind"] = spec.kind
        if spec.stored:
            entry.update(
                shape=list(spec.array_shape),
                dtype=spec.dtype,
                sharding=spec.sharding,
                bytes=spec.nbytes,
            )
        if spec.impl:
            entry["prng_impl"] = spec.impl
        tensor = src.tensor_of(len(leaves))
        if tensor is not None:
            entry["tensor"], entry["file"] = tensor
        if spec.kind == "python":
            entry["value"] = spec.value
        leaves.append(entry)
    return {
        "path": src.display,
        "format": src.format,
        **src.info,
        "user_metadata": src.user_metadata,
        "leaves": leaves,
    }


def _print_description(doc: dict) -> None:
    from distckpt._tools.scan import format_bytes

    if doc["format"] == "distckpt":
        click.echo(
            f"{doc['path']}: distckpt format {doc['format_version']}, created {doc['created']}, "
            f"{doc['process_count']} process(es), {doc['device_count']} device(s), "
            f"{doc['files']} file(s), {format_bytes(doc['total_bytes'])}"
        )
        versions = ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items())
        click.echo(f"written by: {versions or 'unknown'}")
        manager = doc.get("manager")
        if manager:
            click.echo(
                f"step {manager.get('step')}, metrics: {_fmt_metrics(manager.get('metrics'))}"
            )
        stats = doc.get("save_stats")
        if stats:
            click.echo(
                f"save: blocking {stats.get('blocking_s', 0):.3f} s, write "
                f"{stats.get('write_s', 0):.3f} s, commit {stats.get('commit_s', 0):.3f} s"
            )
    elif doc["format"] == "safetensors":
        click.echo(
            f"{doc['path']}: safetensors, {doc['tensors']} tensor(s) in {doc['files']} "
            f"file(s), {format_bytes(doc['total_bytes'])}; tree paths: {doc['names']}"
        )
        rows = [
            [
                leaf["tensor"],
                str(tuple(leaf["shape"])),
                leaf["dtype"],
                format_bytes(leaf["bytes"]),
                leaf["file"],
                leaf["path"],
            ]
            for leaf in doc["leaves"]
            if "tensor" in leaf
        ]
        click.echo(f"{len(rows)} tensors:")
        _table(rows, ["TENSOR", "SHAPE", "DTYPE", "BYTES", "FILE", "TREE PATH"])
        others = [leaf for leaf in doc["leaves"] if "tensor" not in leaf]
        if others:
            click.echo(
                "values in the export record: "
                + ", ".join(f"{leaf['path']}={leaf.get('value')!r}" for leaf in others)
            )
        return
    else:
        click.echo(
            f"{doc['path']}: Orbax checkpoint ({doc.get('layout')}), "
            f"{format_bytes(doc['total_bytes'])} of array data"
        )
    click.echo(f"user metadata: {json.dumps(doc.get('user_metadata'))}")
    rows = []
    for leaf in doc["leaves"]:
        if "shape" in leaf:
            kind = leaf["kind"] + (f" ({leaf['prng_impl']})" if leaf.get("prng_impl") else "")
            rows.append(
                [
                    leaf["path"],
                    kind,
                    str(tuple(leaf["shape"])),
                    leaf["dtype"],
                    _fmt_sharding(leaf.get("sharding")),
                    format_bytes(leaf["bytes"]),
                ]
            )
        else:
            value = repr(leaf.get("value")) if leaf["kind"] == "python" else ""
            rows.append([leaf["path"], leaf["kind"], "-", value, "-", "0 B"])
    click.echo(f"{len(rows)} leaves:")
    _table(rows, ["PATH", "KIND", "SHAPE", "DTYPE", "SHARDING AT SAVE", "BYTES"])


# --------------------------------------------------------------------------- verify


@cli.command("verify")
@click.argument("path")
@click.option(
    "--all",
    "all_steps",
    is_flag=True,
    help="PATH is a CheckpointManager directory: verify every committed step.",
)
def verify_command(path: str, all_steps: bool) -> int:
    """Re-read every byte of a checkpoint and check every checksum and full coverage.

    Exit code 0 when clean, 1 when corrupt or not committed, naming the files
    and leaf paths at fault. With --all, a progress bar on a terminal (plain
    lines otherwise) and exit code 1 if any committed step is corrupt or
    none is committed; uncommitted steps are listed but do not fail the run.
    """
    import distckpt
    from distckpt.errors import DistckptError

    if not all_steps:
        try:
            report = _verify_one(path)
        except DistckptError as e:
            hint = ""
            if os.path.isdir(path) and any(n.startswith("step_") for n in os.listdir(path)):
                hint = (
                    f"\n{path} holds manager steps: `distckpt verify --all {path}` checks them all"
                )
            click.echo(f"FAILED: {e}{hint}", err=True)
            return EXIT_NEGATIVE
        click.echo(_ok_line(report))
        return EXIT_OK

    from distckpt._tools import scan as _scan

    try:
        scan = _scan.scan(path)
    except OSError as e:
        raise _error(e) from e
    results: list[tuple[Any, str, Any]] = []
    tty = sys.stderr.isatty()

    def check(s: Any) -> None:
        if s.state == "uncommitted":
            results.append((s, "not committed", s.why))
            return
        try:
            results.append((s, "ok", distckpt.verify(s.path)))
        except DistckptError as e:
            results.append((s, "corrupt", e))
        if not tty:
            _print_verify_result(*results[-1])

    if tty:
        with click.progressbar(
            scan.steps,
            label=f"verifying {len(scan.steps)} step(s)",
            file=sys.stderr,
            item_show_func=lambda s: f"step {s.step}" if s else "",
        ) as bar:
            for s in bar:
                check(s)
        for r in results:
            _print_verify_result(*r)
    else:
        for s in scan.steps:
            check(s)
            if s.state == "uncommitted":
                _print_verify_result(*results[-1])
    bad = [s.step for s, status, _ in results if status == "corrupt"]
    ok = sum(1 for _, status, _ in results if status == "ok")
    click.echo(
        f"{ok} step(s) clean, {len(bad)} corrupt"
        + (f" ({', '.join(map(str, bad))})" if bad else "")
        + f", {sum(1 for _, st, _ in results if st == 'not committed')} not committed"
    )
    if not ok and not bad:
        click.echo(
            f"FAILED: nothing committed found at {scan.directory}: it holds "
            f"{_holdings(scan)}. Pass a CheckpointManager directory (step_XXXXXXXX "
            "subdirectories with manifest.json) or a checkpoint directory.",
            err=True,
        )
        return EXIT_NEGATIVE
    return EXIT_NEGATIVE if bad else EXIT_OK


def _holdings(scan: Any) -> str:
    """What a directory without a committed step holds, for the error that says so."""
    from distckpt._tools import scan as _scan

    parts = []
    uncommitted = [s.step for s in scan.steps if s.state == "uncommitted"]
    if uncommitted:
        parts.append(
            f"{len(uncommitted)} uncommitted step(s) ({', '.join(map(str, uncommitted[:5]))}"
            + (", ..." if len(uncommitted) > 5 else "")
            + ")"
        )
    if scan.foreign:
        parts.append(
            f"{len(scan.foreign)} other entr{'y' if len(scan.foreign) == 1 else 'ies'} "
            f"({', '.join(scan.foreign[:5])}{', ...' if len(scan.foreign) > 5 else ''})"
        )
    others = [lo for lo in scan.leftovers if lo.kind != _scan.INTERRUPTED_SAVE]
    if others:
        parts.append(
            f"{len(others)} other leftover(s) ({', '.join(sorted({lo.kind for lo in others}))})"
        )
    return ", ".join(parts) or "nothing"


def _verify_one(path: str) -> Any:
    """``distckpt.verify`` with a byte progress bar on a terminal, a line per ~10% otherwise."""
    import distckpt

    if sys.stderr.isatty():
        with click.progressbar(length=1, label="verifying", file=sys.stderr) as bar:

            def on_tty(done: int, total: int) -> None:
                bar.length = max(total, 1)
                bar.update(done - bar.pos)

            return distckpt.verify(path, progress=on_tty)
    shown = [0]

    def on_lines(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0] and done < total:
            shown[0] = tenth
            click.echo(f"verifying: {done >> 20} of {total >> 20} MiB", err=True)

    return distckpt.verify(path, progress=on_lines)


def _ok_line(report: Any) -> str:
    return (
        f"OK: {report.directory}: {report.leaves} leaves, {report.files} files, "
        f"{report.chunks} chunks, {report.bytes_checked} bytes checked in {report.seconds:.2f} s"
    )


def _print_verify_result(step: Any, status: str, detail: Any) -> None:
    if status == "ok":
        click.echo(f"step {step.step}: {_ok_line(detail)}")
    elif status == "corrupt":
        click.echo(f"step {step.step}: FAILED: {detail}", err=True)
    else:
        click.echo(f"step {step.step}: not committed ({detail})")


# --------------------------------------------------------------------------- diff


@cli.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--values", is_flag=True, help="Also compare values, leaf by leaf, slab by slab.")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--rtol", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--partial", is_flag=True, help="With a target spec B: allow B to be a subtree of A.")
@_slab_mb_option
@click.option(
    "--rename",
    "renames",
    multiple=True,
    metavar="OLD=NEW",
    help="Rename A's key paths (a/b/c) first: a regular expression over the whole path "
    "and its replacement, as restore(rename=) takes them. Repeatable.",
)
@click.option(
    "--drop", multiple=True, metavar="PATTERN", help="A's paths to leave out, as restore(drop=)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def diff_command(
    a: str,
    b: str,
    values: bool,
    atol: float,
    rtol: float,
    partial: bool,
    slab_mb: int,
    renames: tuple[str, ...],
    drop: tuple[str, ...],
    as_json: bool,
) -> int:
    """Differences between checkpoints A and B (distckpt or Orbax).

    Structure, shape and dtype differences from metadata; with --values, per
    leaf the largest absolute and relative difference and how many elements
    lie outside atol + rtol * |B|. B may instead be a Python target spec,
    module:attr or file.py:attr, naming a pytree of jax.ShapeDtypeStruct,
    arrays and scalars (or a function returning one): the diff then lists
    what restore(A, target) would refuse. --rename and --drop show what a
    layout migration would do: A's paths are mapped first, and every mapped
    path is listed.

    Exit code 0 when there is no difference, 1 when there is.
    """
    from distckpt import _migrate, _sources
    from distckpt._tools import diff as _diff
    from distckpt.errors import DistckptError

    bad = [r for r in renames if "=" not in r]
    if bad:
        raise click.BadParameter(f"expected OLD=NEW, got {bad[0]!r}", param_hint="--rename")
    migration = _migrate.Migration.build(
        dict(r.split("=", 1) for r in renames) or None, list(drop) or None, None
    )
    try:
        with _sources.open_source(a) as src_a:
            if migration is not None and not as_json:
                mapped = _diff.renames(src_a, migration)
                click.echo(f"mapping: {len(mapped)} of A's leaves renamed or dropped:")
                for line in mapped:
                    click.echo(f"  {line}")
            if _diff.is_target_spec(b):
                target = _diff.load_target(b)
                problems = _diff.target_problems(
                    src_a, target, partial=partial, migration=migration
                )
                if as_json:
                    _emit_json({"a": src_a.display, "target": b, "structure": problems})
                else:
                    _print_structure(problems, f"{src_a.display} against target {b}")
                return EXIT_NEGATIVE if problems else EXIT_OK
            with _sources.open_source(b) as src_b:
                structure = _diff.structure(src_a, src_b, migration)
                if not as_json:
                    _print_structure(structure, f"{src_a.display} (A) and {src_b.display} (B)")
                leaf_diffs = []
                if values:
                    if not as_json:
                        click.echo(f"values (atol={atol:g}, rtol={rtol:g}):")
                    for d in _diff.values(
                        src_a,
                        src_b,
                        atol=atol,
                        rtol=rtol,
                        slab_bytes=slab_mb << 20,
                        migration=migration,
                    ):
                        leaf_diffs.append(d)
                        if not as_json:
                            _print_value_diff(d)
    except (DistckptError, OSError, ValueError) as e:
        raise _error(e) from e
    different = [d for d in leaf_diffs if d.status == "different"]
    if as_json:
        _emit_json(
            {
                "a": src_a.display,
                "b": src_b.display,
                "structure": structure,
                "values": [d.to_json() for d in leaf_diffs] if values else None,
                "atol": atol,
                "rtol": rtol,
            }
        )
    elif values:
        click.echo(
            f"values: {len(leaf_diffs)} leaves compared: "
            f"{sum(d.status == 'equal' for d in leaf_diffs)} equal, "
            f"{sum(d.status == 'close' for d in leaf_diffs)} close, {len(different)} different"
        )
    return EXIT_NEGATIVE if structure or different else EXIT_OK


def _print_structure(problems: list[str], what: str) -> None:
    if not problems:
        click.echo(f"structure: same leaves, shapes and dtypes in {what}")
        return
    click.echo(f"structure: {len(problems)} difference(s) in {what}:")
    for p in problems:
        click.echo(f"  {p}")


def _print_value_diff(d: Any) -> None:
    if d.detail:
        click.echo(f"  {d.path}: {d.status}: {d.detail}")
    elif d.status == "equal":
        click.echo(f"  {d.path}: equal ({d.elements} elements)")
    else:
        click.echo(
            f"  {d.path}: {d.status}: {d.mismatched}/{d.elements} elements outside tolerance, "
            f"max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}"
        )


# --------------------------------------------------------------------------- audit


@cli.command("audit")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Also draw save timings and sizes over steps into this PNG (matplotlib).",
)
@click.option(
    "--no-verify", is_flag=True, help="Skip re-reading the data (integrity 'not checked')."
)
@_min_age_option
def audit_command(
    directory: str, as_json: bool, plot_path: str | None, no_verify: bool, min_age: float
) -> int:
    """A report over a CheckpointManager DIRECTORY.

    Integrity of every step, bytes per step and per process (imbalance =
    largest / mean), growth over steps, the save timings the manager recorded
    (blocking, write, commit), what retention kept, and leftovers. Reads only;
    --plot writes the PNG you name and nothing else.

    Exit code 1 when a committed step is corrupt or its manifest damaged.
    """
    from distckpt._tools import audit as _audit
    from distckpt._tools import scan as _scan

    try:
        scan = _scan.scan(directory, min_age_s=min_age)
    except OSError as e:
        raise _error(e) from e
    progress = None
    if not as_json and not sys.stderr.isatty() and not no_verify:

        def progress(s: Any) -> None:
            click.echo(f"audit: checked step {s.step}", err=True)

    if not no_verify and sys.stderr.isatty() and scan.steps:
        with click.progressbar(length=len(scan.steps), label="auditing", file=sys.stderr) as bar:
            doc = _audit.report(scan, verify=True, on_step=lambda s: bar.update(1))
    else:
        doc = _audit.report(scan, verify=not no_verify, on_step=progress)
    if plot_path:
        try:
            _audit.plot(doc, plot_path)
        except (ImportError, OSError) as e:
            raise _error(e) from e
        doc["plot"] = os.path.abspath(plot_path)
    if as_json:
        _emit_json(doc)
    else:
        _print_audit(doc)
    return EXIT_NEGATIVE if doc["problems"] else EXIT_OK


def _print_audit(doc: dict) -> None:
    from distckpt._tools.scan import format_bytes

    click.echo(f"audit of {doc['directory']}")
    rows = []
    for r in doc["steps"]:
        if r["state"] != "committed":
            rows.append([str(r["step"]), r["state"], format_bytes(r["bytes"]), "-", "-", "-", "-"])
            continue
        growth = "-"
        if r.get("growth_bytes") is not None:
            growth = f"{'+' if r['growth_bytes'] >= 0 else ''}{format_bytes(r['growth_bytes'])}"
            if r.get("growth_pct") is not None:
                growth += f" ({r['growth_pct']:+.1f}%)"
        timings = "/".join(
            f"{r[k]:.3f}" if r.get(k) is not None else "-"
            for k in ("blocking_s", "write_s", "commit_s")
        )
        imbalance = f"{r['imbalance']:.2f}" if r.get("imbalance") else "-"
        rows.append(
            [
                str(r["step"]),
                r.get("integrity", "-"),
                format_bytes(r["bytes"]),
                growth,
                " ".join(format_bytes(b) for b in r["bytes_per_process"]),
                imbalance,
                timings,
            ]
        )
    _table(
        rows,
        [
            "STEP",
            "INTEGRITY",
            "SIZE",
            "GROWTH",
            "BYTES PER PROCESS",
            "IMBALANCE",
            "BLOCK/WRITE/COMMIT S",
        ],
    )
    t, ret = doc["totals"], doc["retention"]
    click.echo(
        f"totals: {t['committed_steps']} committed step(s), {format_bytes(t['bytes'])}; "
        f"leftovers {format_bytes(t['leftover_bytes'])}"
        + (f"; largest imbalance {t['max_imbalance']:.2f}" if t.get("max_imbalance") else "")
    )
    u = doc["usage"]
    if u["next_step_bytes"] is not None:
        budget = u["budget"]
        click.echo(
            f"usage: {format_bytes(u['bytes'])} now; next step about "
            f"{format_bytes(u['next_step_bytes'])} (growth {format_bytes(u['growth_per_step_bytes'])}"
            f" per step); keeping as many steps then: about {format_bytes(u['projected_bytes'])}"
            + (
                f"; budget {format_bytes(budget['budget_bytes'])}: the manager projected "
                f"{format_bytes(budget['projected_bytes'])} at its last save"
                + (" (OVER BUDGET)" if budget.get("over_budget") else "")
                if budget
                else ""
            )
        )
    click.echo(
        f"retention: kept steps {ret['kept_steps'] or 'none'}"
        + (f", intervals {ret['intervals']}" if ret["intervals"] else "")
        + (
            f"; {len(ret['interrupted_deletions'])} interrupted deletion(s)"
            if ret["interrupted_deletions"]
            else ""
        )
        + (f"; uncommitted steps {ret['uncommitted_steps']}" if ret["uncommitted_steps"] else "")
    )
    for p in doc["saves_in_progress"]:
        click.echo(f"recently modified, may be in use by a save or deletion: {p}")
    for w in doc["warnings"]:
        click.echo(f"warning: {w}")
    for p in doc["problems"]:
        click.echo(f"PROBLEM: {p}")
    if doc.get("plot"):
        click.echo(f"plot: {doc['plot']}")
    if not doc["problems"]:
        click.echo("no problems found")


# --------------------------------------------------------------------------- convert


@cli.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--to",
    "to",
    type=click.Choice(["distckpt", "orbax", "npz", "safetensors"]),
    required=True,
    help="Format to write.",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "--max-shard-size",
    "max_shard_size",
    default=None,
    metavar="SIZE",
    help="Sharded safetensors: most tensor bytes per file (5GB, 500MB, 2GiB; default 5GB).",
)
@click.option(
    "--distributed",
    is_flag=True,
    help="--to distckpt in a multi-process job (distckpt launch, srun, ...): join it with "
    "distckpt.initialize(); each process reads and writes its part.",
)
def convert_command(
    src: str, dst: str, to: str, overwrite: bool, max_shard_size: str | None, distributed: bool
) -> int:
    """Convert the checkpoint SRC (distckpt, Orbax or safetensors, detected) into DST.

    \b
    --to distckpt     a distckpt checkpoint (from Orbax, safetensors, or distckpt)
    --to orbax        an Orbax checkpoint written with orbax's StandardCheckpointer
    --to npz          one uncompressed .npz file, streamed leaf by leaf
    --to safetensors  DST ending in .safetensors: one file, names like params/layer_0/w;
                      else the directory DST in Hugging Face's sharded layout
                      (model-0000k-of-0000N.safetensors + model.safetensors.index.json,
                      names like params.layer_0.w), streamed leaf by leaf

    npz and safetensors are written a slab at a time, so memory stays
    bounded; the distckpt and Orbax targets hold the whole tree in host
    memory, or with --distributed (--to distckpt) each process its part.
    Writes only DST (docs/cli.md, docs/formats.md).
    """
    from distckpt import _convert
    from distckpt.errors import DistckptError

    began = time.perf_counter()
    try:
        if distributed:
            if to != "distckpt":
                raise ValueError("--distributed converts --to distckpt only")
            from distckpt._cluster import initialize

            initialize()
        max_shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
        summary = _convert.convert(
            src, dst, to=to, overwrite=overwrite, max_shard_bytes=max_shard_bytes
        )
    except (DistckptError, OSError, ValueError, ImportError) as e:
        raise _error(e) from e
    from distckpt._tools.scan import format_bytes

    if summary.get("processes", 1) > 1 and _process_index() != 0:
        return EXIT_OK  # one line per job, from process 0
    by = f" by {summary['processes']} processes" if summary.get("processes", 1) > 1 else ""
    click.echo(
        f"converted {summary['leaves']} leaves ({format_bytes(summary['bytes'])}) from "
        f"{summary['from']} {summary['src']} to {to} {summary['dst']}{by} in "
        f"{time.perf_counter() - began:.2f} s"
    )
    return EXIT_OK


def _process_index() -> int:
    import jax

    return jax.process_index()


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_size(text: str) -> int:
    """``5GB`` -> 5 * 10**9, ``2GiB`` -> 2 * 2**30, ``1000`` -> 1000 (ValueError otherwise)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ValueError(
            f"--max-shard-size must be a positive size such as 5GB, 500MB or 2GiB, got {text!r}"
        )
    return int(float(m.group(1)) * _UNITS[unit])


# --------------------------------------------------------------------------- gc


@cli.command("gc")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_min_age_option
def gc_command(directory: str, dry_run: bool, as_json: bool, min_age: float) -> int:
    """Remove stale leftovers in a CheckpointManager DIRECTORY (or one checkpoint).

    Removes interrupted saves (step directories with save attempts and no
    manifest.json), half-deleted steps (.step_*.deleting-*), and attempts
    and temporary manifests a step's manifest does not name. Never a
    committed step, never an attempt whose lock a running save holds, never
    anything modified within --min-age (for filesystems without locks),
    never a directory holding files distckpt did not write. A step
    directory is renamed aside first and checked again, so a save that
    commits meanwhile is put back, not deleted.
    """
    from distckpt._tools import gc as _gc
    from distckpt._tools import scan as _scan

    try:
        scan = _scan.scan(directory, min_age_s=min_age)
    except OSError as e:
        raise _error(e) from e
    outcomes = _gc.run(scan, dry_run=dry_run)
    if as_json:
        _emit_json(
            {
                "directory": scan.directory,
                "dry_run": dry_run,
                "outcomes": [o.to_json() for o in outcomes],
            }
        )
        return EXIT_OK
    for o in outcomes:
        line = f"{o.action}: {o.path} ({o.kind}, {_scan.format_bytes(o.bytes)})"
        click.echo(line + (f": {o.reason}" if o.reason else ""))
    gone = [o for o in outcomes if o.action in ("removed", "would remove")]
    kept = len(outcomes) - len(gone)
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"gc: {verb} {len(gone)} leftover(s), {_scan.format_bytes(sum(o.bytes for o in gone))}; "
        f"kept {kept}"
    )
    return EXIT_OK


@cli.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--no-verify", is_flag=True, help="Do not check chunk checksums on the way.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already at DST.")
@click.option(
    "--compression",
    type=click.Choice(["keep", "zstd", "none"]),
    default="keep",
    show_default=True,
    help="keep: copy the stored bytes; zstd or none: re-encode every chunk.",
)
@click.option(
    "--level", type=click.IntRange(1, 22), default=3, show_default=True, help="zstd level."
)
def copy_command(
    src: str, dst: str, no_verify: bool, overwrite: bool, compression: str, level: int
) -> int:
    """Copy the committed checkpoint at SRC to DST (paths, s3://, gs://).

    Streams the data files 16 MiB at a time, checks every chunk's checksum,
    and commits at DST with the same protocol as a save: an interrupted copy
    is never a checkpoint. Exit code 0 when copied, 1 when SRC is corrupt or
    not committed or DST already holds a checkpoint, 2 on other errors.
    """
    import distckpt
    from distckpt._tools import scan as _scan
    from distckpt.errors import DistckptError

    try:
        report = distckpt.copy(
            src,
            dst,
            verify=not no_verify,
            overwrite=overwrite,
            compression=None if compression == "none" else compression,
            compression_level=level,
        )
    except DistckptError as e:
        click.echo(f"FAILED: {e}", err=True)
        return EXIT_NEGATIVE
    except OSError as e:
        raise _error(e) from e
    click.echo(
        f"copied {report.source} -> {report.destination}: {report.files} file(s), "
        f"{_scan.format_bytes(report.bytes)} in {report.seconds:.2f} s"
        + ("" if no_verify else ", every checksum checked")
    )
    return EXIT_OK


@cli.command(
    "launch",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-n", "--num-processes", type=click.IntRange(min=1), required=True)
@click.option(
    "-d",
    "--devices-per-process",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPU devices each process simulates.",
)
@click.option(
    "--grace",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds the other processes get to exit after one fails, before SIGKILL.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def launch_command(
    num_processes: int, devices_per_process: int, grace: float, command: tuple[str, ...]
) -> int:
    """Run COMMAND as N local processes of one JAX job on CPU devices.

    Example: distckpt launch -n 2 -d 4 -- python examples/train_mlp.py --dir /tmp/ckpt

    Each process gets a coordinator on 127.0.0.1 and a free port, its process
    id and the process count (DISTCKPT_* and JAX_* variables, read by
    distckpt.initialize()), K CPU devices and gloo collectives. Output lines
    are prefixed with [pN]; SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 are
    forwarded to every process. Exits with the first non-zero exit code of a
    process, after stopping the others (none is left behind), or 0.
    """
    from distckpt import launch

    return launch.run(command, num_processes, devices_per_process, grace_s=grace)


if __name__ == "__main__":
    sys.exit(main())
