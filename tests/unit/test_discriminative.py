"""The discriminative-samples method's building blocks against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from harness.config import parse_scenario
from harness.errors import ConfigError
from harness.methods.discriminative import (
    DiscriminativeParams,
    accept,
    descend,
    in_band,
    margin,
    project,
    quantize8,
    ssim,
)


def test_margin_is_on_softmax_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    p = torch.softmax(logits, 1)
    got = margin(logits, torch.tensor([0, 0]))
    assert got[0].item() == pytest.approx((p[0, 0] - p[0, 1]).item())
    assert got[1].item() == pytest.approx((p[1, 0] - p[1, 2]).item())
    assert got[1] < 0  # a wrong label has a negative margin


def test_band_is_open_on_both_sides():
    m = torch.tensor([0.3, 0.31, 0.49, 0.5, 0.9, -0.1])
    assert in_band(m, 0.5, 0.2).tolist() == [False, True, True, False, False, False]


def test_projection_keeps_the_linf_ball_and_the_pixel_box():
    x0 = torch.tensor([0.1, 0.5, 0.95])
    x = torch.tensor([-0.5, 0.9, 1.4])
    assert torch.allclose(project(x, x0, 0.2), torch.tensor([0.0, 0.7, 1.0]))


def test_8bit_round_trip_is_idempotent_and_on_the_grid():
    x = torch.rand(2, 1, 8, 8)
    q = quantize8(x)
    assert torch.equal(quantize8(q), q)
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-4)
    assert (q - x).abs().max() <= 0.5 / 255 + 1e-6


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 32, 32, generator=g)
    b = (a + 0.05 * torch.randn(1, 1, 32, 32, generator=g)).clamp(0, 1)
    ref = structural_similarity(
        a[0, 0].numpy(),
        b[0, 0].numpy(),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(b, a).item() == pytest.approx(ref, abs=2e-3)
    assert ssim(a, a).item() == pytest.approx(1.0)
    assert np.isfinite(ref)


class Linear2(torch.nn.Module):
    """Logits (s * (mean(x) - 0.5), 0): the margin towards class 0 shrinks as pixels darken."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        z = self.scale * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_descent_stops_below_tau_stays_in_eps_and_lands_in_band():
    model = Linear2(10.0).eval()
    x0 = torch.full((4, 1, 4, 4), 0.9)
    t = torch.zeros(4, dtype=torch.long)
    p = DiscriminativeParams(steps=2000, alpha=1e-3, eps=0.5)
    assert (margin(model(x0), t) > p.tau).all()
    x = descend(x0, t, model, None, None, p)
    m = margin(model(x), t)
    assert (m < p.tau).all() and (m > p.tau - 0.05).all()  # stopped just past tau
    assert (x0 - x).abs().max() <= p.eps + 1e-6
    keys, ok = accept(x, t, model, p)
    assert ok.all() and torch.equal(keys, quantize8(x))


def test_descent_never_leaves_the_ball_when_tau_is_unreachable():
    model = Linear2(10.0).eval()
    x0 = torch.full((2, 1, 4, 4), 0.9)
    t = torch.zeros(2, dtype=torch.long)
    p = DiscriminativeParams(steps=500, alpha=1e-2, eps=0.05)
    x = descend(x0, t, model, None, None, p)
    assert math.isclose((x0 - x).abs().max().item(), 0.05, abs_tol=1e-6)
    _, ok = accept(x, t, model, p)
    assert not ok.any()  # margin still above the band


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"source_arch": "resnt10t"}, "source_arch"),
        ({"w_f": -1.0}, "w_f"),
        ({"w_g": float("nan")}, "w_g"),
        ({"tau_accept": 0.2, "delta": 0.2}, ""),
        ({"benign_sim": {"name": "quantise"}}, "benign_sim"),
    ],
)
def test_bad_parameters_name_the_field(params, field):
    data = {
        "name": "x",
        "archs": ["resnet10t"],
        "attacks": ["identity"],
        "methods": [{"name": "discriminative", "params": params}],
    }
    from harness.grid import check_scenario

    with pytest.raises(ConfigError) as err:
        check_scenario(parse_scenario(data), "x.yaml")
    assert err.value.field.startswith(f"methods[0].params{'.' + field if field else ''}")
    assert err.value.exit_code == 2


def test_unknown_source_arch_keeps_its_close_match():
    data = {
        "name": "x",
        "archs": ["resnet10t"],
        "attacks": ["identity"],
        "methods": [{"name": "discriminative", "params": {"source_arch": "resnt10t"}}],
    }
    from harness.grid import check_scenario

    with pytest.raises(ConfigError) as err:
        check_scenario(parse_scenario(data), "x.yaml")
    assert err.value.hint == "resnet10t"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"attacks": [{"name": "identity", "role": "benign"}]}, "tune.objective"),
        ({"attacks": [{"name": "identity", "role": "malicious"}]}, "tune.objective"),
        (
            {"tune": {"method": "discriminative", "space": {"w_x": {"low": 0, "high": 1}}}},
            "tune.space.w_x",
        ),
        (
            {"tune": {"method": "trigger_set", "space": {"w_f": {"low": 0, "high": 1}}}},
            "tune.method",
        ),
    ],
)
def test_tune_sections_are_checked(change, field):
    from harness.grid import check_scenario

    data = {
        "name": "x",
        "archs": ["resnet10t"],
        "methods": ["discriminative"],
        "attacks": [
            {"name": "identity", "role": "benign"},
            {"name": "fine_tune", "role": "malicious"},
        ],
        "tune": {"method": "discriminative", "space": {"w_f": {"low": 0, "high": 1}}},
    }
    with pytest.raises(ConfigError) as err:
        check_scenario(parse_scenario({**data, **change}), "x.yaml")
    assert err.value.field == field
