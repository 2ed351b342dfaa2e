"""Cell ids and stage keys: stable, sensitive to exactly what a stage depends on, deduplicated."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.attacks import ATTACKS
from harness.cells import Cell
from harness.config import parse_scenario
from harness.grid import expand_cells
from harness.methods import METHODS

BASE: dict[str, Any] = {
    "name": "unit",
    "dataset": {"name": "synthetic", "image_size": 16, "channels": 1, "samples": 60},
    "train": {"epochs": 1, "batch_size": 32},
    "seeds": [0, 1],
    "archs": ["lenet", "resnet10t"],
    "methods": ["none", {"name": "trigger_set", "params": {"n_keys": [5, 10]}}],
    "attacks": [
        "identity",
        {"name": "prune", "params": {"sparsity": [0.3, 0.6]}},
        {"name": "quantize", "params": {"bits": 4}},
    ],
}


def expand(**changes: Any) -> list[Cell]:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return expand_cells(parse_scenario(data))


def keys(cell: Cell) -> tuple[str, str, str, str]:
    return cell.victim_key(), cell.embed_key(), cell.attack_key(), cell.cell_id


@pytest.fixture(scope="module")
def cells() -> list[Cell]:
    return expand()


@pytest.fixture(scope="module")
def cell(cells: list[Cell]) -> Cell:
    return next(c for c in cells if c.method == "trigger_set" and c.attack == "prune")


def test_ids_are_hex_digests(cell: Cell) -> None:
    for key in keys(cell):
        assert len(key) == 32
        int(key, 16)


def test_ids_are_stable_within_and_across_expansions(cells: list[Cell]) -> None:
    assert [keys(c) for c in cells] == [keys(c) for c in cells]
    fresh = expand()
    assert [keys(c) for c in fresh] == [keys(c) for c in cells]


def test_ids_are_stable_across_processes(cell: Cell) -> None:
    """No dependence on Python's per-process hash seed or on import order."""
    code = (
        "import json, sys; from harness.cells import Cell; "
        "c = Cell.from_dict(json.loads(sys.argv[1])); "
        "print(c.victim_key(), c.embed_key(), c.attack_key(), c.cell_id)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cell.to_dict())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert tuple(out.split()) == keys(cell)


def test_dict_round_trip_and_key_order_do_not_matter(cell: Cell) -> None:
    assert keys(Cell.from_dict(cell.to_dict())) == keys(cell)
    shuffled = replace(
        cell,
        attack_params=dict(reversed(list(cell.attack_params.items()))),
        dataset=dict(reversed(list(cell.dataset.items()))),
    )
    assert keys(shuffled) == keys(cell)


def changed(cell: Cell, **changes: Any) -> Cell:
    return replace(cell, **changes)


@pytest.mark.parametrize(
    ("change", "first_changed"),
    [
        # (field changes, index of the first key in (victim, embed, attack, cell) that changes)
        (lambda c: changed(c, seed=c.seed + 1), 0),
        (lambda c: changed(c, arch="resnet10t" if c.arch == "lenet" else "lenet"), 0),
        (lambda c: changed(c, dataset={**c.dataset, "image_size": 24}), 0),
        (lambda c: changed(c, dataset={**c.dataset, "split_seed": 7}), 0),
        (lambda c: changed(c, train={**c.train, "lr": 0.123}), 0),
        (lambda c: changed(c, method_params={**c.method_params, "n_keys": 77}), 1),
        (lambda c: changed(c, method="none", method_params={}), 1),
        (lambda c: changed(c, attack_params={**c.attack_params, "sparsity": 0.9}), 2),
        (lambda c: changed(c, attack="identity", attack_params={}), 2),
        (lambda c: changed(c, scenario="other"), 3),
    ],
    ids=[
        "seed",
        "arch",
        "image_size",
        "split_seed",
        "train",
        "method_param",
        "method",
        "attack_param",
        "attack",
        "scenario",
    ],
)
def test_keys_change_exactly_from_the_stage_that_depends_on_a_field(
    cell: Cell, change, first_changed: int
) -> None:
    before, after = keys(cell), keys(change(cell))
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        assert (a != b) == (i >= first_changed), ("victim", "embed", "attack", "cell")[i]


def test_victim_key_is_independent_of_method_and_attack(cells: list[Cell]) -> None:
    victims: dict[tuple, set[str]] = {}
    for c in cells:
        victims.setdefault((c.arch, c.seed), set()).add(c.victim_key())
    assert all(len(v) == 1 for v in victims.values())
    assert len({next(iter(v)) for v in victims.values()}) == 2 * 2  # archs x seeds


def test_embed_key_is_independent_of_attack(cells: list[Cell]) -> None:
    marked: dict[tuple, set[str]] = {}
    for c in cells:
        marked.setdefault((c.arch, c.seed, c.method, json.dumps(c.method_params)), set()).add(
            c.embed_key()
        )
    assert all(len(v) == 1 for v in marked.values())
    assert len({c.attack_key() for c in cells}) == len(cells)


def test_plugin_version_bump_changes_downstream_keys(cell: Cell, monkeypatch) -> None:
    before = keys(cell)
    monkeypatch.setattr(ATTACKS.get(cell.attack), "version", "999")
    after_attack = keys(cell)
    assert after_attack[:2] == before[:2]
    assert after_attack[2] != before[2] and after_attack[3] != before[3]
    monkeypatch.setattr(METHODS.get(cell.method), "version", "999")
    after_method = keys(cell)
    assert after_method[0] == before[0]
    assert after_method[1] != before[1] and after_method[2] != after_attack[2]


def test_null_seed_victims_match_other_cells_victims(cells: list[Cell]) -> None:
    c = next(c for c in cells if c.method == "trigger_set")
    nulls = [job for job in c.embed_job().deps[1:] if job.stage == "train_victim"]
    assert nulls and all(job.cell.arch == c.arch and job.cell.seed != c.seed for job in nulls)
    for job in nulls:
        assert job.key == c.victim_key(job.cell.seed)
    seed1 = next(x for x in cells if x.arch == c.arch and x.seed == 1)
    assert c.victim_key(1) == seed1.victim_key()


def contiguous(labels: list[str]) -> bool:
    """Each label appears in one unbroken run."""
    runs = [label for label, _ in itertools.groupby(labels)]
    return len(runs) == len(set(runs))


def test_cells_sharing_a_victim_or_a_marked_model_are_adjacent(cells: list[Cell]) -> None:
    assert contiguous([c.victim_key() for c in cells])
    assert contiguous([c.embed_key() for c in cells])


def test_grid_has_no_duplicate_ids(cells: list[Cell]) -> None:
    assert len(cells) == 2 * 2 * 3 * 4
    assert len({c.cell_id for c in cells}) == len(cells)


@pytest.mark.parametrize(
    "changes",
    [
        {"seeds": [0, 0]},
        {"archs": ["lenet", "lenet"]},
        {"methods": ["none", "none"]},
        {"attacks": ["prune", {"name": "prune", "params": {"sparsity": 0.5}}]},
        {"attacks": [{"name": "prune", "params": {"sparsity": [0.5, 0.5]}}]},
        {
            "attacks": [
                {"name": "quantize", "params": {"bits": [8, 8], "granularity": "per_channel"}},
                "quantize",
            ]
        },
    ],
    ids=["seeds", "archs", "methods", "default_equals_explicit", "param_list", "mixed"],
)
def test_duplicate_grid_points_are_deduplicated(changes: dict) -> None:
    base = {"seeds": [0], "archs": ["lenet"], "methods": ["none"], "attacks": ["identity"]}
    cells = expand(**{**base, **changes})
    assert len(cells) == 1
    assert len({c.cell_id for c in cells}) == 1


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        # one ISN for the whole scenario; two victims (archs), no null models
        ("passport_digits", {"aux/steg_passport/isn": 1, "train_victim": 2, "embed": 2}),
        # stage 1 shared by the with / without adversarial-stage settings
        ("output_wm_small", {"aux/output_watermark/initial": 1, "embed": 2}),
        # one key set per source victim, whatever the targets
        ("cross_model_digits", {"aux/discriminative/keygen": 2, "train_victim": 2}),
        # null models are the victims of seeds 1-3, shared by both archs' cells of those seeds
        ("smoke", {"train_victim": 8, "embed": 4}),
    ],
)
def test_declared_aux_steps_keep_their_sharing(scenario, expected):
    from collections import Counter
    from pathlib import Path

    from harness.cells import distinct_jobs
    from harness.config import load_yaml_with_includes

    root = Path(__file__).resolve().parents[2]
    data = load_yaml_with_includes(root / "scenarios" / f"{scenario}.yaml")
    cells = expand_cells(parse_scenario(data))
    counts = Counter(job.stage for job in distinct_jobs(cells).values())
    assert {k: counts[k] for k in expected} == expected


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.yaml")),
    ids=lambda p: p.stem,
)
def test_every_shipped_scenario_parses_and_expands(path):
    """Schema, plug-in names and parameters, `reported:` entries and the grid of every shipped
    scenario (the data sets' roots are not needed: CIFAR scenarios are for users who have it)."""
    from harness.config import load_yaml_with_includes

    scenario = parse_scenario(load_yaml_with_includes(path), str(path))
    cells = expand_cells(scenario, str(path))
    assert cells and len({c.cell_id for c in cells}) == len(cells)
