"""`stack`: attacks applied in order, each its own cached attack stage on the previous one's
model (`Attack.steps`), sharing its first steps with every cell that starts the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.stages import run_cell

DATA = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=2, batch_size=32, lr=0.05)
PRUNE = {"name": "prune", "params": {"sparsity": 0.6}}
FTAL = {"name": "fine_tune", "params": {"mode": "ftal", "epochs": 1}}


def _cell(attack: str, params: dict) -> Cell:
    return Cell(
        "stack", DATA.model_dump(mode="json"), TRAIN.model_dump(mode="json"), "lenet", "none",
        {}, attack, create_attack(attack, params).params.model_dump(mode="json"), 0,
    )  # fmt: skip


def test_a_stack_runs_each_step_on_the_last_and_shares_its_first_step(tmp_path, one_thread):
    store = str(tmp_path)
    stacked = _cell("stack", {"attacks": [PRUNE, FTAL]})
    pruned = _cell("prune", PRUNE["params"])
    job = stacked.attack_job()
    first = next(d for d in job.deps if d.stage == "attack")  # the step before: prune
    assert first.key == pruned.attack_key() and job.key == stacked.attack_key()
    assert job.names[:2] == ("marked", "previous") and job.deps[0].stage == "embed"

    row = run_cell(stacked, store)
    assert row["status"] == "ok", row.get("traceback")
    artifacts = ArtifactStore(store)
    assert artifacts.has("attack", pruned.attack_key())  # the pruned model is stored as such
    assert row["stage_seconds"]["attack_prior_steps"] > 0  # the cost of both steps
    alone = run_cell(pruned, store)  # the plain prune cell finds its stage done
    assert alone["status"] == "ok" and "attack" not in alone["stage_seconds"]
    assert "attack_prior_steps" not in alone["stage_seconds"]

    # the stacked model is the pruned one fine-tuned: the zeros of pruning are trained again
    p_model, _ = artifacts.load_model(artifacts.load_meta("attack", pruned.attack_key()))
    s_model, _ = artifacts.load_model(artifacts.load_meta("attack", stacked.attack_key()))
    p_zero = sum(int((p == 0).sum()) for p in p_model.parameters())
    s_zero = sum(int((p == 0).sum()) for p in s_model.parameters())
    assert s_zero < p_zero
    assert row["task_score_attacked"] >= alone["task_score_attacked"] - 0.05


def test_a_stack_ending_in_an_input_transform_keeps_the_last_model(tmp_path, one_thread):
    store = str(tmp_path)
    cell = _cell("stack", {"attacks": [PRUNE, {"name": "jpeg", "params": {"quality": 50}}]})
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    artifacts = ArtifactStore(store)
    pruned, _ = artifacts.load_model(
        artifacts.load_meta("attack", _cell("prune", PRUNE["params"]).attack_key())
    )
    final, spec = artifacts.load_model(artifacts.load_meta("attack", cell.attack_key()))
    assert spec.wrapper == "input_transform"
    for k, v in pruned.state_dict().items():  # jpeg left the pruned weights as they were
        assert torch.equal(v, final.state_dict()[k])


def _write(tmp_path: Path, attacks: list, methods=("none",)) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "st", "archs": ["lenet"], "methods": list(methods),
        "dataset": {"name": "synthetic", "image_size": 16, "channels": 1},
        "attacks": [{"name": "stack", "params": {"attacks": attacks}}],
    }))  # fmt: skip
    return str(path)


def test_lists_inside_the_steps_expand_the_grid(tmp_path, capsys):
    sweep = [{"name": "prune", "params": {"sparsity": [0.3, 0.6]}},
             {"name": "fine_tune", "params": {"mode": ["ftal", "rtal"], "epochs": 1}}]  # fmt: skip
    assert main(["validate", _write(tmp_path, sweep)]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out
    # 2 prunes shared by the 4 stacks: 6 attack stages
    assert "attack 6" in out


@pytest.mark.parametrize(
    ("attacks", "methods", "field", "text"),
    [([], ("none",), "attacks[0].params.attacks", "at least 1"),
     ([{"name": "prun"}], ("none",), "attacks[0].params.attacks[0].name", "prune"),
     ([{"name": "jpeg", "params": {"quality": 0}}], ("none",),
      "attacks[0].params.attacks[0].params.quality", "greater than or equal to 1"),
     ([{"name": "stack", "params": {"attacks": [PRUNE]}}], ("none",),
      "attacks[0].params.attacks[0].name", "cannot nest"),
     ([PRUNE, {"name": "random_passport"}], ("trigger_set",),
      "attacks[0].params.attacks[1].name", "applies to")],
)  # fmt: skip
def test_bad_stacks_exit_2_with_the_field_path(tmp_path, capsys, attacks, methods, field, text):
    assert main(["validate", _write(tmp_path, attacks, methods)]) == 2
    err = capsys.readouterr().err
    assert field in err and text in err, err


def test_every_step_queries_the_owners_deployment(tmp_path, one_thread, monkeypatch):
    """A later step's own model is the attacker's copy; the API it may query stays the
    owner's marked model."""
    from harness import stages

    served = []

    class Spy(stages.API):
        def __init__(self, model, device):
            served.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            super().__init__(model, device)

    monkeypatch.setattr(stages, "API", Spy)
    store = str(tmp_path)
    cell = _cell("stack", {"attacks": [PRUNE, {"name": "retrain", "params": {"epochs": 1}}]})
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    assert row["metrics"]["api_queries"] > 0  # retrain asked the API
    artifacts = ArtifactStore(store)
    marked, _ = artifacts.load_model(artifacts.load_meta("embed", cell.embed_key()))
    assert len(served) == 2  # prune's step, then retrain's
    for state in served:
        assert all(torch.equal(v, state[k]) for k, v in marked.state_dict().items())
