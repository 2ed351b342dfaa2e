"""Frontier stitching: the FGSM step WRT's recipe takes, and bad parameters refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from harness.cli import main
from harness.methods.frontier_stitching import fgsm


def test_fgsm_is_one_signed_step_of_eps_against_the_own_prediction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(16, 3, 8, 8) * 0.8 + 0.1  # away from 0 and 1: no clipping
    adv = fgsm(model, x, 0.05, "cpu")
    assert adv.dtype == torch.float32 and adv.shape == x.shape
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.05), atol=1e-6)
    with torch.no_grad():
        pred = model(x).argmax(1)
        before = nn.functional.cross_entropy(model(x), pred)
        after = nn.functional.cross_entropy(model(adv), pred)
    assert after > before  # the step moves away from the model's own prediction
    assert fgsm(model, torch.zeros(2, 3, 8, 8), 0.5, "cpu").min() >= 0  # clipped to [0, 1]


@pytest.mark.parametrize(
    "params, field", [({"eps": 0}, "eps"), ({"eps": -0.1}, "eps"), ({"n_keys": 1}, "n_keys")]
)
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fs", "dataset": {"name": "digits", "image_size": 32, "channels": 1},
        "archs": ["lenet"], "attacks": ["identity"],
        "methods": [{"name": "frontier_stitching", "params": params}],
    }))  # fmt: skip
    assert main(["validate", str(path)]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err
