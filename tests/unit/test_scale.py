"""Scale: grids counted before they are expanded (`--max-cells`), 10^5-cell validation, and the
scheduler's stage refs released once no cell to come needs them (checked here with recorded,
not real, task submissions; tests/integration/test_scale_refs.py runs it on Ray).

Time and memory figures are printed (`pytest -s` shows them), never asserted."""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import harness.grid
from harness.cells import distinct_jobs, job_keys, stage_counts
from harness.cli import main
from harness.config import Resources, load_yaml_with_includes, parse_scenario
from harness.errors import ConfigError
from harness.executors import NOOP
from harness.grid import count_cells, expand_cells

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO_ROOT / "scenarios").glob("*.yaml"))

BASE: dict[str, Any] = {
    "name": "scale",
    "dataset": {"name": "synthetic", "image_size": 16, "channels": 1, "samples": 60},
    "train": {"epochs": 1, "batch_size": 32},
    "seeds": [0, 1],
    "archs": ["lenet"],
    "methods": ["none", {"name": "trigger_set", "params": {"n_keys": 5, "n_null": 2}}],
    "attacks": ["identity", {"name": "prune", "params": {"sparsity": [0.3, 0.6]}}],
}

# 10 archs x 1,000 seeds x 11 method points x 101 attack points = 11,110,000 cells
HUGE: dict[str, Any] = {
    **BASE,
    "name": "huge",
    "seeds": list(range(1000)),
    "archs": ["lenet", *[f"resnet{d}t" for d in (10, 14, 26)], "resnet18", "resnet34",
              "mobilenetv3_small_050", "mobilenetv3_small_075", "mobilenetv3_small_100",
              "efficientnet_b0"],
    "methods": [
        "none",
        {"name": "trigger_set", "params": {"n_keys": list(range(10, 110, 10))}},
    ],
    "attacks": [
        "identity",
        {"name": "prune", "params": {"sparsity": [i / 100 for i in range(100)]}},
    ],
}  # fmt: skip
HUGE_CELLS = 10 * 1000 * 11 * 101

# 10 archs x 100 seeds x 5 method points x 20 attack points = 100,000 cells
BIG: dict[str, Any] = {
    **BASE,
    "name": "big",
    "seeds": list(range(100)),
    "archs": HUGE["archs"],
    "methods": [
        "none",
        {"name": "trigger_set", "params": {"n_keys": [50, 100], "pattern": ["abstract", "noise"]}},
    ],
    "attacks": [
        "identity",
        {"name": "fine_tune", "params": {"mode": ["ftll", "ftal", "rtll", "rtal"],
                                         "epochs": [1, 2]}},
        {"name": "prune", "params": {"sparsity": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}},
        {"name": "quantize", "params": {"bits": [8, 6, 4, 3, 2]}},
    ],
}  # fmt: skip


def write(tmp_path: Path, data: dict, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def with_changes(**changes: Any) -> dict:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return data


# ------------------------------------------------------------------ --max-cells


@pytest.mark.parametrize("command", ["validate", "run", "tune"])
def test_a_grid_of_ten_million_cells_exits_2_before_any_cell_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch, command: str
) -> None:
    made = []
    real_cell = harness.grid.Cell
    monkeypatch.setattr(harness.grid, "Cell", lambda *a: made.append(a) or real_cell(*a))
    path = write(tmp_path, HUGE)
    store = tmp_path / "store"
    extra = {
        "validate": [],
        "run": ["--store", str(store), "--no-progress"],
        "tune": ["--store", str(store)],
    }[command]
    start, rss = time.perf_counter(), peak_rss_mb()
    assert main([command, str(path), *extra]) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    print(f"\n{command} of {HUGE_CELLS:,} cells refused in {seconds:.2f} s, "
          f"peak RSS {rss:.0f} -> {peak_rss_mb():.0f} MB")  # fmt: skip
    assert err.startswith("error: ") and str(path) in err
    assert "grid" in err and f"{HUGE_CELLS:,}" in err and "--max-cells" in err
    assert not made
    assert not store.exists()


def test_max_cells_is_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, BASE)  # 2 seeds x (1 + 1 method points) x 3 attack points = 12
    assert main(["validate", str(path), "--max-cells", "11"]) == 2
    err = capsys.readouterr().err
    assert "12 cells" in err and "--max-cells" in err and "grid" in err
    assert main(["validate", str(path), "--max-cells", "12"]) == 0
    assert "12 cells" in capsys.readouterr().out
    store = tmp_path / "store"
    assert main(["tune", str(path), "--store", str(store), "--max-cells", "11"]) == 2
    assert "12 cells" in capsys.readouterr().err and not store.exists()


def test_max_cells_below_one_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(write(tmp_path, BASE)), "--max-cells", "0"])
    assert exit_.value.code == 2


def test_expand_cells_refuses_too_many_cells_as_a_config_error() -> None:
    scenario = parse_scenario(HUGE)
    with pytest.raises(ConfigError) as err:
        expand_cells(scenario, "huge.yaml")
    assert err.value.field == "grid" and err.value.value == HUGE_CELLS
    assert count_cells(scenario) == HUGE_CELLS


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_count_equals_the_expanded_grid_on_every_shipped_scenario(path: Path) -> None:
    scenario = parse_scenario(load_yaml_with_includes(path))  # data roots need not exist here
    assert count_cells(scenario) == len(expand_cells(scenario))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"seeds": [0, 0, 1]},
        {"archs": ["lenet", "lenet", "resnet10t"]},
        {"methods": ["none", "none", {"name": "trigger_set", "params": {"n_keys": [5, 5, 6]}}]},
        {"attacks": ["prune", {"name": "prune", "params": {"sparsity": [0.5, 0.6]}}]},
        {"attacks": ["identity", {"name": "identity", "role": "benign"}, "identity"]},
        # an attack on passport models only: pairs with other methods are left out
        {
            "methods": ["none", "steg_passport"],
            "attacks": ["identity", "random_passport"],
            "archs": ["resnet18"],
        },
    ],
    ids=["plain", "seeds", "archs", "methods", "attack_points", "roles", "targeted"],
)
def test_count_equals_the_expanded_grid_with_duplicates_and_left_out_pairs(changes) -> None:
    scenario = parse_scenario(with_changes(**changes))
    assert count_cells(scenario) == len(expand_cells(scenario))


# ------------------------------------------------------------------ 10^5 cells


def test_validate_of_a_hundred_thousand_cells(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = write(tmp_path, BIG)
    start, rss = time.perf_counter(), peak_rss_mb()
    assert main(["validate", str(path)]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "'big', 100000 cells" in out
    assert "attack 100000" in out and "embed 5000" in out and "verify 100000" in out
    with capsys.disabled():
        print(f"\nvalidate of 100,000 cells: {seconds:.1f} s in-process (imports excluded), "
              f"peak RSS {rss:.0f} -> {peak_rss_mb():.0f} MB")  # fmt: skip


def test_stage_counts_match_distinct_jobs() -> None:
    for changes in ({}, {"seeds": [0, 1, 2, 3], "archs": ["lenet", "resnet10t"]}):
        cells = expand_cells(parse_scenario(with_changes(**changes)))
        expected: dict[str, int] = {}
        for job in distinct_jobs(cells).values():
            expected[job.stage] = expected.get(job.stage, 0) + 1
        assert dict(stage_counts(cells)) == expected


# ------------------------------------------------------------------ stage refs (no Ray)


class Recorder:
    """Stands in for a remote function: records each submission, returns a fake ref."""

    def __init__(self, log: list) -> None:
        self.log = log

    def remote(self, payload: bytes, *upstream):
        from harness import scheduler  # lazy: imports ray (never initialised here)

        head, key, _ = scheduler._unpack(payload)  # (stage, key) or (cell id, "verify")
        self.log.append((head if key != "verify" else "verify", key, upstream))
        return f"ref-{len(self.log)}"


def recorded_graph():
    from harness import scheduler  # lazy: imports ray (never initialised here)

    log: list = []
    graph = scheduler.StageGraph("store", Resources(), 2, NOOP, None, {"run_id": "r"})
    graph.tasks = {name: Recorder(log) for name in graph.tasks}
    return graph, log


@pytest.mark.parametrize(
    "path",
    [p for p in SHIPPED if p.stem in ("smoke", "passport_digits", "cross_model_digits")],
    ids=lambda p: p.stem,
)
def test_refs_are_released_once_no_cell_to_come_needs_them(path: Path) -> None:
    cells = expand_cells(parse_scenario(load_yaml_with_includes(path)))
    graph, log = recorded_graph()
    graph.plan(cells)
    held = []
    for cell in cells:
        graph.submit(cell)
        held.append(len(graph.refs))
        # every ref still held is needed by a cell to come
        later = set().union(*(job_keys(c.attack_job()) for c in cells[len(held) :]))
        assert set(graph.refs) <= later
    assert graph.refs == {} and graph.needed == {}
    stage_keys = [key for stage, key, _ in log if stage != "verify"]
    assert sorted(stage_keys) == sorted(distinct_jobs(cells))  # each key submitted once
    assert len(log) - len(stage_keys) == len(cells)
    print(f"\n{path.stem}: at most {max(held)} refs held over {len(cells)} cells")


def test_unplanned_cells_keep_their_refs() -> None:
    cells = expand_cells(parse_scenario(BASE))
    graph, log = recorded_graph()
    for cell in cells:
        graph.submit(cell)
    assert set(graph.refs) == set(distinct_jobs(cells))
