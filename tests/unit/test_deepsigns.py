"""DeepSigns' activation watermark: the bit extraction, its layer choice, its refusals at
validation and its reading of suspects without the layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from harness.attacks import create_attack
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.methods import create_method
from harness.methods.deepsigns import (
    DeepSignsParams,
    bit_accuracy,
    extract_bits,
    layer_widths,
    mean_activations,
    pick_layer,
)
from harness.stages import run_cell
from model_zoo import ModelSpec, create_model


def _lenet(size: int = 16):
    return create_model(ModelSpec("lenet", 4, 1, size)).eval()


def test_bits_are_the_signs_of_the_projected_mean_activation():
    a = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, -1.0]])  # (features 2, bits 3)
    means = torch.tensor([[3.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])  # (classes 3, features 2)
    bits = extract_bits(means, a)
    # class 0: (3, -1, -1) -> 1 0 0; class 1: (-1, 1, 0) -> 0 1 0 (sigmoid(0) = 0.5 is no 1);
    # class 2: all zero -> 0 0 0
    assert bits.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert extract_bits(2.5 * means, a).equal(bits)  # a positive scale reads the same bits


def test_mean_activations_average_each_class_of_the_hooked_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x_key = torch.randint(0, 256, (2, 5, 1, 2, 2), dtype=torch.uint8)  # 2 classes x 5 images
    means = mean_activations(model, "1", x_key, batch_size=2)  # batches of 2, 2, 1
    with torch.no_grad():
        want = torch.stack([model[1](x.float().div(255).flatten(1)).mean(0) for x in x_key])
    assert means.shape == (2, 3) and torch.allclose(means, want, atol=1e-6)
    assert mean_activations(model, "nope", x_key) is None


def test_the_default_layer_is_a_middle_deep_stage_with_room_for_the_bits():
    x16, x32 = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 32)
    assert pick_layer(_lenet(), DeepSignsParams(), x16) == "features.6"  # ReLU after conv 2
    resnet = create_model(ModelSpec("resnet10t", 10, 1, 32))
    assert pick_layer(resnet, DeepSignsParams(), x32) == "layer3"
    mobile = create_model(ModelSpec("mobilenetv3_small_050", 10, 1, 32))
    widths = layer_widths(mobile, ["blocks.1", "blocks.3"], x32)
    assert widths == {"blocks.1": 256, "blocks.3": 96}  # blocks.3 cannot carry 100 bits
    assert pick_layer(mobile, DeepSignsParams(), x32) == "blocks.1"
    assert pick_layer(mobile, DeepSignsParams(n_bits=64), x32) == "blocks.3"
    assert pick_layer(resnet, DeepSignsParams(layer="layer2.0.conv1"), x32) == "layer2.0.conv1"


def test_a_suspect_without_the_layer_or_its_width_reads_as_nothing():
    model = _lenet()
    x_key = torch.randint(0, 256, (1, 8, 1, 16, 16), dtype=torch.uint8)
    width = mean_activations(model, "features.6", x_key).shape[1]
    key = {"layer": "features.6", "A": torch.randn(width, 16), "b": torch.ones(1, 16),
           "x_key": x_key}  # fmt: skip
    assert 0.0 <= bit_accuracy(model, key) <= 1.0
    assert bit_accuracy(create_model(ModelSpec("resnet10t", 4, 1, 16)), key) is None
    wider = {**key, "A": torch.randn(width + 8, 16)}  # e.g. a widened layer
    assert bit_accuracy(model, wider) is None


def _write(tmp_path: Path, params: dict, archs=("lenet",), dataset=None) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ds", "archs": list(archs), "attacks": ["identity"],
        "dataset": dataset or {"name": "digits", "image_size": 32, "channels": 1},
        "methods": [{"name": "deepsigns", "params": params}],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"layer": "features.99"}, "layer"),
     ({"layer": "layer3"}, "layer"),  # a resnet stage, not a lenet module
     ({"n_classes_marked": 11}, "n_classes_marked"),  # digits has 10 classes
     ({"n_classes_marked": 0}, "n_classes_marked"),
     ({"n_bits": 0}, "n_bits"),
     ({"key_images": 1}, "key_images"),
     ({"gamma1": -1}, "gamma1"),
     ({"layer": "features.9", "n_bits": 100}, "n_bits")],  # 64 values
)  # fmt: skip
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    assert main(["validate", _write(tmp_path, params)]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err


def test_a_bad_layer_lists_what_the_network_has(tmp_path: Path, capsys):
    assert main(["validate", _write(tmp_path, {"layer": "layer9"}, ["resnet10t"])]) == 2
    err = capsys.readouterr().err
    assert "arch 'resnet10t'" in err and "layer3" in err and "layer4" in err


def test_more_gaussians_than_synthetic_classes_are_refused(tmp_path: Path, capsys):
    data = {"name": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4}
    assert main(["validate", _write(tmp_path, {"n_classes_marked": 5}, dataset=data)]) == 2
    assert "methods[0].params.n_classes_marked" in capsys.readouterr().err
    assert main(["validate", _write(tmp_path, {"n_classes_marked": 4}, dataset=data)]) == 0


# ------------------------------------------------------------------------- real cells


def _cell(attack: str, **method) -> Cell:
    data = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
    train = TrainCfg(epochs=3, batch_size=32, lr=0.05)
    params = {"n_bits": 32, "key_images": 32, "wm_every": 1, "epochs": 8, "n_null": 2, **method}
    params = create_method("deepsigns", params).params.model_dump()
    return Cell(
        "ds", data.model_dump(mode="json"), train.model_dump(mode="json"), "lenet", "deepsigns",
        params, attack, create_attack(attack, {}).params.model_dump(), 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("deepsigns-store"))


def test_the_mark_survives_identity_and_falls_to_permutation_unless_aligned(store, one_thread):
    marked = run_cell(_cell("identity"), store)
    assert marked["status"] == "ok", marked.get("traceback")
    assert marked["wm_detected"] and marked["wm_score_attacked"] >= 0.9
    assert marked["metrics"]["layer_found"] == 1.0
    plain = run_cell(_cell("permute"), store)
    aligned = run_cell(_cell("permute", align=True), store)
    for row in (plain, aligned):
        assert row["status"] == "ok", row.get("traceback")
        assert row["metrics"]["max_logit_deviation"] <= 1e-4
    # the permuted activation's projection is another random vector: bits near chance
    assert plain["wm_score_attacked"] < 0.8 and not plain["wm_detected"]
    # aligned to the marked model first: the unattacked figure back
    assert aligned["wm_score_attacked"] == pytest.approx(marked["wm_score_attacked"], abs=0.02)
    assert aligned["wm_detected"] and aligned["metrics"]["aligned_chains"] >= 1
    assert "aligned_chains" not in plain["metrics"]
