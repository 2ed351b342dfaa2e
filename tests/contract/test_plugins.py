"""Every registered method x attack on tiny data, in-process (no Ray).

Driven by the registries: a new method or attack is picked up with no edit here; give it
small parameters in TINY_PARAMS if its defaults are too slow for a unit-sized run.
"""

from __future__ import annotations

import pytest

from harness.artifacts import ArtifactStore
from harness.attacks import ATTACKS
from harness.cells import Cell
from harness.config import DatasetCfg, TrainCfg
from harness.methods import METHODS, create_method
from harness.stages import _context, run_cell

TINY_PARAMS = {
    "trigger_set": {"n_keys": 20, "n_null": 2, "epochs": 6},
    "discriminative": {"n_keys": 20, "steps": 200, "alpha": 0.002, "n_control": 20},
    "fine_tune": {"epochs": 1},
    "prune": {"sparsity": 0.5},
    "distill": {"epochs": 1, "student_arch": "lenet"},
}
DATASET = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=3, batch_size=32, lr=0.05)
VOLATILE = {"run_id", "created_at", "duration_s", "stage_seconds", "node", "git_sha"}


def make_cell(method: str, attack: str, seed: int = 0) -> Cell:
    mp = METHODS.get(method).Params(**TINY_PARAMS.get(method, {})).model_dump(mode="json")
    ap = ATTACKS.get(attack).Params(**TINY_PARAMS.get(attack, {})).model_dump(mode="json")
    return Cell(
        "contract",
        DATASET.model_dump(mode="json"),
        TRAIN.model_dump(mode="json"),
        "lenet",
        method,
        mp,
        attack,
        ap,
        seed,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("contract-store"))


@pytest.mark.parametrize("attack", ATTACKS.list())
@pytest.mark.parametrize("method", METHODS.list())
def test_every_method_survives_every_attack_as_a_valid_row(method, attack, store):
    row = run_cell(make_cell(method, attack), store)
    assert row["status"] == "ok", row.get("error")
    assert 0.0 <= row["task_score_attacked"] <= 1.0
    assert row["wm_metric"] == METHODS.get(method).wm_metric
    if row["wm_metric"] is not None:
        assert row["wm_score_attacked"] is not None and row["wm_threshold"] is not None


WEIGHT_MARKING = [
    m for m in METHODS.list() if METHODS.get(m).wm_metric and METHODS.get(m).marks_weights
]


@pytest.mark.parametrize("method", WEIGHT_MARKING)
def test_marked_model_is_detected_and_unmarked_is_not(method, store):
    cell = make_cell(method, "identity")
    row = run_cell(cell, store)
    assert row["wm_detected"], f"{method}: marked model not detected ({row['wm_score_attacked']})"
    artifacts = ArtifactStore(store)
    victim, spec = artifacts.load_model(artifacts.load_meta("train_victim", cell.victim_key()))
    secret = artifacts.load_secret("embed", cell.embed_key())
    score = create_method(method, cell.method_params).verify(
        victim, secret, _context(cell, "cpu", spec)
    )
    assert not score.detected, f"{method}: unmarked victim detected ({score.score})"


@pytest.mark.parametrize("method", METHODS.list())
def test_same_seed_gives_the_same_row(method, tmp_path):
    cell = make_cell(method, "fine_tune")
    first = run_cell(cell, str(tmp_path / "a"))
    second = run_cell(cell, str(tmp_path / "b"))
    assert {k: v for k, v in first.items() if k not in VOLATILE} == {
        k: v for k, v in second.items() if k not in VOLATILE
    }


def test_plugins_declare_pydantic_params_with_defaults():
    for registry in (METHODS, ATTACKS):
        for name in registry.list():
            cls = registry.get(name)
            assert cls.Params().model_config.get("extra") == "forbid", name
