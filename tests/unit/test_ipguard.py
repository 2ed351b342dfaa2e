"""IPGuard: the loss and its optimisation put keys just across the i/j boundary, and bad
parameters are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from harness.cli import main
from harness.methods.ipguard import ipguard_keys, ipguard_loss, to_uint8


def test_loss_is_zero_exactly_past_the_margin_with_i_the_runner_up():
    logits = torch.tensor(
        [
            [0.0, 2.0, 1.0, -1.0],  # j=1 leads i=2 by 1, i is runner-up: 0
            [0.0, 1.5, 1.0, -1.0],  # j leads by 0.5 < k: 0.5
            [3.0, 2.0, 1.0, -1.0],  # t=0 above i: ReLU(1 - 2 + 1) + (3 - 1)
        ]
    )
    i, j = torch.tensor([2, 2, 2]), torch.tensor([1, 1, 1])
    assert ipguard_loss(logits, i, j, 1.0).tolist() == pytest.approx([0.0, 0.5, 2.0])
    two = torch.tensor([[0.0, 2.0]])  # two classes: no third term
    assert ipguard_loss(two, torch.tensor([0]), torch.tensor([1]), 1.0).item() == 0.0


def test_keys_sit_on_the_j_side_of_the_i_j_boundary_by_k():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 8 * 8, 4))
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        i = model(x).argmax(1)
    j = (i + torch.randint(1, 4, (32,))) % 4
    k = 1.0
    keys, done = ipguard_keys(model, x, i, j, k, steps=500, lr=0.05, device="cpu")
    weights = [p.clone() for p in model.parameters()]
    assert keys.shape == x.shape and keys.dtype == torch.float32
    assert keys.min() >= 0 and keys.max() <= 1
    assert done.float().mean() > 0.9
    with torch.no_grad():
        z = model(keys[done])
    ii, jj = i[done], j[done]
    z_i, z_j = z.gather(1, ii[:, None]).squeeze(1), z.gather(1, jj[:, None]).squeeze(1)
    assert (z_j - z_i >= k - 1e-4).all()  # on the j side, by the margin
    assert (z.argmax(1) == jj).all()
    runner_up = z.scatter(1, jj[:, None], float("-inf")).argmax(1)
    assert (runner_up == ii).all()  # i is the runner-up
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # the weights never saw a gradient
    # stored as uint8: the round trip keeps most keys' label j
    with torch.no_grad():
        labels = model(to_uint8(keys[done]).float() / 255).argmax(1)
    assert (labels == jj).float().mean() > 0.9


def test_finished_points_stop_moving():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        z = model(x)
    i = z.argsort(1)[:, 1]  # runner-up
    j = z.argmax(1)  # leader: done at once if it leads by k
    lead = (z.gather(1, j[:, None]) - z.gather(1, i[:, None])).squeeze(1)
    keys, done = ipguard_keys(model, x, i, j, 1e-3, steps=50, lr=0.05, device="cpu")
    start = lead >= 1e-3
    assert start.any() and done[start].all()
    assert torch.equal(keys[start], x[start])


@pytest.mark.parametrize(
    "params, field", [({"k": 0}, "k"), ({"k": -1}, "k"), ({"n_keys": 0}, "n_keys")]
)
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ipg", "dataset": {"name": "digits", "image_size": 32, "channels": 1},
        "archs": ["lenet"], "attacks": ["identity"],
        "methods": [{"name": "ipguard", "params": params}],
    }))  # fmt: skip
    assert main(["validate", str(path)]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err
