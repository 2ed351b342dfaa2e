"""`harness run | validate | list | show | bench`: one small function per subcommand."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter

from rich.console import Console
from rich.markup import escape

from harness.errors import HarnessError

console = Console(stderr=True, soft_wrap=True)  # log lines are never folded
DEFAULT_STORE = "store"
EXIT_FAILED_CELLS = 3  # `harness run`: every cell ran, but some ended failed (their rows say why)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 CPUs or a window of 0 cells would hang)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def cmd_validate(args) -> int:
    from harness.cells import stage_counts
    from harness.grid import expand_cells, load_scenario

    scenario = load_scenario(args.scenario, args.max_cells)
    cells = expand_cells(scenario, args.scenario, args.max_cells)
    stages = stage_counts(cells)
    stages["verify"] = len(cells)
    print(f"{args.scenario}: ok — scenario {scenario.name!r}, {len(cells)} cells")
    print("  distinct stage tasks: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    for what, count in (
        ("method", Counter(c.method for c in cells)),
        ("attack", Counter(c.attack for c in cells)),
    ):
        print(f"  cells per {what}: " + ", ".join(f"{k} {v}" for k, v in sorted(count.items())))
    return 0


def cmd_run(args) -> int:
    from harness import scheduler
    from harness.fs import check_writable
    from harness.grid import expand_cells, load_scenario
    from results.store import ok_cell_ids

    scenario = load_scenario(args.scenario, args.max_cells)
    cells = expand_cells(scenario, args.scenario, args.max_cells)
    check_writable(args.store)
    done = ok_cell_ids(args.store)
    todo = sum(c.cell_id not in done for c in cells)
    console.print(
        f"[bold]{scenario.name}[/bold]: {len(cells)} cells, {len(cells) - todo} already stored, "
        f"{todo} to run → store {args.store}"
    )
    if todo and args.address and "://" not in args.store:
        console.print(
            f"[yellow]note:[/yellow] store {args.store!r} is a local path: on a "
            "multi-node cluster it must be shared storage (NFS) or s3:// / gs://, "
            "or each worker writes its rows to its own disk"
        )
    if todo:
        _start_ray(scheduler, scenario, args)
        summary = _run_with_progress(scheduler, scenario, cells, args)
        console.print(
            f"done in {summary.seconds:.1f}s: {summary.ok} ok, {summary.failed} failed "
            f"(run {summary.run_id})"
            + (f"; {summary.done_elsewhere} stored by another driver meanwhile"
               if summary.done_elsewhere else "")
        )
        for cell_id, error in list(summary.failures.items())[:10]:
            console.print(f"  [red]failed[/red] {cell_id[:12]}: {escape(error)}")
        if len(summary.failures) > 10:
            console.print(f"  … and {len(summary.failures) - 10} more (harness show --failed)")
    rows = _show(args.store, scenario.name)
    store_sections(args.store, rows)  # for `harness report`, which reads the store alone
    if todo and summary.missing:
        console.print(
            f"[red]{len(summary.missing)} cells reported ok are missing from the store[/red] "
            "(rows deleted while the run went on?): exit code "
            f"{EXIT_FAILED_CELLS}; run again to recompute them"
        )
        return EXIT_FAILED_CELLS
    if todo and summary.failed:
        console.print(
            f"[red]{summary.failed} of {len(cells)} cells failed[/red]: exit code "
            f"{EXIT_FAILED_CELLS}; `harness show {args.store} --failed` prints their tracebacks"
        )
        return EXIT_FAILED_CELLS
    return 0


def _start_ray(scheduler, scenario, args) -> None:
    """Join or start Ray, then check that every stage's resource request fits a node."""
    scheduler.connect(args.address, args.num_cpus)
    _handle_sigterm()  # again: `ray.init` installs its own handler, which aborts the driver
    stages = ("train", "embed", "attack", "verify")
    for warning in scheduler.check_resources(scenario.resources, stages):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _run_with_progress(scheduler, scenario, cells, args):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=args.no_progress) as bar:
        task = bar.add_task("starting", total=len(cells))
        logged = {"at": time.monotonic(), "done": -1}

        def update(summary, running: int) -> None:
            done = summary.skipped + summary.ok + summary.failed
            text = f"ok {summary.ok} · failed {summary.failed} · running {running}"
            bar.update(task, completed=done, description=text)
            quiet = time.monotonic() - logged["at"] < 15 and done < len(cells)
            if (
                not console.is_terminal
                and not args.no_progress
                and not quiet
                and done != logged["done"]
            ):
                console.print(f"{done}/{len(cells)} cells: {text}")  # logs and pipes get lines
                logged.update(at=time.monotonic(), done=done)

        return scheduler.run_cells(
            cells,
            args.store,
            resources=scenario.resources,
            max_retries=scenario.max_retries,
            max_in_flight=args.max_in_flight or scenario.max_in_flight,
            manifest={"scenario": scenario.model_dump(mode="json"), "scenario_file": args.scenario},
            progress=update,
        )


def plugin_tables(df) -> list[tuple[type, object]]:
    """Each registered plug-in that has rows here with its own summary table over its ok rows
    (`summary_table`)."""
    from harness.attacks import ATTACKS
    from harness.methods import METHODS

    tables = []
    for column, registry in (("method", METHODS), ("attack", ATTACKS)):
        for name in registry.list():
            cls = registry.get(name)
            rows = df[(df["status"] == "ok") & (df[column] == name)]
            if rows.empty or cls.summary_title is None:
                continue
            table = cls.summary_table(rows)
            if table is not None and not table.empty:
                tables.append((cls, table))
    return tables


def store_sections(store: str, df=None) -> None:
    """Store what `harness report` needs of the plug-ins (it never imports them): every
    registered plug-in's declarations and, per scenario of the store, their summary tables."""
    from harness.attacks import ATTACKS
    from harness.methods import METHODS
    from results import load
    from results.analysis import scenario_rows
    from results.store import write_sections

    df = load(store) if df is None else df
    plugins = {
        f"{registry.get(n).kind}-{n}": registry.get(n).describe()
        for registry in (METHODS, ATTACKS)
        for n in registry.list()
    }
    for scenario, (rows, _) in scenario_rows(df).items():  # as the report groups them
        tables = {f"{cls.kind}-{cls.name}": table for cls, table in plugin_tables(rows)}
        write_sections(store, scenario, plugins, tables, len(rows))


def _show(
    store: str,
    scenario: str | None = None,
    by: tuple[str, ...] = ("method", "attack"),
    fmt: str = "table",
):
    """Print the store's tables; returns the whole store's rows (read once)."""
    from results import load
    from results.analysis import summary
    from results.report import markdown, render

    rows = df = load(store)
    if scenario:
        df = df[df["scenario"] == scenario]
    title = f"{store}" + (f" · {scenario}" if scenario else "")
    tables = [(title, summary(df, by))]
    if not df.empty:
        tables += [(cls.summary_title, table) for cls, table in plugin_tables(df)]
    for name, table in tables:
        if fmt == "markdown":
            print(f"\n**{name}**\n\n{markdown(table)}")
        elif fmt == "csv":
            print(table.to_csv(index=False))
        else:
            render(table, title=name, console=Console())
    return rows


def _show_failed(store: str, scenario: str | None) -> int:
    """Every failed cell of the store with its error and traceback (newest row per cell)."""
    from results import load

    df = load(store)
    if scenario:
        df = df[df["scenario"] == scenario]
    failed = df[df["status"] == "failed"] if not df.empty else df
    if failed.empty:
        print("no failed cells")
        return 0
    for row in failed.itertuples(index=False):
        print(f"=== {row.cell_id[:12]} {row.scenario} {row.arch} {row.method} {row.attack} "
              f"seed {row.seed}")
        print(row.error)
        trace = getattr(row, "traceback", None)
        if isinstance(trace, str) and trace:
            print(trace.rstrip())
    print(f"{len(failed)} failed cell(s)")
    return 0


def cmd_show(args) -> int:
    if args.failed:
        return _show_failed(args.store, args.scenario)
    by = ("arch", "method", "attack") if args.by_arch else ("method", "attack")
    _show(args.store, args.scenario, by, args.format)
    return 0


def cmd_report(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from results.reporting import build  # reads the store alone: no Ray, no torch

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("report", total=1)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total)

        path = build(args.store, args.scenario, args.out, args.format, progress)
    console.print(f"report -> {path} (figures: PNG + PDF under figures/, tables: CSV)")
    return 0


def cmd_list(args) -> int:
    import fnmatch

    from harness.attacks import ATTACKS
    from harness.data import DATASETS
    from harness.methods import METHODS
    from model_zoo import list_archs
    from model_zoo.image2image import list_image2image

    names = {
        "methods": METHODS.list,
        "attacks": ATTACKS.list,
        "datasets": DATASETS.list,
        "archs": list_archs,
        "image2image": list_image2image,
    }[args.what]()
    print("\n".join(n for n in names if fnmatch.fnmatch(n, args.filter)))
    return 0


def cmd_tune(args) -> int:
    from harness import scheduler, tuning
    from harness.errors import ConfigError
    from harness.fs import check_writable
    from harness.grid import load_scenario

    scenario = load_scenario(args.scenario, args.max_cells)
    if scenario.tune is None:
        raise ConfigError(
            "no `tune:` section: nothing to search", file=args.scenario, field="tune", value=None
        )
    check_writable(args.store)
    _start_ray(scheduler, scenario, args)

    def run(cells) -> None:
        scheduler.run_cells(
            cells,
            args.store,
            resources=scenario.resources,
            max_retries=scenario.max_retries,
            max_in_flight=args.max_in_flight or scenario.max_in_flight,
        )

    objective = tuning.objective_name(scenario)

    def report(result, study) -> None:
        best = tuning.best_feasible(study)
        params = ", ".join(_fmt_value(k, v) for k, v in result.params.items())
        figures = "  ".join(
            f"{k} {v:.3f}" for k, v in result.figures.items() if k != objective
        )
        value = "-" if result.value is None else f"{result.value:+.4f}"
        console.print(
            f"trial {result.number:3d} {result.state:8s} {objective} {value}  {figures}  "
            f"({params})" + (f"  (best: trial {best.number}, {best.value:+.4f})" if best else "")
        )

    for part in tuning.studies(scenario):  # `tune.per`: one study per method / arch
        if part is not scenario:
            console.print(f"[bold]study {part.name}[/bold]")
        study = tuning.tune(
            part,
            args.store,
            run,
            trials=args.trials,
            parallel=args.parallel,
            storage=args.storage,
            on_trial=report,
            max_cells=args.max_cells,
        )
        store_sections(args.store)  # for `harness report`, which reads the store alone
        out = tuning.best_fragment_path(args.store, part)
        fragment = tuning.write_best(study, part, out)
        if fragment is None:
            constraints = ", ".join(f"{k} {v}" for k, v in part.tune.constraints.items())
            console.print(f"[yellow]no feasible trial yet[/yellow] (constraints: {constraints})")
            continue
        console.print(f"best parameters -> {out}")
        print(yaml_dump(fragment))
    return 0


def _fmt_value(name: str, value) -> str:
    return f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"


def yaml_dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def cmd_compact(args) -> int:
    from results.store import compact

    merged = compact(args.store)
    print(f"{args.store}: merged {merged} per-cell files into one file per partition")
    return 0


def cmd_check(args) -> int:
    """Every unreadable row file and every artifact that fails its content hash; `--repair`
    removes them (their cells run again on the next `harness run`). Exit 1 when something
    is wrong and was not repaired."""
    from harness.artifacts import check_store_artifacts, remove_folder
    from harness.fs import open_store
    from results.store import stale_temp_files, unreadable_files

    n_rows, rows = unreadable_files(args.store)
    n_artifacts, artifacts = check_store_artifacts(args.store)
    temps = stale_temp_files(args.store)
    for path in rows:
        print(f"unreadable row file: {path}")
    for folder, why in artifacts:
        print(f"bad artifact {folder}: {why}")
    for path in temps:
        print(f"stale temp file: {path}")
    print(
        f"{args.store}: {n_rows} row files ({len(rows)} unreadable), {n_artifacts} artifacts "
        f"({len(artifacts)} bad), {len(temps)} stale temp files"
    )
    if not (rows or artifacts or temps):
        return 0
    if not args.repair:
        print("run `harness check --repair` to remove them (their cells are recomputed)")
        return 1
    fs, _ = open_store(args.store)
    for path in rows + temps:
        fs.delete_file(path)
    removed: set[str] = set()
    while artifacts:  # an artifact pointing to a removed model goes too (next pass finds it)
        for folder in dict.fromkeys(folder for folder, _ in artifacts):
            remove_folder(args.store, folder)
            removed.add(folder)
        artifacts = check_store_artifacts(args.store)[1]
    print(f"removed {len(rows)} row files, {len(removed)} artifacts and {len(temps)} temp "
          "files; `harness run` recomputes what they held")
    return 0


def cmd_bench(args) -> int:
    from harness import bench

    bench.main(args.what, args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness", description="wmbench: watermark robustness grids on Ray"
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every cell of a scenario (resumes)")
    run.add_argument("scenario")
    run.add_argument(
        "--store", default=DEFAULT_STORE, help="local path or s3://, gs:// (default: ./store)"
    )
    run.add_argument(
        "--address",
        default=None,
        help="join a Ray cluster (auto, ray://...); default: embedded local Ray",
    )
    run.add_argument(
        "--num-cpus", type=positive_int, default=None, help="CPUs for the embedded local Ray"
    )
    run.add_argument(
        "--max-in-flight", type=positive_int, default=None,
        help="cells submitted at once (default: 16 per CPU of the cluster, at least 64)",
    )
    run.add_argument("--no-progress", action="store_true")
    max_cells_help = "refuse a grid of more cells, before expanding it (default: 1,000,000)"
    run.add_argument("--max-cells", type=positive_int, default=1_000_000, help=max_cells_help)
    run.set_defaults(fn=cmd_run)
    val = sub.add_parser("validate", help="check a scenario and count its cells and stage tasks")
    val.add_argument("scenario")
    val.add_argument("--max-cells", type=positive_int, default=1_000_000, help=max_cells_help)
    val.set_defaults(fn=cmd_validate)
    lst = sub.add_parser("list", help="registered names")
    lst.add_argument(
        "what", choices=["methods", "attacks", "archs", "image2image", "datasets"]
    )
    lst.add_argument("--filter", default="*", help="glob, e.g. 'resnet*'")
    lst.set_defaults(fn=cmd_list)
    show = sub.add_parser("show", help="method x attack table of a store")
    show.add_argument("store", nargs="?", default=DEFAULT_STORE)
    show.add_argument("--scenario", default=None)
    show.add_argument("--by-arch", action="store_true", help="one row per architecture too")
    show.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    show.add_argument(
        "--failed", action="store_true", help="print every failed cell's error and traceback"
    )
    show.set_defaults(fn=cmd_show)
    tune = sub.add_parser(
        "tune", help="Optuna over a method's or an attack's parameters (the `tune:` section)"
    )
    tune.add_argument("scenario")
    tune.add_argument(
        "--trials", type=positive_int, default=8, help="finished trials the study should hold"
    )
    tune.add_argument(
        "--parallel", type=positive_int, default=2, help="trials whose cells run at once"
    )
    tune.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: a journal file path or an RDB URL shared by drivers "
        "(default: STORE/optuna/journal.log)",
    )
    tune.add_argument("--store", default=DEFAULT_STORE)
    tune.add_argument("--address", default=None)
    tune.add_argument("--num-cpus", type=positive_int, default=None)
    tune.add_argument("--max-in-flight", type=positive_int, default=None)
    tune.add_argument(
        "--max-cells", type=positive_int, default=1_000_000,
        help="refuse a trial grid of more cells, before expanding it (default: 1,000,000)",
    )
    tune.set_defaults(fn=cmd_tune)
    rep = sub.add_parser(
        "report", help="one HTML page (or Markdown) of a store: decision statistics, figures"
    )
    rep.add_argument("store", nargs="?", default=DEFAULT_STORE)
    rep.add_argument("--scenario", default=None, help="only this scenario (default: all)")
    rep.add_argument("--out", default="report", help="folder to write (default: ./report)")
    rep.add_argument("--format", choices=["html", "markdown"], default="html")
    rep.set_defaults(fn=cmd_report)
    comp = sub.add_parser("compact", help="merge per-cell Parquet files (fast scans of big stores)")
    comp.add_argument("store", nargs="?", default=DEFAULT_STORE)
    comp.set_defaults(fn=cmd_compact)
    check = sub.add_parser(
        "check", help="find unreadable row files and artifacts failing their content hash"
    )
    check.add_argument("store", nargs="?", default=DEFAULT_STORE)
    check.add_argument("--repair", action="store_true", help="remove what is found")
    check.set_defaults(fn=cmd_check)
    bench = sub.add_parser("bench", help="speed figures (printed, never asserted)")
    bench.add_argument("what", choices=["scheduler", "store", "train", "all"])
    bench.add_argument("--cells", type=positive_int, default=1000)
    bench.add_argument("--rows", type=positive_int, default=100_000)
    bench.add_argument("--arch", default="resnet10t", help="train: the network")
    bench.add_argument("--steps", type=int, default=30, help="train: steps per run")
    bench.add_argument("--batch", type=int, default=64, help="train: batch size")
    bench.set_defaults(fn=cmd_bench)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop): handled exactly like Ctrl-C."""


TERMINATED = []  # set by SIGTERM: Ray may re-raise our Terminated as a plain KeyboardInterrupt


def _on_sigterm(signum, frame) -> None:
    TERMINATED.append(signum)
    raise Terminated()


def _handle_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _handle_sigterm()
    try:
        return args.fn(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(
            "interrupted: running tasks cancelled; finished cells are stored, re-run to resume",
            file=sys.stderr,
        )
        return 143 if isinstance(e, Terminated) or TERMINATED else 130
    except BrokenPipeError:  # `harness show | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
