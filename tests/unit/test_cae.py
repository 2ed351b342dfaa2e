"""Conferrable adversarial examples: the ensemble and score formulas, the projected Adam
optimisation, the key selection, the declared upstream, and bad parameters refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from harness.cli import main
from harness.methods.base import VictimRef
from harness.methods.cae import (
    CAE,
    CAEParams,
    cem_loss,
    conferrability,
    ensemble_scores,
    generate_keys,
    keep_mask,
    optimise,
    select,
)


def _linear(seed: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 6 * 6, classes)).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def test_ensemble_is_mean_surrogate_softmax_times_one_minus_mean_reference_softmax():
    s = torch.tensor([[[0.6, 0.4]], [[0.8, 0.2]]])  # 2 surrogates, 1 image, 2 classes
    r = torch.tensor([[[0.5, 0.5]], [[0.1, 0.9]]])  # S = (0.7, 0.3), R = (0.3, 0.7)
    assert torch.allclose(ensemble_scores(s, r), torch.tensor([[0.49, 0.09]]))


def test_conferrability_is_surrogate_share_times_one_minus_reference_share():
    t = torch.tensor([0, 1, 2, 3])
    s_pred = torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # shares 1, 2/3, 1/3, 0
    r_pred = torch.tensor([[1, 1, 2, 3], [1, 0, 0, 3]])  # shares 0, 1/2, 1/2, 1
    expected = torch.tensor([1.0, 2 / 3 * 0.5, 1 / 3 * 0.5, 0.0])
    assert torch.allclose(conferrability(s_pred, r_pred, t), expected)


def test_keep_mask_keeps_at_least_one_member():
    g = torch.Generator().manual_seed(0)
    assert keep_mask(5, 1.0, g).all()
    for _ in range(20):
        assert keep_mask(5, 1e-9, g).sum() == 1
    shares = torch.stack([keep_mask(10, 0.7, g) for _ in range(200)]).float().mean()
    assert 0.6 < shares < 0.8


def test_optimisation_stays_in_the_eps_ball_and_the_pixel_box():
    source = _linear(0)
    surrogates, references = [_linear(1), _linear(2)], [_linear(3), _linear(4)]
    x0 = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    x0[:, :, 0] = 0.0  # pixels at the box's edges
    x0[:, :, 1] = 1.0
    p = CAEParams(eps=0.05, steps=30, lr=0.05, n_keys=1, candidates=1)
    x = optimise(x0, source, surrogates, references, p, torch.Generator().manual_seed(0))
    assert x.shape == x0.shape and not x.requires_grad
    assert (x - x0).abs().max() <= 0.05 + 1e-6
    assert x.min() >= 0 and x.max() <= 1
    assert (x - x0).abs().max() > 0.04  # it moved, up to the ball's edge


def test_optimisation_lowers_the_cem_loss():
    source = _linear(0)
    surrogates, references = [_linear(1), _linear(2)], [_linear(3), _linear(4)]
    x0 = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.25
    p = CAEParams(eps=0.2, steps=50, lr=0.02, keep=1.0, n_keys=1, candidates=1)
    p0 = torch.softmax(source(x0), 1)
    x = optimise(x0, source, surrogates, references, p, torch.Generator().manual_seed(0))
    before = cem_loss(x0, p0, source, surrogates, references, p)
    after = cem_loss(x, p0, source, surrogates, references, p)
    assert after.mean() < before.mean()


def test_generate_keys_returns_8_bit_candidates_with_source_labels_and_scores():
    source = _linear(0)
    surrogates, references = [_linear(1)], [_linear(2)]
    x0 = (torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    y0 = source(x0.float() / 255).argmax(1)
    p = CAEParams(eps=0.3, steps=10, lr=0.05, batch_size=2, n_keys=1, candidates=1)
    found = generate_keys(x0, y0, source, surrogates, references, p, "cpu", torch.Generator())
    assert found["x"].dtype == torch.uint8 and found["x"].shape == x0.shape
    assert torch.equal(found["t"], source(found["x"].float() / 255).argmax(1))
    assert torch.equal(found["adversarial"], found["t"] != y0)
    assert ((found["score"] >= 0) & (found["score"] <= 1)).all()


def test_select_keeps_adversarial_conferrable_keys_highest_first():
    found = {
        "adversarial": torch.tensor([True, True, False, True, True]),
        "score": torch.tensor([0.5, 0.9, 1.0, 0.2, 0.9]),
    }
    assert select(found, 3, 0.3).tolist() == [1, 4, 0]  # 2: not adversarial; 3: below 0.3
    assert select(found, 10, 0.95).tolist() == []


def test_declared_upstream_keeps_references_and_null_models_apart():
    method = CAE({"n_surrogates": 3, "n_references": 2, "n_null": 3})
    steps = {s.name: s for s in method.aux_steps()}
    assert set(steps) == {"surrogate0", "surrogate1", "surrogate2", "keygen"}
    assert all(steps[f"surrogate{i}"].resources == "train" for i in range(3))
    keygen = steps["keygen"]
    refs = [n for n in keygen.needs if isinstance(n, VictimRef) and n.name != "source"]
    assert [r.seed_offset for r in refs] == [1, 2]
    assert VictimRef("source") in keygen.needs
    assert {"surrogate0", "surrogate1", "surrogate2"} <= set(keygen.needs)
    assert set(keygen.exclude) == {"n_null", "p_value"}
    nulls = [n for n in method.needs() if isinstance(n, VictimRef)]
    assert [n.seed_offset for n in nulls] == [3, 4, 5]
    assert "keygen" in method.needs()


@pytest.mark.parametrize(
    "params, field",
    [
        ({"eps": 0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"n_surrogates": 0}, "n_surrogates"),
        ({"n_references": 0}, "n_references"),
        ({"min_conferrability": 1.5}, "min_conferrability"),
        ({"min_conferrability": -0.1}, "min_conferrability"),
        ({"keep": 0}, "keep"),
        ({"surrogate_archs": ["no_such_arch"]}, "surrogate_archs"),
    ],
)
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cae", "dataset": {"name": "digits", "image_size": 32, "channels": 1},
        "archs": ["lenet"], "attacks": ["identity"],
        "methods": [{"name": "cae", "params": params}],
    }))  # fmt: skip
    assert main(["validate", str(path)]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err


def test_first_term_takes_the_ensembles_best_class_or_the_sources_label():
    source = _linear(0)
    surrogates, references = [_linear(1), _linear(2)], [_linear(3), _linear(4)]
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(8))
    p0 = torch.softmax(source(x), 1)
    s_probs = torch.stack([torch.softmax(m(x), 1) for m in surrogates])
    r_probs = torch.stack([torch.softmax(m(x), 1) for m in references])
    sigma = ensemble_scores(s_probs, r_probs)
    t = source(x).argmax(1)
    only_first = {"beta": 0, "gamma": 0, "n_keys": 1, "candidates": 1}
    best = cem_loss(x, p0, source, surrogates, references, CAEParams(**only_first))
    assert torch.allclose(best, -torch.log(sigma.max(1).values))
    at_t = cem_loss(
        x, p0, source, surrogates, references, CAEParams(**only_first, ensemble_class="source")
    )
    assert torch.allclose(at_t, -torch.log(sigma.gather(1, t[:, None]).squeeze(1)))
