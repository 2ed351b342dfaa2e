"""The CLI in-process: `validate`, `run` refusing bad input before touching the store, `list`."""

from __future__ import annotations

import copy
import fnmatch
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.attacks import ATTACKS
from harness.cli import main
from harness.data import DATASETS
from harness.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE = REPO_ROOT / "scenarios" / "smoke.yaml"

GOOD: dict[str, Any] = {
    "name": "cli",
    "dataset": {"name": "synthetic", "image_size": 16, "channels": 1, "samples": 60},
    "train": {"epochs": 1},
    "archs": ["lenet"],
    "methods": ["none"],
    "attacks": ["identity"],
}


def test_validate_smoke(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert f"{SMOKE}: ok" in out
    assert "'smoke', 32 cells" in out
    # victims: 2 archs x (seed 0 + 3 null seeds of trigger_set); marked: 2 archs x 2 methods
    for figure in ("train_victim 8", "embed 4", "attack 32", "verify 32"):
        assert figure in out
    assert "cells per method: none 16, trigger_set 16" in out
    assert "distill 4, fine_tune 8, identity 4, prune 8, quantize 8" in out


def test_validate_small_scenario(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", str(path)]) == 0
    assert "'cli', 1 cells" in capsys.readouterr().out


def with_changes(**changes: Any) -> dict:
    data = copy.deepcopy(GOOD)
    data.update(changes)
    return data


BAD_INPUTS = {
    "yaml_syntax": ("name: cli\narchs: [lenet\nmethods: [none]\n", "line 3"),
    "top_level_key": (with_changes(datset={"name": "digits"}), "datset"),
    "nested_key": (with_changes(train={"epoch": 1}), "train.epoch"),
    "arch": (with_changes(archs=["lenet", "resnet10"]), "archs[1]"),
    "method": (with_changes(methods=["trigger_sett"]), "methods[0].name"),
    "attack": (with_changes(attacks=["identity", "prun"]), "attacks[1].name"),
    "dataset": (with_changes(dataset={"name": "digit"}), "dataset.name"),
    "dataset_root": (with_changes(dataset={"name": "cifar10"}), "dataset.root"),
    "sparsity": (
        with_changes(attacks=[{"name": "prune", "params": {"sparsity": [0.5, 1.5]}}]),
        "attacks[0].params.sparsity",
    ),
    "bits": (
        with_changes(attacks=[{"name": "quantize", "params": {"bits": 17}}]),
        "attacks[0].params.bits",
    ),
    "literal": (
        with_changes(attacks=[{"name": "fine_tune", "params": {"mode": "ftxx"}}]),
        "attacks[0].params.mode",
    ),
    "student_arch": (
        with_changes(attacks=[{"name": "distill", "params": {"student_arch": "resnet10"}}]),
        "attacks[0].params.student_arch",
    ),
    "num_gpus": (with_changes(resources={"train": {"num_gpus": 1.5}}), "resources.train.num_gpus"),
    "include": (with_changes(include=5), "include"),
}


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, command: str
) -> None:
    content, field = BAD_INPUTS[kind]
    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    store = tmp_path / "store"
    args = [command, str(path)] + (
        ["--store", str(store), "--no-progress"] if command == "run" else []
    )
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert str(path) in captured.err
    assert field in captured.err
    assert "Traceback" not in captured.err
    assert not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_run_missing_scenario_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    missing = tmp_path / "missing.yaml"
    assert main(["run", str(missing), "--store", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "not found" in err
    assert not store.exists()


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("methods", METHODS.list()),
        ("attacks", ATTACKS.list()),
        (
            "datasets",
            DATASETS.list(),
        ),
        ("image2image", ["cnet", "resnet16", "resnet9", "unet", "timm_unet:<timm", "name>",
                         "<any", "of", "these>@<width>"]),
    ],
)
def test_list_registries(capsys: pytest.CaptureFixture, what: str, expected: list[str]) -> None:
    assert main(["list", what]) == 0
    assert capsys.readouterr().out.split() == expected


def test_list_with_filter(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "methods", "--filter", "t*"]) == 0
    assert capsys.readouterr().out.split() == ["trigger_set"]


def test_list_archs_with_filter(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "archs", "--filter", "resnet1*"]) == 0
    names = capsys.readouterr().out.split()
    assert {"resnet10t", "resnet14t", "resnet18", "resnet101", "resnet152"} <= set(names)
    assert all(fnmatch.fnmatch(n, "resnet1*") for n in names)
    assert names == sorted(names)
    assert "resnet26" not in names and "lenet" not in names


def test_list_archs_includes_own_networks(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "archs", "--filter", "lenet"]) == 0
    assert capsys.readouterr().out.split() == ["lenet"]


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_show_failed_prints_errors_with_tracebacks(tmp_path: Path, capsys) -> None:
    """A failed cell's row keeps its traceback; `harness show --failed` prints it."""
    from harness.cells import Cell
    from harness.stages import base_row
    from results.store import write_row

    cell = Cell("s", {"name": "digits"}, {}, "lenet", "none", {}, "identity", {}, 0)
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nCellFailed: boom'
    row = {**base_row(cell, "cpu", {}), "status": "failed", "error": "attack: boom"}
    write_row(str(tmp_path), {**row, "traceback": trace})
    ok = {**base_row(Cell("s", {"name": "digits"}, {}, "lenet", "none", {}, "identity", {}, 1),
                      "cpu", {})}  # fmt: skip
    write_row(str(tmp_path), ok)
    assert main(["show", str(tmp_path), "--failed"]) == 0
    out = capsys.readouterr().out
    assert "attack: boom" in out and "CellFailed: boom" in out and "1 failed cell(s)" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "x.yaml", "--num-cpus", "0"],
        ["run", "x.yaml", "--max-in-flight", "0"],
        ["run", "x.yaml", "--max-in-flight", "-3"],
        ["tune", "x.yaml", "--parallel", "0"],
        ["tune", "x.yaml", "--trials", "-1"],
        ["bench", "scheduler", "--cells", "0"],
    ],
)
def test_counts_below_one_exit_2_before_anything_starts(argv, capsys) -> None:
    """0 CPUs or a window of 0 cells would hang (or report '0 ok, 0 failed' with exit 0)."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`harness validate … | head -1`: the reader closes the pipe; no BrokenPipeError
    traceback, exit 0."""
    import subprocess
    import sys

    smoke = Path(__file__).resolve().parents[2] / "scenarios" / "smoke.yaml"
    proc = subprocess.run(
        f"{sys.executable} -m harness.cli validate {smoke} | head -c 10",
        shell=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
