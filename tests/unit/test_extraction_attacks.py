"""Extraction attacks through the served API: knockoff (another distribution's images only,
random or adaptive selection), retrain (from scratch, on the served soft answers), transfer
(a proxy label space and back, same arch) and ensemble (k members averaged, stored and
rebuilt) - at unit level on a tiny trained lenet, as real cells, and bad input (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.attacks.ensemble import Ensemble, EnsembleAttack
from harness.attacks.knockoff import KnockoffParams, adaptive_queries
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.context import Context
from harness.data import load_splits
from harness.methods import create_method
from harness.serving import API
from harness.stages import run_cell
from harness.training import accuracy, predict_logits, seed_everything, train_classifier
from model_zoo import ModelSpec, create_model

DATA = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=3, batch_size=32, lr=0.05)
CHANCE = 1 / DATA.num_classes


class SpyAPI(API):
    """The served API, keeping every batch of queries it was sent."""

    def __init__(self, model, shift: int = 0) -> None:
        super().__init__(model, "cpu")
        self.sent: list[torch.Tensor] = []
        self.shift = shift  # answers' classes rolled by `shift`: a deployment that lies

    def __call__(self, x):
        self.sent.append(x.clone())
        return super().__call__(x).roll(self.shift, dims=1)


@pytest.fixture(scope="module")
def victim():
    torch.set_num_threads(1)
    splits = load_splits(DATA)
    spec = ModelSpec("lenet", splits.num_classes, splits.channels, splits.image_size)
    seed_everything(0)
    model = create_model(spec)
    train_classifier(model, splits.owner, TRAIN, "cpu", 0)
    assert accuracy(model, splits.test, "cpu") > 0.9
    return model, splits, spec


def _attack(name: str, params: dict, victim, shift: int = 0):
    """Run attack `name` on a copy of the victim as served by a spying API."""
    model, splits, spec = victim
    marked = create_model(spec)
    marked.load_state_dict(model.state_dict())
    api = SpyAPI(marked.eval(), shift)
    ctx = Context(data=splits, train=TRAIN, spec=spec, device="cpu", seed=0, api=api)
    seed_everything(0)
    return marked, create_attack(name, params).apply(marked, ctx), api


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in x}


def test_knockoff_asks_only_transfer_images_and_learns_the_task(victim, one_thread):
    _, splits, _ = victim
    marked, out, api = _attack("knockoff", {"query_budget": 1500, "epochs": 4}, victim)
    sent = torch.cat(api.sent)
    assert api.queries == len(sent) == 1500 and out.metrics["transfer_pool"] == 1500
    task_images = _rows(splits.attacker.x) | _rows(splits.owner.x) | _rows(splits.test.x)
    assert not _rows(sent) & task_images  # not one image of the task's data was sent
    assert out.model is not marked and out.spec.arch == "lenet"
    assert accuracy(out.model, splits.test, "cpu") > 2.5 * CHANCE  # learnt from photos alone


def test_adaptive_knockoff_spends_the_budget_on_the_confident_groups(victim, one_thread):
    params = {"query_budget": 300, "pool_size": 1200, "epochs": 1}
    _, randomly, _ = _attack("knockoff", params, victim)
    _, adaptive, api = _attack("knockoff", {**params, "selection": "adaptive"}, victim)
    assert api.queries == 300 and len(api.sent) == 5  # rounds of 64 queries, one call each
    assert adaptive.metrics["transfer_pool"] == 1200
    # the bandit rewards certain answers: it buys more confident ones than chance does
    assert adaptive.metrics["answer_margin"] > randomly.metrics["answer_margin"]


def test_the_bandit_learns_which_group_answers_with_certainty():
    g = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 40, (200, 1, 16, 16), generator=g, dtype=torch.uint8)
    bright = torch.randint(200, 256, (200, 1, 16, 16), generator=g, dtype=torch.uint8)
    pool = torch.cat([dark, bright])[torch.randperm(400, generator=g)]

    def ask(x):  # certain about bright images only
        sure = (x.float().mean((1, 2, 3)) > 128).float()
        return torch.stack([5 * sure, torch.zeros_like(sure), torch.zeros_like(sure)], 1)

    p = KnockoffParams(query_budget=150, clusters=2, round_size=10)
    x, answers = adaptive_queries(pool, ask, p, seed=0)
    assert len(x) == 150 and len(_rows(x)) == 150  # the budget, no image twice
    assert torch.equal(answers, ask(x))  # each answer is its query's
    assert (x.float().mean((1, 2, 3)) > 128).float().mean() > 0.75  # random: 0.5


def test_knockoff_reads_a_folder_of_images(victim, tmp_path, one_thread):
    g = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / f"group{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    params = {"source": "folder", "root": str(tmp_path), "query_budget": 50, "epochs": 1}
    _, out, api = _attack("knockoff", params, victim)
    sent = torch.cat(api.sent)
    assert api.queries == 12 and len(_rows(sent)) == 12  # every image once, the budget unspent
    assert sent.shape[1:] == (1, 16, 16) and sent.dtype == torch.uint8  # the task's format


def test_retrain_learns_the_served_answers_from_scratch(victim, one_thread):
    _, splits, _ = victim
    marked, out, api = _attack("retrain", {"arch": "lenet", "epochs": 8}, victim, shift=1)
    assert api.queries == len(splits.attacker)
    before, after = marked.state_dict(), out.model.state_dict()
    shared = [k for k, v in after.items() if v.is_floating_point() and torch.equal(v, before[k])]
    assert not shared, f"weights copied from the marked model: {shared}"
    # the deployment answered every class rolled by one: the copy learnt those answers, so
    # its "accuracy" is on the rolled labels (true labels were never used)
    pred = predict_logits(out.model, splits.test.x, "cpu").argmax(1)
    assert (pred == (splits.test.y + 1) % DATA.num_classes).float().mean() > 0.8
    assert (pred == splits.test.y).float().mean() < CHANCE


def test_transfer_swaps_the_head_twice_training_every_layer(victim, monkeypatch, one_thread):
    import harness.attacks.transfer as transfer

    model, splits, _ = victim
    phases = []
    train = transfer.train_on_attacker_data

    def spy(m, ctx, *args, **kw):
        phases.append((m.fc, m.fc.out_features, ctx.data.attacker.y.clone()))
        return train(m, ctx, *args, **kw)

    monkeypatch.setattr(transfer, "train_on_attacker_data", spy)
    marked, out, api = _attack("transfer", {"proxy_classes": 2, "epochs": 3}, victim)
    original_head = model.fc
    (head1, classes1, y1), (head2, classes2, y2) = phases
    assert (classes1, classes2) == (2, DATA.num_classes)
    assert torch.equal(y1, splits.attacker.y % 2) and torch.equal(y2, splits.attacker.y)
    assert out.model is marked and out.model.fc is head2 and head2 is not head1
    assert out.spec is None and api.queries == 0  # the marked spec; ground truth, no queries
    conv = "features.0.weight"
    assert not torch.equal(model.state_dict()[conv], out.model.state_dict()[conv])
    assert not torch.equal(original_head.weight, head2.weight)
    assert accuracy(out.model, splits.test, "cpu") > 0.8


def _cell(method: str, method_params: dict, attack: str, params: dict) -> Cell:
    return Cell(
        "extraction", DATA.model_dump(mode="json"), TRAIN.model_dump(mode="json"), "lenet",
        method, create_method(method, method_params).params.model_dump(mode="json"),
        attack, create_attack(attack, params).params.model_dump(mode="json"), 0,
    )  # fmt: skip


def test_an_ensemble_averages_k_members_and_reloads_exactly(tmp_path, monkeypatch, one_thread):
    kept = []
    apply = EnsembleAttack.apply

    def keep(self, model, ctx):
        kept.append(out := apply(self, model, ctx))
        return out

    monkeypatch.setattr(EnsembleAttack, "apply", keep)
    store, cell = str(tmp_path), _cell("none", {}, "ensemble", {"k": 3, "epochs": 6})
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    assert row["metrics"]["k"] == 3 and row["metrics"]["api_queries"] == 107  # the attacker split
    artifacts = ArtifactStore(store)
    loaded, spec = artifacts.load_model(artifacts.load_meta("attack", cell.attack_key()))
    assert spec.wrapper == "ensemble" and spec.wrapper_params == {"k": 3}
    assert isinstance(loaded, Ensemble) and len(loaded.members) == 3
    x = load_splits(DATA).test.x
    reloaded, original = (predict_logits(m, x, "cpu") for m in (loaded, kept[0].model))
    assert torch.equal(reloaded, original)
    members = torch.stack([predict_logits(m, x, "cpu").softmax(1) for m in loaded.members])
    assert torch.allclose(reloaded.exp(), members.mean(0), atol=1e-6)  # the mean of softmaxes
    assert not torch.allclose(members[0], members[1], atol=1e-2)  # distinct members
    assert row["task_score_attacked"] > 0.8


def test_a_dawn_deployment_marks_what_knockoff_buys(tmp_path, one_thread):
    dawn = {"rate": 0.3, "n_keys": 50, "n_null": 2}
    knockoff = {"query_budget": 200, "epochs": 2, "student_arch": "lenet"}
    row = run_cell(_cell("dawn", dawn, "knockoff", knockoff), str(tmp_path))
    assert row["status"] == "ok", row.get("traceback")
    m = row["metrics"]
    assert m["api_queries"] == 200 and m["keys_from_api"] == 1.0
    assert 0.2 < m["api_wm_share"] < 0.4  # DAWN's rate over the transfer-set queries
    assert m["n_keys"] == min(50, round(m["api_wm_share"] * 200))


def _scenario(tmp_path: Path, attack: dict) -> str:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "dataset": DATA.model_dump(mode="json"), "archs": ["lenet"],
        "methods": ["none"], "attacks": [attack],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("knockoff", {"query_budget": 0}, "query_budget"),
        ("knockoff", {"source": "folder", "root": "/no/such/folder"}, "root"),
        ("knockoff", {"source": "folder"}, "root"),
        ("knockoff", {"root": "/tmp"}, "root"),
        ("knockoff", {"query_budget": 100, "pool_size": 50}, "pool_size"),
        ("ensemble", {"k": 1}, "k"),
        ("ensemble", {"k": 30}, "k"),  # 107 attacker images: 3 each, fewer than 4 classes
        ("transfer", {"proxy_classes": 4}, "proxy_classes"),
        ("retrain", {"arch": "lenett"}, "arch"),
    ],
)
def test_bad_input_exits_2_at_validation(tmp_path, capsys, name, params, field):
    assert main(["validate", _scenario(tmp_path, {"name": name, "params": params})]) == 2
    assert f"attacks[0].params.{field}" in capsys.readouterr().err


def test_a_folder_without_images_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    attack = {"name": "knockoff", "params": {"source": "folder", "root": str(tmp_path / "empty")}}
    assert main(["validate", _scenario(tmp_path, attack)]) == 2
    assert "no images" in capsys.readouterr().err
