"""Function-preserving attacks (permute, rescale, dummy_neurons) and the channel-graph
analysis they share (`harness.equivalence`): exact on real timm families with non-trivial
BatchNorm statistics, weights really changed, refused where they cannot be exact."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import yaml

from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.cli import main
from harness.equivalence import analyze, chains, exact_logits, example_input, permute_chain
from harness.methods.uchida import bit_accuracy, kernel_mean
from model_zoo import ModelSpec, create_model

TOL = 1e-4
ARCHS = ["lenet", "resnet10t", "resnet18", "mobilenetv3_small_050", "convnext_atto"]
CANNOT = {("rescale", "convnext_atto")}  # GELU and LayerNorm: no chain scales exactly
CASES = [(a, arch) for a in ("permute", "rescale", "dummy_neurons") for arch in ARCHS
         if (a, arch) not in CANNOT]  # fmt: skip


def non_trivial(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BatchNorm statistics and affine, ConvNeXt layer scales at 1 (timm's 1e-6 would
    hide any change of the MLPs), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
    return model.eval()


def build(arch: str, **spec_kw) -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(arch, 10, 3, 32, **spec_kw)
    torch.manual_seed(0)
    return non_trivial(create_model(spec)), spec


def context(spec: ModelSpec, x: torch.Tensor, seed: int = 0):
    data = SimpleNamespace(attacker=SimpleNamespace(x=x))
    return SimpleNamespace(data=data, device="cpu", seed=seed, spec=spec)


def inputs(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def rebuilt(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The model as the store gives it back: built from `spec`, then the state dict loaded."""
    fresh = create_model(spec)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


@pytest.mark.parametrize(("attack", "arch"), CASES)
def test_attack_keeps_the_logits_and_changes_the_weights(attack, arch):
    model, spec = build(arch)
    x = inputs()
    before = exact_logits(model, x, "cpu")
    state = copy.deepcopy(model.state_dict())
    out = create_attack(attack).apply(model, context(spec, x))
    after = rebuilt(out.model, out.spec or spec)  # dummy_neurons: through its widened spec
    deviation = (exact_logits(after, x, "cpu") - before).abs().max().item()
    assert deviation <= TOL
    assert out.metrics["max_logit_deviation"] <= TOL
    assert out.metrics["max_logit_deviation"] == pytest.approx(deviation, abs=1e-6)
    assert out.metrics["channels_changed"] > 0
    new = out.model.state_dict()
    changed = [k for k in state if state[k].shape != new[k].shape or not state[k].equal(new[k])]
    assert changed, f"{attack} on {arch}: no weight changed"
    assert (out.spec is not None) == (attack == "dummy_neurons")


@pytest.mark.parametrize("attack", ["permute", "rescale", "dummy_neurons"])
@pytest.mark.parametrize("layer", ["layer2.0.conv2", "layer2.1.conv1"])
def test_uchida_bits_of_a_chain_consumer_are_scrambled(attack, layer):
    # layer2.0.conv2 reads its block's hidden channels; layer2.1.conv1 the stage's stream
    model, spec = build("resnet18")
    w = kernel_mean(model.get_submodule(layer)).detach()
    X = torch.randn(64, w.numel(), generator=torch.Generator().manual_seed(3))
    key = {"X": X, "b": (X @ w >= 0).float(), "layer": layer}
    assert bit_accuracy(model, key) == 1.0
    out = create_attack(attack).apply(model, context(spec, inputs(8)))
    acc = bit_accuracy(out.model, key)
    assert acc is None or acc < 0.9  # dummy_neurons: the layer's shape changed (not found)


def test_chains_join_residual_streams_and_gates():
    model, spec = build("resnet18")
    found = chains(model, example_input(spec))
    inner = [c for c in found if not c.residual]
    assert {c.producers for c in inner} == {
        (f"layer{i}.{j}.conv1",) for i in range(1, 5) for j in range(2)
    }
    assert all(c.consumers == ((c.producers[0][:-1] + "2", 1),) for c in inner)
    # a stage's stream: its stem / downsample conv and every block's last conv move together,
    # read by every block's first conv, the next stage's first conv and downsample (or the head)
    streams = {c.producers: c for c in found if c.residual}
    assert set(streams) == {("conv1", "layer1.0.conv2", "layer1.1.conv2")} | {
        (f"layer{i}.0.conv2", f"layer{i}.0.downsample.0", f"layer{i}.1.conv2")
        for i in range(2, 5)
    }
    first = streams[("conv1", "layer1.0.conv2", "layer1.1.conv2")]
    assert {p for p, _ in first.consumers} == {
        "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"
    }
    assert "bn1" in first.through and first.homogeneous
    last = streams[("layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2")]
    assert ("fc", 1) in last.consumers
    convnext, spec = build("convnext_atto")  # its stream passes LayerNorms: left alone
    assert not any(c.residual for c in chains(convnext, example_input(spec)))
    mnv3, spec = build("mobilenetv3_small_050")
    gated = [c for c in chains(mnv3, example_input(spec)) if c.gated]
    assert gated and all(not c.homogeneous for c in gated)
    assert any(p.endswith("se.conv_expand") for c in gated for p in c.producers)
    lenet, spec = build("lenet")
    inner = {c.producers: c.consumers for c in chains(lenet, example_input(spec))}
    assert inner[("features.4",)] == (("features.9", 16),)  # flattened 32 x 4 x 4


def test_rescale_needs_positively_homogeneous_chains():
    model, spec = build("convnext_atto")
    found = analyze(model, example_input(spec))
    assert found.usable() and not found.usable(rescale=True)
    assert "gelu" in found.why_not(rescale=True)


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x))))).mean((2, 3))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow
            h = torch.relu(h)
        return self.b(h).mean((2, 3))


@pytest.mark.parametrize("net", [_Concat, _Shared, _Untraceable])
def test_what_the_analysis_is_not_sure_of_is_left_alone(net):
    x = torch.rand(2, 3, 8, 8)
    assert chains(net(), x) == []


def test_a_plain_chain_is_found_and_permuted_exactly():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3,
                        groups=8), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))  # fmt: skip
    non_trivial(net)
    x = torch.rand(4, 3, 8, 8)
    (chain,) = chains(net, x)
    assert chain.producers == ("0",) and chain.through == ("1", "3")
    assert chain.consumers == (("6", 16),) and not chain.homogeneous
    before = net(x)
    permute_chain(net, chain, torch.randperm(8, generator=torch.Generator().manual_seed(0)))
    assert (net(x) - before).abs().max() <= TOL


def test_a_model_with_dummy_neurons_round_trips_through_the_store(tmp_path):
    model, spec = build("resnet10t")
    x = inputs(8)
    before = exact_logits(model, x, "cpu")
    out = create_attack("dummy_neurons", {"fraction": 0.2}).apply(model, context(spec, x))
    assert out.spec.wrapper == "widened" and out.spec.wrapper_params["base"] is None
    store = ArtifactStore(str(tmp_path))
    meta = store.save("attack", "k", {"spec": out.spec.to_dict()}, model=out.model)
    loaded, loaded_spec = store.load_model(meta)
    assert loaded_spec == out.spec
    assert (exact_logits(loaded, x, "cpu") - before).abs().max() <= TOL
    # a second pass widens the widened model further, still one `widened` wrapper
    again = create_attack("dummy_neurons").apply(loaded, context(loaded_spec, x, seed=1))
    assert again.spec.wrapper == "widened" and again.spec.wrapper_params["base"] is None
    assert (exact_logits(rebuilt(again.model, again.spec), x, "cpu") - before).abs().max() <= TOL


def test_dummy_neurons_compose_with_another_wrapper():
    model, spec = build("resnet10t", wrapper="passport", wrapper_params={})
    x = inputs(8)
    before = exact_logits(model, x, "cpu")
    out = create_attack("dummy_neurons").apply(model, context(spec, x))
    assert out.spec.wrapper_params["base"] == {"wrapper": "passport", "wrapper_params": {}}
    passports = [n for n, m in out.model.named_modules() if type(m).__name__ == "PassportNorm"]
    assert passports  # left alone (opaque to the analysis)
    assert (exact_logits(rebuilt(out.model, out.spec), x, "cpu") - before).abs().max() <= TOL


def _scenario(tmp_path: Path, archs: list[str], attacks: list) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "equivalence",
        "dataset": {"name": "synthetic", "image_size": 32, "channels": 3, "num_classes": 4},
        "archs": archs, "methods": ["none"], "attacks": attacks,
    }))  # fmt: skip
    return str(path)


def test_rescale_on_convnext_is_refused_before_any_task(tmp_path, capsys):
    path = _scenario(tmp_path, ["convnext_atto"], ["rescale"])
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "attacks[0].params.layers" in err and "convnext_atto" in err
    assert "positively homogeneous" in err and "Allowed:" in err


def test_a_layer_that_heads_no_chain_is_refused(tmp_path, capsys):
    attack = {"name": "permute", "params": {"layers": ["fc"]}}  # writes the logits
    assert main(["validate", _scenario(tmp_path, ["resnet10t"], [attack])]) == 2
    err = capsys.readouterr().err
    assert "attacks[0].params.layers" in err and "layer1.0.conv1" in err  # what is allowed


def test_supported_archs_validate(tmp_path):
    attacks = ["permute", "rescale", "dummy_neurons"]
    assert main(["validate", _scenario(tmp_path, ["lenet", "resnet10t"], attacks)]) == 0
