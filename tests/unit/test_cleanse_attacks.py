"""Training-time removal attacks: fine_pruning, neural_cleanse (unlearn / prune) and
neural_laundering, on a lenet with a real backdoor (a white square stamped on 10 % of its
training images, relabelled to class 2), real cells against trigger_set, and bad input
refused at validation (exit 2)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import harness.attacks.neural_laundering as laundering
from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.attacks.fine_pruning import layer_means, layer_output
from harness.attacks.neural_cleanse import CleanseParams, anomaly_indices, cleanse
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.context import Context
from harness.data import load_splits
from harness.methods import create_method
from harness.stages import run_cell
from harness.training import accuracy, as_float, fit, predict_logits, seed_everything
from model_zoo import ModelSpec, create_model

DATA = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=8, batch_size=32, lr=0.05)
SPEC = ModelSpec("lenet", 4, 1, 16)
TARGET = 2
STAGE = "features.6"  # lenet: the ReLU after its last conv
SQUARE = (slice(-5, -1), slice(-5, -1))  # a 4 x 4 white square near the bottom-right corner


def with_square(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., SQUARE[0], SQUARE[1]] = 255
    return x


def backdoor_success(model, splits) -> float:
    """Share of test images not of the target class that the real square sends there."""
    others = splits.test.x[splits.test.y != TARGET]
    return (predict_logits(model, with_square(others), "cpu").argmax(1) == TARGET).float().mean()


@pytest.fixture(scope="module")
def backdoored():
    """A lenet trained on the owner split plus 10 % square-stamped copies labelled 2, and an
    attack context on the attacker split (which holds no stamped image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = load_splits(DATA)
    owner = splits.owner
    g = torch.Generator().manual_seed(0)
    poisoned = torch.randperm(len(owner), generator=g)[: len(owner) // 10]
    x = torch.cat([owner.x, with_square(owner.x[poisoned])])
    y = torch.cat([owner.y, torch.full((len(poisoned),), TARGET)])
    seed_everything(0)
    model = create_model(SPEC)
    fit(model, x, y, TRAIN, "cpu", 0)
    model.eval()
    ctx = Context(data=splits, train=TRAIN, spec=SPEC, device="cpu", seed=0)
    torch.set_num_threads(threads)
    assert accuracy(model, splits.test, "cpu") > 0.95
    assert backdoor_success(model, splits) > 0.9
    return model, splits, ctx


def attacked(backdoored, name: str, params: dict):
    model, splits, ctx = backdoored
    model = copy.deepcopy(model)
    return model, create_attack(name, params).apply(model, ctx)


# ------------------------------------------------------------------------- neural cleanse


def test_the_smallest_reversed_trigger_is_the_planted_square(backdoored, one_thread):
    model, _, ctx = backdoored
    found = cleanse(model, ctx, CleanseParams(steps=150))
    norms = torch.tensor([t.l1 for t in found.triggers])
    smallest = found.triggers[int(norms.argmin())]
    assert smallest.target == TARGET and found.figures["smallest_trigger_class"] == TARGET
    assert smallest.l1 < 2 * 16  # the square covers 16 pixels; the clean classes need far more
    assert norms.sort().values[1] > 2 * smallest.l1
    corner = smallest.mask[8:, 8:].sum()  # the square's quarter of the image
    assert corner > 0.4 * smallest.l1  # 0.25 if the mask were spread evenly
    index = anomaly_indices(norms)
    assert index.argmax() == TARGET and index[TARGET] > 2
    assert [t.target for t in found.flagged] == [TARGET] == [t.target for t in found.used]
    assert found.figures["flagged_classes"] == 1 and found.figures["anomaly_index"] > 2
    assert found.figures["trigger_success_before"] > 0.9


def test_the_anomaly_index_is_the_mad_distance():
    index = anomaly_indices(torch.tensor([10.0, 50.0, 55.0, 60.0]))
    # median 52.5, |deviations| 42.5, 2.5, 2.5, 7.5 -> MAD 5 x 1.4826
    assert index.tolist() == pytest.approx([42.5 / 7.413, 2.5 / 7.413, 2.5 / 7.413, 7.5 / 7.413],
                                           rel=1e-3)  # fmt: skip
    assert torch.isfinite(anomaly_indices(torch.tensor([3.0, 3.0, 3.0]))).all()


def test_unlearning_removes_the_backdoor_and_keeps_the_accuracy(backdoored, one_thread):
    model, splits, _ = backdoored
    after, result = attacked(backdoored, "neural_cleanse", {"steps": 100})
    m = result.metrics
    assert m["smallest_trigger_class"] == TARGET
    assert m["trigger_success_before"] > 0.9 and m["trigger_success_after"] < 0.2
    assert backdoor_success(after, splits) < 0.3  # the real square, never seen by the attacker
    assert accuracy(after, splits.test, "cpu") >= accuracy(model, splits.test, "cpu") - 0.05
    assert "channels_pruned" not in m


def test_prune_mode_masks_the_channels_the_trigger_excites(backdoored, one_thread):
    model, splits, ctx = backdoored
    x = splits.attacker.x
    before = layer_means(model, STAGE, x, "cpu")
    rise = layer_means(model, STAGE, with_square(x), "cpu") - before
    after, result = attacked(backdoored, "neural_cleanse", {"steps": 100, "mode": "prune"})
    assert result.metrics["channels_pruned"] == 3  # floor(10 % of 32)
    probe = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    silent = layer_output(after, STAGE, probe).abs().amax((0, 2, 3)) == 0
    was_dead = layer_output(model, STAGE, probe).abs().amax((0, 2, 3)) == 0
    pruned = torch.nonzero(silent & ~was_dead).flatten()
    assert len(pruned) == 3
    # the reversed trigger picked channels the REAL square excites: above the median rise
    assert (rise[pruned] > rise.median()).all()
    assert backdoor_success(after, splits) <= backdoor_success(model, splits)
    assert accuracy(after, splits.test, "cpu") >= accuracy(model, splits.test, "cpu") - 0.05


# ------------------------------------------------------------------------- laundering


def test_laundering_resets_neurons_and_removes_the_backdoor(backdoored, one_thread):
    model, splits, _ = backdoored
    after, result = attacked(backdoored, "neural_laundering", {"steps": 100})
    m = result.metrics
    assert m["channels_reset"] + m["neurons_reset"] >= 1
    assert m["trigger_success_after"] < 0.2
    assert backdoor_success(after, splits) < 0.3
    assert accuracy(after, splits.test, "cpu") >= accuracy(model, splits.test, "cpu") - 0.05


def test_laundering_zeroes_the_input_weights_of_the_channels_it_resets(
    backdoored, one_thread, monkeypatch
):
    model, _, ctx = backdoored
    model = copy.deepcopy(model)
    trained = []

    def record(m, *args, **kw):  # the weights as retraining starts
        trained.append(copy.deepcopy(m.state_dict()))
        return fit(m, *args, **kw)

    monkeypatch.setattr(laundering, "fit", record)
    result = create_attack("neural_laundering", {"steps": 30, "epochs": 1}).apply(model, ctx)
    state = trained[0]
    dead_rows = sum(
        int((state[f"{p}.weight"].flatten(1).abs().sum(1) == 0).sum())
        for p in ("features.0", "features.4", "features.9")
    )
    m = result.metrics
    assert dead_rows == m["channels_reset"] + m["neurons_reset"] >= 1


# ------------------------------------------------------------------------- fine-pruning


def test_fine_pruning_masks_exactly_the_dormant_channels(backdoored, one_thread):
    model, splits, _ = backdoored
    means = layer_means(model, STAGE, splits.attacker.x, "cpu")
    dormant = set(torch.argsort(means, stable=True)[:16].tolist())
    after, result = attacked(backdoored, "fine_pruning", {"ratio": 0.5, "epochs": 2})
    assert result.metrics["channels_pruned"] == 16
    assert 0 <= result.metrics["pruned_activation_share"] <= 0.5  # the lower half
    # rebuilt from the state dict alone, as the store does
    assert set(after.state_dict()) == set(model.state_dict())
    rebuilt = create_model(SPEC).eval()
    rebuilt.load_state_dict(after.state_dict())
    probe = torch.cat([torch.rand(32, 1, 16, 16), as_float(splits.test.x)])
    peak = layer_output(rebuilt, STAGE, probe).abs().amax((0, 2, 3))
    assert set(torch.nonzero(peak == 0).flatten().tolist()) == dormant
    # the masks held through fine-tuning: the kept weights moved, the masked ones did not
    masked = sorted(dormant)
    w_before, w_after = model.features[4].weight, rebuilt.features[4].weight
    assert (w_after[masked] == 0).all() and not torch.equal(w_before, w_after)
    assert (rebuilt.features[9].weight.view(64, 32, 16)[:, masked] == 0).all()


def test_fine_pruning_keeps_the_logits_of_a_network_whose_pruned_channels_were_dead(
    backdoored, one_thread
):
    model, splits, ctx = backdoored
    model = copy.deepcopy(model)
    dead = [1, 5, 9, 13, 17, 21, 25, 29]
    with torch.no_grad():  # BatchNorm to a negative constant: ReLU outputs 0 on any input
        model.features[5].weight[dead] = 0.0
        model.features[5].bias[dead] = -1.0
    probe = torch.cat([torch.rand(32, 1, 16, 16), as_float(splits.attacker.x)])
    with torch.no_grad():
        logits = model.eval()(probe)
    result = create_attack("fine_pruning", {"ratio": 8 / 32, "epochs": 0}).apply(model, ctx)
    assert result.metrics == {
        "channels_pruned": 8.0, "pruned_activation_share": 0.0, "stages_skipped": 0.0
    }
    with torch.no_grad():
        assert torch.allclose(model.eval()(probe), logits, atol=1e-6)
    assert (model.features[4].weight[dead] == 0).all()  # and they are masked in the weights
    assert (model.features[5].bias[dead] == 0).all()


# ------------------------------------------------------------------------- real cells

TINY_TRIGGER_SET = {"n_keys": 20, "n_null": 2, "epochs": 6}


def _cell(attack: str, params: dict) -> Cell:
    train = TrainCfg(epochs=3, batch_size=32, lr=0.05)
    return Cell(
        "cleanse", DATA.model_dump(mode="json"), train.model_dump(mode="json"), "lenet",
        "trigger_set", create_method("trigger_set", TINY_TRIGGER_SET).params.model_dump(),
        attack, create_attack(attack, params).params.model_dump(), 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cleanse-store"))


@pytest.mark.parametrize(
    ("attack", "params"),
    [("fine_pruning", {"ratio": 0.5, "epochs": 1}),
     ("neural_cleanse", {"steps": 20, "batch_size": 16, "epochs": 1}),
     ("neural_cleanse", {"steps": 20, "batch_size": 16, "mode": "prune"}),
     ("neural_laundering", {"steps": 20, "batch_size": 16, "epochs": 1})],
)  # fmt: skip
def test_a_cell_against_trigger_set_ends_ok(store, one_thread, attack, params):
    cell = _cell(attack, params)
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    declared = create_attack(attack, params).metrics
    required = {m.name for m in declared if not m.optional}
    assert required <= set(row["metrics"])
    if attack != "fine_pruning":
        assert 0 <= row["metrics"]["smallest_trigger_class"] < 4
    if attack == "fine_pruning":  # the stored model keeps its masked channels silent
        artifacts = ArtifactStore(store)
        model, _ = artifacts.load_model(artifacts.load_meta("attack", cell.attack_key()))
        peak = layer_output(model, STAGE, torch.rand(16, 1, 16, 16)).abs().amax((0, 2, 3))
        assert int((peak == 0).sum()) >= 16


# ------------------------------------------------------------------------- validation


def _scenario(tmp_path: Path, attack: dict, arch: str = "lenet") -> str:
    path = tmp_path / "cleanse.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cleanse", "dataset": {"name": "synthetic", "image_size": 16, "channels": 1},
        "archs": [arch], "methods": ["none"], "attacks": [attack],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("attack", "field"),
    [({"name": "fine_pruning", "params": {"ratio": 0}}, "ratio"),
     ({"name": "fine_pruning", "params": {"ratio": 1}}, "ratio"),
     ({"name": "fine_pruning", "params": {"ratio": 1.5}}, "ratio"),
     ({"name": "fine_pruning", "params": {"layer": "features.99"}}, "layer"),
     ({"name": "neural_cleanse", "params": {"steps": 0}}, "steps"),
     ({"name": "neural_cleanse", "params": {"prune_ratio": 1.0, "mode": "prune"}},
      "prune_ratio"),
     ({"name": "neural_laundering", "params": {"steps": 0}}, "steps"),
     ({"name": "neural_laundering", "params": {"conv_threshold": 0}}, "conv_threshold")],
)  # fmt: skip
def test_bad_parameters_exit_2(tmp_path: Path, capsys, attack, field):
    assert main(["validate", _scenario(tmp_path, attack)]) == 2
    assert f"attacks[0].params.{field}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "attack",
    [{"name": "fine_pruning"}, {"name": "neural_cleanse", "params": {"mode": "prune"}}],
)
def test_an_arch_without_a_maskable_conv_stage_exits_2(tmp_path: Path, capsys, attack):
    assert main(["validate", _scenario(tmp_path, attack, "vit_tiny_patch16_224")]) == 2
    err = capsys.readouterr().err
    assert "attacks[0].params.layer" in err and "cannot be masked exactly" in err
    # unlearning needs no stage: the same arch validates
    assert main(["validate", _scenario(tmp_path, {"name": "neural_cleanse"},
                                       "vit_tiny_patch16_224")]) == 0  # fmt: skip


@pytest.mark.parametrize("arch", ["lenet", "resnet10t"])
def test_networks_with_a_conv_stage_validate(tmp_path: Path, arch):
    assert main(["validate", _scenario(tmp_path, {"name": "fine_pruning"}, arch)]) == 0


def test_fine_pruning_passes_over_a_stage_of_passport_layers():
    """A Steganographic Passport model's last stage holds PassportNorms, which the rewrite
    cannot see through: the default stage is then the deepest one that can be masked."""
    from types import SimpleNamespace

    from harness.attacks.fine_pruning import stage_or_fail
    from model_zoo import ModelSpec, create_model

    spec = ModelSpec("resnet10t", 4, 1, 16, wrapper="passport")
    model = create_model(spec).eval()
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    ctx = SimpleNamespace(data=SimpleNamespace(attacker=SimpleNamespace(x=x)), device="cpu",
                          spec=spec)  # fmt: skip
    stage, skipped = stage_or_fail(model, ctx, None)
    # layer4 holds the passport layers, and they read layer3's stream: layer2 is the deepest
    assert (stage.layer, skipped) == ("layer2", 2)
    plain = create_model(ModelSpec("resnet10t", 4, 1, 16)).eval()
    stage, skipped = stage_or_fail(plain, ctx, None)
    assert (stage.layer, skipped) == ("layer4", 0)
