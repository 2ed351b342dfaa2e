"""BlackMarks: the class clustering, the targeted FGSM step and bad parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from harness.cli import main
from harness.methods.blackmarks import bit_accuracy, class_clusters
from harness.methods.frontier_stitching import fgsm


class Fixed(nn.Module):
    """Logits = the input's first 4 pixel values (a model whose outputs we choose)."""

    def forward(self, x):
        return x.flatten(1)[:, :4] * 10


def test_classes_with_alike_logits_share_a_cluster():
    x = torch.zeros(8, 1, 2, 2)
    x.view(8, -1)[:4, :2] = 0.9  # classes 0, 1: high logits on outputs 0 and 1
    x.view(8, -1)[4:, 2:] = 0.9  # classes 2, 3: on outputs 2 and 3
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    f = class_clusters(Fixed(), x, y, 4, "cpu", seed=0)
    assert f[0] == f[1] and f[2] == f[3] and f[0] != f[2]


def test_targeted_fgsm_steps_toward_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(16, 3, 8, 8) * 0.8 + 0.1
    target = torch.full((16,), 2)
    adv = fgsm(model, x, 0.05, "cpu", target=target)
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.05), atol=1e-6)
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x), target)
        after = nn.functional.cross_entropy(model(adv), target)
    assert after < before


def test_bit_accuracy_decodes_predicted_classes_through_the_clusters():
    x = torch.zeros(4, 1, 2, 2)
    for i, c in enumerate([0, 2, 1, 3]):
        x.view(4, -1)[i, c] = 1.0  # predicted classes 0, 2, 1, 3
    key = {"x": x, "f": torch.tensor([0, 0, 1, 1]), "bits": torch.tensor([0, 1, 0, 0])}
    assert bit_accuracy(Fixed(), key, "cpu") == 0.75  # decoded 0, 1, 0, 1


@pytest.mark.parametrize(
    "params, field", [({"eps": 0}, "eps"), ({"n_bits": 1}, "n_bits"), ({"boost": 0}, "boost")]
)
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bm", "dataset": {"name": "digits", "image_size": 32, "channels": 1},
        "archs": ["lenet"], "attacks": ["identity"],
        "methods": [{"name": "blackmarks", "params": params}],
    }))  # fmt: skip
    assert main(["validate", str(path)]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err
