"""The generic attacks on a tiny LeNet and synthetic data: quantize, prune, fine_tune, distill."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from harness.attacks import create_attack
from harness.attacks.prune import global_prune, prunable
from harness.attacks.quantize import fake_quantize
from harness.config import DatasetCfg, TrainCfg
from harness.context import Context
from harness.data import load_splits
from harness.training import seed_everything
from model_zoo import LeNet, ModelSpec

NUM_CLASSES = 4
SPEC = ModelSpec("lenet", NUM_CLASSES, 1, 16)


def run_attack(attack, model, ctx):
    """(model, spec) of an attack's `Attacked` result (spec: the context's if unchanged)."""
    out = attack.apply(model, ctx)
    return out.model, out.spec or ctx.spec


@pytest.fixture(scope="module")
def ctx() -> Context:
    dataset = DatasetCfg(
        name="synthetic", image_size=16, channels=1, samples=150, num_classes=NUM_CLASSES
    )
    train = TrainCfg(epochs=1, batch_size=32, lr=0.05)
    return Context(data=load_splits(dataset), train=train, spec=SPEC, device="cpu", seed=0)


@pytest.fixture
def model(ctx: Context) -> nn.Module:
    seed_everything(0)
    return ctx.create_model().eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def head_keys(model: nn.Module) -> set[str]:
    return {f"fc.{k}" for k in model.get_classifier().state_dict()}


# --- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fake_quantize_per_channel_levels(bits: int) -> None:
    w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(bits))
    q = fake_quantize(w, bits, per_channel=True)
    assert q.shape == w.shape
    for row_q, row_w in zip(q.reshape(8, -1), w.reshape(8, -1), strict=True):
        assert len(row_q.unique()) <= 2**bits
        assert row_q.min() == pytest.approx(row_w.min().item(), abs=1e-6)
        assert row_q.max() == pytest.approx(row_w.max().item(), abs=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_fake_quantize_per_tensor_levels(bits: int) -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(bits))
    q = fake_quantize(w, bits, per_channel=False)
    assert len(q.unique()) <= 2**bits
    # one min-max range for the whole tensor: every value sits on the same grid
    lo, step = w.min(), (w.max() - w.min()) / (2**bits - 1)
    levels = (q - lo) / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().min() == 0 and levels.round().max() == 2**bits - 1
    assert not torch.equal(q, fake_quantize(w, bits, per_channel=True))


@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantize_8_bits_is_nearly_lossless(per_channel: bool) -> None:
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    q = fake_quantize(w, 8, per_channel)
    step = (w.max() - w.min()).item() / 255
    assert (q - w).abs().max().item() <= step / 2 + 1e-6
    assert (q - w).norm() / w.norm() < 0.01


def test_fake_quantize_constant_channel_is_unchanged() -> None:
    w = torch.randn(3, 10)
    w[1] = 0.25
    q = fake_quantize(w, 4, per_channel=True)
    assert torch.isfinite(q).all()
    assert torch.allclose(q[1], w[1])


def test_quantize_attack_quantizes_every_conv_and_linear(ctx: Context, model: nn.Module) -> None:
    before = snapshot(model)
    out, spec = run_attack(create_attack("quantize", {"bits": 3}), model, ctx)
    assert spec == ctx.spec
    for module, _ in prunable(out):
        for row in module.weight.detach().reshape(module.weight.shape[0], -1):
            assert len(row.unique()) <= 8
    changed = changed_keys(before, out)
    assert changed and all(k.endswith(".weight") for k in changed)
    assert not any(k.startswith("features.1.") for k in changed)  # BatchNorm untouched


# --- prune -------------------------------------------------------------------------------------


def weight_sparsity(model: nn.Module) -> float:
    weights = [m.weight.detach() for m, _ in prunable(model)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("method", ["l1", "random"])
@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.9])
def test_global_prune_reaches_sparsity(model: nn.Module, method: str, sparsity: float) -> None:
    assert weight_sparsity(model) == 0.0
    global_prune(model, sparsity, method)
    assert weight_sparsity(model) == pytest.approx(sparsity, abs=0.002)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


def test_l1_prune_removes_the_smallest_weights(model: nn.Module) -> None:
    before = torch.cat([m.weight.detach().flatten().clone() for m, _ in prunable(model)])
    global_prune(model, 0.5, "l1")
    after = torch.cat([m.weight.detach().flatten() for m, _ in prunable(model)])
    pruned = after == 0
    assert before[pruned].abs().max() <= before[~pruned].abs().min()
    assert torch.equal(after[~pruned], before[~pruned])


@pytest.mark.parametrize("method", ["l1", "random"])
def test_prune_sparsity_zero_changes_nothing(model: nn.Module, method: str) -> None:
    before = snapshot(model)
    global_prune(model, 0.0, method)
    assert changed_keys(before, model) == set()


def test_prune_attack_touches_only_weights(ctx: Context, model: nn.Module) -> None:
    before = snapshot(model)
    out, spec = run_attack(create_attack("prune", {"sparsity": 0.7}), model, ctx)
    assert spec == ctx.spec
    assert weight_sparsity(out) == pytest.approx(0.7, abs=0.002)
    assert all(k.endswith(".weight") for k in changed_keys(before, out))


def test_fine_pruning_keeps_pruned_weights_at_zero(ctx: Context, model: nn.Module) -> None:
    attack = create_attack("prune", {"sparsity": 0.5, "fine_tune_epochs": 1})
    out, _ = run_attack(attack, model, ctx)
    assert weight_sparsity(out) == pytest.approx(0.5, abs=0.002)


# --- fine_tune ---------------------------------------------------------------------------------


def no_training(*args, **kwargs) -> dict:
    return {}


@pytest.mark.parametrize(
    ("mode", "head_reset"), [("rtal", True), ("rtll", True), ("ftal", False), ("ftll", False)]
)
def test_rt_modes_reinitialise_the_head(
    ctx: Context, model: nn.Module, monkeypatch, mode: str, head_reset: bool
) -> None:
    """With training stubbed out, only the re-initialisation of RT* can change the model."""
    monkeypatch.setattr("harness.attacks.fine_tune.fit", no_training)
    before = snapshot(model)
    out, spec = run_attack(create_attack("fine_tune", {"mode": mode}), model, ctx)
    assert spec == ctx.spec
    assert out.get_classifier().out_features == NUM_CLASSES
    assert changed_keys(before, out) == (head_keys(out) if head_reset else set())


def test_rtal_trains_everything_with_a_new_head(ctx: Context, model: nn.Module) -> None:
    before = snapshot(model)
    out, _ = run_attack(create_attack("fine_tune", {"mode": "rtal", "epochs": 1}), model, ctx)
    changed = changed_keys(before, out)
    assert head_keys(out) <= changed
    assert "features.0.weight" in changed and "features.1.running_mean" in changed
    assert not out.training


@pytest.mark.parametrize("mode", ["ftll", "rtll"])
def test_last_layer_modes_change_only_the_classifier(
    ctx: Context, model: nn.Module, mode: str
) -> None:
    before = snapshot(model)
    out, _ = run_attack(create_attack("fine_tune", {"mode": mode, "epochs": 1}), model, ctx)
    assert changed_keys(before, out) == head_keys(out)  # BatchNorm statistics frozen too


def test_fine_tune_uses_the_attacker_split_fraction(
    ctx: Context, model: nn.Module, monkeypatch
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(
        "harness.attacks.fine_tune.fit", lambda m, x, y, *a, **k: seen.append(len(x))
    )
    run_attack(create_attack("fine_tune", {"data_fraction": 0.5}), model, ctx)
    assert seen == [round(0.5 * len(ctx.data.attacker))]


# --- distill and identity ----------------------------------------------------------------------


def test_distill_returns_a_model_of_the_student_arch(
    ctx: Context, model: nn.Module, monkeypatch
) -> None:
    import harness.attacks.distill as distill

    queried: list[int] = []
    real_fit = distill.fit

    def spy(student, x, *args, **kwargs):
        queried.append(len(x))
        return real_fit(student, x, *args, **kwargs)

    monkeypatch.setattr(distill, "fit", spy)
    params = {"student_arch": "test_resnet", "epochs": 1, "query_budget": 40}
    student, spec = run_attack(create_attack("distill", params), model, ctx)
    assert spec == ctx.spec.replace(arch="test_resnet")
    assert not isinstance(student, LeNet)
    assert type(student).__name__ == "ResNet"
    assert queried == [40]
    with torch.no_grad():
        assert student(torch.rand(2, 1, 16, 16)).shape == (2, NUM_CLASSES)


def test_distill_trains_for_its_own_epochs(ctx: Context, model: nn.Module, monkeypatch) -> None:
    """`distill.epochs` sets the student's training length, not the victim's `train.epochs`."""
    import harness.attacks.distill as distill

    epochs: list[int] = []

    def record(student, x, targets, cfg, *args, **kwargs):
        epochs.append(kwargs["epochs"] if kwargs.get("epochs") is not None else cfg.epochs)

    monkeypatch.setattr(distill, "fit", record)
    three_epochs = Context(
        ctx.data, ctx.train.model_copy(update={"epochs": 3}), ctx.spec, ctx.device, ctx.seed
    )
    run_attack(create_attack("distill", {"epochs": 1}), model, three_epochs)
    assert epochs == [1]


def test_distill_defaults_to_a_fresh_model_of_the_victim_arch(
    ctx: Context, model: nn.Module
) -> None:
    before = snapshot(model)
    attack = create_attack("distill", {"epochs": 1, "hard_labels": True})
    student, spec = run_attack(attack, model, ctx)
    assert spec == ctx.spec
    assert isinstance(student, LeNet) and student is not model
    assert changed_keys(before, model) == set()  # the teacher is only queried


def test_identity_returns_the_model_unchanged(ctx: Context, model: nn.Module) -> None:
    before = snapshot(model)
    out, spec = run_attack(create_attack("identity"), model, ctx)
    assert out is model and spec == ctx.spec
    assert changed_keys(before, out) == set()
