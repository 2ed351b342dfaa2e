"""WRT's training-time removal attacks: weight shifting, regularisation, adversarial training,
label smoothing, feature shuffling and overwriting. Each one's defining property on its own,
bad parameters refused at validation (exit 2), and one real cell each (lenet, tiny synthetic
data, `uchida` or `trigger_set`) run in-process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from harness.artifacts import ArtifactStore
from harness.attacks import ATTACKS, create_attack
from harness.attacks.adversarial_training import pgd
from harness.attacks.base import InputAttack, install_transform
from harness.attacks.feature_shuffle import FeatureShuffle
from harness.attacks.label_smoothing import smooth
from harness.attacks.overwrite import KEY_SEED_OFFSET, key_repeats
from harness.attacks.permute import Permute
from harness.attacks.weight_shifting import attacker_targets, shift_filters
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.context import Context
from harness.data import load_splits
from harness.methods import create_method
from harness.methods.trigger_set import make_triggers
from harness.methods.uchida import kernel_mean
from harness.stages import run_cell, verify_context
from harness.training import as_float, predict_logits, train_classifier
from model_zoo import ModelSpec, create_model

DATA = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=3, batch_size=32, lr=0.05)
METHODS = {
    "uchida": {"n_bits": 64, "lambda": 1.0, "epochs": 3, "n_null": 2},
    "trigger_set": {"n_keys": 20, "n_null": 2, "epochs": 6},
}
SPEC = ModelSpec("lenet", 4, 1, 16)


def _cell(method: str, attack: str, params: dict) -> Cell:
    return Cell(
        "removal", DATA.model_dump(mode="json"), TRAIN.model_dump(mode="json"), "lenet", method,
        create_method(method, METHODS[method]).params.model_dump(mode="json"), attack,
        create_attack(attack, params).params.model_dump(mode="json"), 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("removal-store"))


def _run(store: str, method: str, attack: str, params: dict) -> dict:
    row = run_cell(_cell(method, attack, params), store)
    assert row["status"] == "ok", f"{row.get('error')}\n{row.get('traceback')}"
    return row


def _models(store: str, cell: Cell):
    """(marked, attacked) models of a cell that has run."""
    artifacts = ArtifactStore(store)
    marked, _ = artifacts.load_model(artifacts.load_meta("embed", cell.embed_key()))
    attacked, _ = artifacts.load_model(artifacts.load_meta("attack", cell.attack_key()))
    return marked, attacked


@pytest.fixture(scope="module")
def trained():
    """A lenet trained briefly on the tiny data, and a context on its attacker split."""
    torch.manual_seed(0)
    splits = load_splits(DATA)
    model = create_model(SPEC)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_classifier(model, splits.owner, TRAIN, "cpu", 0)
    torch.set_num_threads(threads)
    ctx = Context(data=splits, train=TRAIN, spec=SPEC, device="cpu", seed=0)
    return model.eval(), ctx


# ------------------------------------------------------------------ weight shifting


def _convs(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_weight_shifting_scales_the_kernel_mean_by_one_minus_lambda():
    model = create_model(SPEC)
    before = copy.deepcopy(model)
    assert shift_filters(model, 1.5, 0.0, torch.Generator().manual_seed(0)) == 2
    for old, new in zip(_convs(before), _convs(model), strict=True):
        with torch.no_grad():
            assert torch.allclose(kernel_mean(new), -0.5 * kernel_mean(old), atol=1e-7)
            # every filter moved by the same vector: -lambda x the old kernel mean
            assert torch.allclose(new.weight - old.weight, -1.5 * old.weight.mean(0).expand_as(
                old.weight), atol=1e-7)  # fmt: skip
    assert torch.equal(before.fc.weight, model.fc.weight)  # linear layers are left alone
    assert torch.equal(before.features[1].weight, model.features[1].weight)  # and BatchNorm


def test_weight_shifting_leaves_an_installed_input_transform_alone():
    class Conv(InputAttack):
        def transform(self, x, modules):
            return modules(x)

    model = create_model(SPEC)
    front = torch.nn.Conv2d(1, 1, 3, padding=1)
    install_transform(model, Conv(), front)
    kept = front.weight.detach().clone()
    assert shift_filters(model, 1.5, 1.0, torch.Generator().manual_seed(0)) == 2
    assert torch.equal(front.weight, kept)


def test_weight_shifting_noise_is_lambda2_times_the_filters_mean_of_std_scaled_draws():
    model = create_model(ModelSpec("resnet10t", 4, 1, 16))
    before = copy.deepcopy(model)
    shift_filters(model, 2.5, 1.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for old, new in zip(_convs(before), _convs(model), strict=True):
        draw = torch.randn(old.weight.shape, generator=g)
        with torch.no_grad():
            residual = kernel_mean(new) - (1 - 2.5) * kernel_mean(old)
            expected = -(old.weight.std() * draw).mean(0).flatten()
            assert torch.allclose(residual, expected, atol=1e-6)
            if old.weight.shape[0] >= 32:  # N(0, std^2 / out) per kernel-mean entry
                ratio = residual.std() / (old.weight.std() / old.weight.shape[0] ** 0.5)
                assert 0.7 < ratio < 1.3


def test_weight_shifting_flips_uchidas_bits(store, one_thread):
    shifted = _run(store, "uchida", "weight_shifting", {"epochs": 0})
    assert shifted["wm_score_marked"] == 1.0  # the mark was in
    # (1 - 1.5) x the kernel mean: every projection changes sign, the bits read inverted
    assert shifted["wm_score_attacked"] < 0.1 and not shifted["wm_detected"]
    assert shifted["metrics"]["convs_shifted"] == 2.0
    tuned = _run(store, "uchida", "weight_shifting", {"epochs": 2})
    assert tuned["wm_score_attacked"] < 0.1 and not tuned["wm_detected"]
    assert tuned["task_score_attacked"] >= tuned["task_score_marked"] - 0.1


# ------------------------------------------------------------------ regularisation


def test_regularize_shrinks_the_weights_by_its_decay(trained):
    model, ctx = trained
    ratios = {}
    for decay in (1e-4, 0.5):
        attack = create_attack("regularize", {"strong_epochs": 3, "strong_decay": decay,
                                              "epochs": 0})  # fmt: skip
        out = attack.apply(copy.deepcopy(model), ctx)
        ratios[decay] = out.metrics["strong_norm_ratio"]
        assert out.metrics["fine_tune_epochs"] == 0
    assert ratios[0.5] < 0.9 and ratios[0.5] < ratios[1e-4] - 0.05


def test_regularize_stops_after_patience_epochs_without_a_better_held_out_loss(
    trained, monkeypatch
):
    model, ctx = trained
    losses = iter([1.0, 0.9, 0.95, 0.9, 0.5, 0.1])
    seen = []

    def fake(m, x, targets, device):
        seen.append(len(x))
        return next(losses)

    monkeypatch.setattr("harness.attacks.regularize.held_out_loss", fake)
    attack = create_attack("regularize", {"strong_epochs": 1, "epochs": 10, "patience": 2})
    out = attack.apply(copy.deepcopy(model), ctx)
    assert out.metrics["fine_tune_epochs"] == 4  # 0.95 and 0.9 do not beat 0.9: stop
    assert seen == [round(0.1 * len(ctx.data.attacker))] * 4  # the held-out 10 %


def test_a_regularize_cell(store, one_thread):
    row = _run(store, "trigger_set", "regularize", {"strong_epochs": 2, "epochs": 3,
                                                    "patience": 2})  # fmt: skip
    m = row["metrics"]
    assert m["strong_norm_ratio"] < 1.0 and 1 <= m["fine_tune_epochs"] <= 3
    assert row["task_score_attacked"] >= row["task_score_marked"] - 0.1


# ------------------------------------------------------------------ adversarial training


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_pgd_stays_in_the_eps_ball_and_raises_the_loss(trained, eps):
    model, ctx = trained
    x = ctx.data.attacker.x[:48]
    clean = as_float(x)
    labels = predict_logits(model, x, "cpu").argmax(1)
    adv = pgd(model, x, eps, 0.01, 10, "cpu", labels=labels)
    assert adv.shape == clean.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - clean).abs().max() <= eps + 1e-6
    assert (adv - clean).abs().max() >= eps - 1e-6  # it does go to the edge of the ball
    with torch.no_grad():
        before = F.cross_entropy(model(clean), labels)
        after = F.cross_entropy(model(adv), labels)
    assert after > before + 0.01
    default = pgd(model, x, eps, 0.01, 10, "cpu")  # default labels: the model's predictions
    assert torch.allclose(default, adv)


def test_an_adversarial_training_cell(store, one_thread):
    row = _run(store, "trigger_set", "adversarial_training",
               {"epochs": 2, "eps": [0.1, 0.25], "iters": 10, "samples": 64})  # fmt: skip
    assert 0.0 <= row["metrics"]["adv_flip_rate"] <= 1.0
    assert row["task_score_attacked"] >= row["task_score_marked"] - 0.1


# ------------------------------------------------------------------ label smoothing


def test_smoothed_targets_sum_to_one_with_epsilon_spread_evenly():
    y = torch.tensor([0, 3, 1])
    out = smooth(F.one_hot(y, 4).float(), 0.3)
    assert torch.allclose(out.sum(1), torch.ones(3))
    assert torch.allclose(out[torch.arange(3), y], torch.full((3,), 0.7 + 0.3 / 4))
    assert torch.allclose(out[0, 1:], torch.full((3,), 0.3 / 4))
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(smooth(soft, 0.2), torch.tensor([[0.45, 0.45, 0.05, 0.05]]))


def test_attacker_targets_are_the_marked_softmax_or_one_hot(trained):
    model, ctx = trained
    data = ctx.data.attacker
    predicted = attacker_targets(model, ctx, data.x, data.y, "predicted")
    assert torch.allclose(predicted, predict_logits(model, data.x, "cpu").softmax(1))
    assert torch.equal(attacker_targets(model, ctx, data.x, data.y, "true").argmax(1), data.y)


def test_a_label_smoothing_cell_flattens_the_models_confidence(store, one_thread):
    params = {"epochs": 2, "lr_factor": 2.0}
    row = _run(store, "trigger_set", "label_smoothing", params)
    marked, attacked = _models(store, _cell("trigger_set", "label_smoothing", params))
    x = load_splits(DATA).attacker.x
    confidence = {name: predict_logits(m, x, "cpu").softmax(1).max(1).values.mean().item()
                  for name, m in (("marked", marked), ("attacked", attacked))}  # fmt: skip
    # trained toward at most 0.7 + 0.3 / 4 = 0.775 on the top class
    assert confidence["attacked"] < min(0.85, confidence["marked"] - 0.05)
    assert row["task_score_attacked"] >= 0.5  # flatter, still far above chance (0.25)


# ------------------------------------------------------------------ feature shuffle


def test_feature_shuffle_is_permute_under_wrts_name():
    assert issubclass(ATTACKS.get("feature_shuffle"), Permute)
    assert FeatureShuffle.Params is Permute.Params and FeatureShuffle.name == "feature_shuffle"


def test_a_feature_shuffle_cell_keeps_the_logits_and_moves_the_weights(store, one_thread):
    row = _run(store, "uchida", "feature_shuffle", {})
    m = row["metrics"]
    assert m["max_logit_deviation"] < 1e-4 and m["channels_changed"] > 0
    assert row["task_score_attacked"] == row["task_score_marked"]
    marked, attacked = _models(store, _cell("uchida", "feature_shuffle", {}))
    assert not torch.equal(marked.features[4].weight, attacked.features[4].weight)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (marked(x) - attacked(x)).abs().max() < 1e-4


# ------------------------------------------------------------------ overwriting


def test_key_repeats_make_up_the_share():
    assert key_repeats(900, 10, 0.1) == 10  # 100 key images beside 900
    assert key_repeats(10, 100, 0.1) == 1  # at least once


def test_an_overwrite_cell_plants_the_attackers_own_keys(store, one_thread):
    params = {"n_keys": 20, "epochs": 10, "key_share": 0.5}
    row = _run(store, "trigger_set", "overwrite", params)
    assert row["metrics"]["attacker_key_acc"] >= 0.85  # 0.95 - 1.0 over fresh stores
    assert row["task_score_attacked"] >= row["task_score_marked"] - 0.1
    cell = _cell("trigger_set", "overwrite", params)
    marked = ArtifactStore(store).load_meta("embed", cell.embed_key())
    _, owner_key, _ = verify_context(cell, store, "cpu", marked)
    mine, _ = make_triggers(20, 1, 16, 4, "abstract", cell.seed + KEY_SEED_OFFSET)
    assert not torch.equal(mine, owner_key["x"])  # the attacker's keys, not the owner's


# ------------------------------------------------------------------ validation


def _scenario(tmp_path: Path, attack: str, params: dict) -> str:
    path = tmp_path / "removal.yaml"
    path.write_text(yaml.safe_dump({
        "name": "removal", "dataset": {"name": "synthetic", "image_size": 16, "channels": 1},
        "archs": ["lenet"], "methods": ["none"],
        "attacks": [{"name": attack, "params": params}],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("attack", "params", "field"),
    [
        ("weight_shifting", {"shift": -1}, "shift"),
        ("weight_shifting", {"noise": -0.5}, "noise"),
        ("weight_shifting", {"epochs": -1}, "epochs"),
        ("regularize", {"strong_decay": 0}, "strong_decay"),
        ("regularize", {"patience": 0}, "patience"),
        ("adversarial_training", {"eps": [0.1, 0]}, "eps"),
        ("adversarial_training", {"eps": [-0.1]}, "eps"),
        ("adversarial_training", {"eps": [1.5]}, "eps"),
        ("adversarial_training", {"step": 0}, "step"),
        ("adversarial_training", {"samples": 0}, "samples"),
        ("label_smoothing", {"epsilon": 1.0}, "epsilon"),
        ("label_smoothing", {"epsilon": -0.1}, "epsilon"),
        ("label_smoothing", {"labels": "soft"}, "labels"),
        ("overwrite", {"n_keys": 0}, "n_keys"),
        ("overwrite", {"key_share": 1.0}, "key_share"),
        ("feature_shuffle", {"layers": ["features.99"]}, "layers"),
    ],
)
def test_bad_parameters_exit_2(tmp_path: Path, capsys, attack, params, field):
    assert main(["validate", _scenario(tmp_path, attack, params)]) == 2
    assert f"attacks[0].params.{field}" in capsys.readouterr().err


def test_an_eps_list_is_one_grid_point_and_a_list_of_lists_expands():
    cls = ATTACKS.get("adversarial_training")
    assert cls.grid({"eps": [0.01, 0.1]}) == [{"eps": [0.01, 0.1]}]
    assert len(cls.grid({"eps": [[0.01], [0.1, 0.25]]})) == 2
