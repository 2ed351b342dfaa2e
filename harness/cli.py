"""`harness run | validate | list | show | bench`: one small function per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from rich.console import Console

from harness.errors import HarnessError

console = Console(stderr=True)
DEFAULT_STORE = "store"


def cmd_validate(args) -> int:
    from harness.cells import expand_cells
    from harness.config import load_scenario

    scenario = load_scenario(args.scenario)
    cells = expand_cells(scenario, args.scenario)
    victims = {c.victim_key(s) for c in cells for s in (c.seed, *c.null_seeds())}
    stages = {
        "train_victim": len(victims),
        "embed": len({c.embed_key() for c in cells}),
        "attack": len({c.attack_key() for c in cells}),
        "verify": len(cells),
    }
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
    from harness.cells import expand_cells
    from harness.config import load_scenario
    from results.store import ok_cell_ids

    scenario = load_scenario(args.scenario)
    cells = expand_cells(scenario, args.scenario)
    done = ok_cell_ids(args.store)
    todo = sum(c.cell_id not in done for c in cells)
    console.print(
        f"[bold]{scenario.name}[/bold]: {len(cells)} cells, {len(cells) - todo} already stored, "
        f"{todo} to run → store {args.store}"
    )
    if todo:
        scheduler.connect(args.address, args.num_cpus)
        summary = _run_with_progress(scheduler, scenario, cells, args)
        console.print(
            f"done in {summary.seconds:.1f}s: {summary.ok} ok, {summary.failed} failed "
            f"(run {summary.run_id})"
        )
        for cell_id, error in list(summary.failures.items())[:10]:
            console.print(f"  [red]failed[/red] {cell_id[:12]}: {error}")
    _show(args.store, scenario.name)
    return 0


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
        bar.update(task, completed=0)

        def update(summary, running: int) -> None:
            done = summary.skipped + summary.ok + summary.failed
            bar.update(
                task,
                completed=done,
                description=f"ok {summary.ok} · failed {summary.failed} · running {running}",
            )

        return scheduler.run_cells(
            cells,
            args.store,
            resources=scenario.resources,
            max_retries=scenario.max_retries,
            max_in_flight=args.max_in_flight or scenario.max_in_flight,
            manifest={"scenario": scenario.model_dump(mode="json"), "scenario_file": args.scenario},
            progress=update,
        )


def _show(
    store: str, scenario: str | None = None, by: tuple[str, ...] = ("method", "attack")
) -> None:
    from results import load
    from results.analysis import summary
    from results.report import render

    df = load(store)
    if scenario:
        df = df[df["scenario"] == scenario]
    render(
        summary(df, by),
        title=f"{store}" + (f" · {scenario}" if scenario else ""),
        console=Console(),
    )


def cmd_show(args) -> int:
    by = ("arch", "method", "attack") if args.by_arch else ("method", "attack")
    _show(args.store, args.scenario, by)
    return 0


def cmd_list(args) -> int:
    import fnmatch

    from harness.attacks import ATTACKS
    from harness.data import DATASETS
    from harness.methods import METHODS
    from model_zoo import list_archs

    names = {
        "methods": METHODS.list,
        "attacks": ATTACKS.list,
        "datasets": DATASETS.list,
        "archs": list_archs,
    }[args.what]()
    print("\n".join(n for n in names if fnmatch.fnmatch(n, args.filter)))
    return 0


def cmd_compact(args) -> int:
    from results.store import compact

    merged = compact(args.store)
    print(f"{args.store}: merged {merged} per-cell files into one file per partition")
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
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded local Ray")
    run.add_argument("--max-in-flight", type=int, default=None, help="cells submitted at once")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(fn=cmd_run)
    val = sub.add_parser("validate", help="check a scenario and count its cells and stage tasks")
    val.add_argument("scenario")
    val.set_defaults(fn=cmd_validate)
    lst = sub.add_parser("list", help="registered names")
    lst.add_argument("what", choices=["methods", "attacks", "archs", "datasets"])
    lst.add_argument("--filter", default="*", help="glob, e.g. 'resnet*'")
    lst.set_defaults(fn=cmd_list)
    show = sub.add_parser("show", help="method x attack table of a store")
    show.add_argument("store", nargs="?", default=DEFAULT_STORE)
    show.add_argument("--scenario", default=None)
    show.add_argument("--by-arch", action="store_true", help="one row per architecture too")
    show.set_defaults(fn=cmd_show)
    comp = sub.add_parser("compact", help="merge per-cell Parquet files (fast scans of big stores)")
    comp.add_argument("store", nargs="?", default=DEFAULT_STORE)
    comp.set_defaults(fn=cmd_compact)
    bench = sub.add_parser("bench", help="speed figures (printed, never asserted)")
    bench.add_argument("what", choices=["scheduler", "store", "train", "all"])
    bench.add_argument("--cells", type=int, default=1000)
    bench.add_argument("--rows", type=int, default=100_000)
    bench.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted: running tasks cancelled; finished cells are stored, re-run to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
