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
from harness.training import TASK_METRIC

TINY_PARAMS = {
    "trigger_set": {"n_keys": 20, "n_null": 2, "epochs": 6},
    "discriminative": {"n_keys": 20, "steps": 200, "alpha": 0.002, "n_control": 20},
    "output_watermark": {
        "h_width": 8, "r_width": 8, "d_width": 8, "epochs": 20, "lr": 0.002, "batch_size": 8,
        "sim_arch": "cnet@8", "sim_epochs": 1, "r_epochs": 1,
    },
    "steg_passport": {
        "stages": ["features"], "n_users": 2, "isn_blocks": 1, "isn_growth": 8,
        "isn_steps": 30, "isn_pool": 32, "lr": 0.05,
    },
    "fine_tune": {"epochs": 1},
    "prune": {"sparsity": 0.5},
    "distill": {"epochs": 1, "student_arch": "lenet"},
    "surrogate": {"arch": "cnet@8", "epochs": 1},
    "erb_ambiguity": {"epochs": 1},
    "forged_user_passport": {"steps": 5},
    "forged_key": {"steps": 5},
}  # fmt: skip
# One tiny data set and network per task a plug-in can declare.
TASKS = {
    "classification": (
        DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4),
        TrainCfg(epochs=3, batch_size=32, lr=0.05),
        "lenet",
    ),
    "image2image": (
        DatasetCfg(name="photo_pairs", image_size=32, channels=3, samples=120),
        TrainCfg(epochs=2, batch_size=16, lr=1e-3, optimizer="adam"),
        "unet@8",
    ),
}
VOLATILE = {"run_id", "created_at", "duration_s", "stage_seconds", "node", "git_sha"}


def task_of(method: str) -> str:
    return METHODS.get(method).tasks[0]


def applies(method: str, attack: str) -> bool:
    a = ATTACKS.get(attack)
    return task_of(method) in a.tasks and (a.methods is None or method in a.methods)


def make_cell(method: str, attack: str, seed: int = 0) -> Cell:
    dataset, train, arch = TASKS[task_of(method)]
    mp = METHODS.get(method).Params(**TINY_PARAMS.get(method, {})).model_dump(mode="json")
    ap = ATTACKS.get(attack).Params(**TINY_PARAMS.get(attack, {})).model_dump(mode="json")
    return Cell(
        "contract",
        dataset.model_dump(mode="json"),
        train.model_dump(mode="json"),
        arch,
        method,
        mp,
        attack,
        ap,
        seed,
    )


PAIRS = [(m, a) for m in METHODS.list() for a in ATTACKS.list() if applies(m, a)]


def test_every_plugin_is_exercised():
    assert {m for m, _ in PAIRS} == set(METHODS.list())
    assert {a for _, a in PAIRS} == set(ATTACKS.list())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("contract-store"))


@pytest.mark.parametrize(("method", "attack"), PAIRS)
def test_every_method_survives_every_attack_as_a_valid_row(method, attack, store):
    row = run_cell(make_cell(method, attack), store)
    assert row["status"] == "ok", row.get("error")
    assert row["task_metric"] == TASK_METRIC[task_of(method)]
    if row["task_metric"] == "accuracy":
        assert 0.0 <= row["task_score_attacked"] <= 1.0
    else:
        assert 5.0 < row["task_score_attacked"] < 60.0  # PSNR in dB of a (poorly) trained net
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
    attack = "fine_tune" if applies(method, "fine_tune") else "identity"
    cell = make_cell(method, attack)
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
