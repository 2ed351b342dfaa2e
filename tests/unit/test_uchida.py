"""Uchida et al.'s weight watermark: its layer choice, its refusals at validation, its reading
of suspects without the layer, and a `tune:` over its `lambda` checked with no engine code."""

from __future__ import annotations

import pytest
import torch

from harness.config import parse_scenario
from harness.errors import ConfigError
from harness.grid import check_scenario
from harness.methods.uchida import UchidaParams, bit_accuracy, kernel_mean, pick_layer
from model_zoo import ModelSpec, create_model

BASE = {
    "name": "u",
    "dataset": {"name": "synthetic", "image_size": 16, "channels": 1, "samples": 60},
    "archs": ["lenet"],
    "methods": [{"name": "uchida", "params": {"n_bits": 64}}],
    "attacks": ["identity"],
}


def _lenet():
    return create_model(ModelSpec("lenet", 4, 1, 16))


def test_the_default_layer_is_the_middle_eligible_conv():
    name, conv = pick_layer(_lenet(), UchidaParams(n_bits=64))
    assert name == "features.4" and conv.weight[0].numel() == 144  # 16 in x 3 x 3
    assert kernel_mean(conv).shape == (144,)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"n_bits": 4000}, "methods[0].params.n_bits"),
     ({"layer": "fc"}, "methods[0].params.layer"),
     ({"layer": "features.0", "n_bits": 64}, "methods[0].params.layer"),
     ({"lambda": -1}, "methods[0].params.lambda")],
)  # fmt: skip
def test_what_the_network_cannot_carry_is_refused_at_validation(params, field):
    data = {**BASE, "methods": [{"name": "uchida", "params": params}]}
    with pytest.raises(ConfigError) as err:
        check_scenario(parse_scenario(data), "u.yaml")
    assert err.value.exit_code == 2 and err.value.field == field, str(err.value)


def test_a_suspect_without_the_layer_reads_as_nothing():
    key = {"X": torch.randn(64, 144), "b": torch.ones(64), "layer": "features.4"}
    assert bit_accuracy(_lenet(), key) is not None
    other = create_model(ModelSpec("resnet10t", 4, 1, 16))
    assert bit_accuracy(other, key) is None  # no such module: verify reports chance, not found


def test_lambda_is_tunable_by_its_yaml_name():
    data = {
        **BASE,
        "tune": {"method": "uchida", "space": {"lambda": {"low": 0.01, "high": 10, "log": True}}},
    }
    check_scenario(parse_scenario(data), "u.yaml")
    bad = {**data, "tune": {"method": "uchida", "space": {"lambda_": {"low": 0.1, "high": 1}}}}
    with pytest.raises(ConfigError) as err:
        check_scenario(parse_scenario(bad), "u.yaml")
    assert err.value.field == "tune.space.lambda_" and err.value.hint == "lambda"
