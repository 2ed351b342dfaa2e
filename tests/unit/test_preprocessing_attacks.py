"""The input-preprocessing attacks of WRT (smooth, input_noise, input_quantize, flip, occlude,
input_reconstruction): each transform's defining property, their refusals at validation, and
one real cell each on a trigger-set-marked lenet."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.attacks import smooth as smooth_module
from harness.attacks.flip import flip
from harness.attacks.input_noise import add_noise
from harness.attacks.input_quantize import quantize_inputs
from harness.attacks.input_reconstruction import Autoencoder, InputReconstruction
from harness.attacks.smooth import (
    Smooth,
    SmoothParams,
    kernel_size,
    mean_filter,
    median_filter,
    smooth,
)
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.image_metrics import psnr as psnr_of
from harness.methods import create_method
from harness.stages import context, run_cell
from harness.training import as_float
from model_zoo import create_model


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _checkerboard(size: int = 16) -> torch.Tensor:
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2).float().expand(2, 1, size, size)


# ----------------------------------------------------------------------------- smooth


def test_gaussian_keeps_a_constant_image_and_flattens_a_checkerboard():
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(smooth(flat, "gaussian", 5, 0.5), flat, atol=1e-6)  # no dark border
    board = _checkerboard()
    assert smooth(board, "gaussian", 5, 0.5).var() < 0.5 * board.var()
    assert smooth(board, "gaussian", 5, 2.0).var() < smooth(board, "gaussian", 5, 0.5).var()


def test_gaussian_kernel_is_the_normalised_gaussian_of_sigma():
    delta = torch.zeros(1, 1, 9, 9)
    delta[..., 4, 4] = 1.0
    out = smooth(delta, "gaussian", 5, 0.7)[0, 0, 2:7, 2:7]  # the kernel, mirrored (symmetric)
    d = torch.arange(-2, 3).float()
    g = torch.exp(-(d**2) / (2 * 0.7**2))
    g = g / g.sum()
    assert torch.allclose(out, g[:, None] * g[None, :], atol=1e-6)


def test_default_kernel_follows_wrt():
    assert kernel_size(SmoothParams()) == 5  # sigma 0.5: odd ceil(6 sigma + 1)
    assert kernel_size(SmoothParams(sigma=0.6)) == 5
    assert kernel_size(SmoothParams(sigma=0.7)) == 7
    assert kernel_size(SmoothParams(kind="median")) == 3
    assert kernel_size(SmoothParams(kind="mean", kernel=7)) == 7


def test_median_removes_salt_noise_that_the_mean_only_spreads():
    clean = torch.full((1, 2, 12, 12), 0.3)
    salty = clean.clone()
    for c, i, j in [(0, 2, 3), (0, 7, 9), (1, 5, 5), (1, 0, 11), (0, 11, 0)]:
        salty[0, c, i, j] = 1.0  # isolated pixels, corners and edges included
    assert torch.equal(median_filter(salty, 3), clean)
    assert not torch.allclose(mean_filter(salty, 3), clean, atol=0.05)


def test_median_and_mean_match_a_direct_neighbourhood_reading():
    x = _rand(2, 3, 7, 6)
    med, mean = median_filter(x, 3), mean_filter(x, 3)
    for i in range(1, 6):  # interior pixels: the window needs no padding
        for j in range(1, 5):
            window = x[:, :, i - 1 : i + 2, j - 1 : j + 2].flatten(2)
            assert torch.equal(med[:, :, i, j], window.median(-1).values)
            assert torch.allclose(mean[:, :, i, j], window.mean(-1), atol=1e-6)
    flat = torch.full((1, 2, 5, 5), 0.7)
    assert torch.equal(median_filter(flat, 5), flat)
    assert torch.allclose(mean_filter(flat, 5), flat)


# ----------------------------------------------------------------------------- input_noise


def test_noise_has_the_asked_std_is_fresh_per_query_and_replays_from_its_seed():
    grey = torch.full((64, 1, 32, 32), 0.5)
    attack = create_attack("input_noise", {"sigma": 0.05, "seed": 3})
    first, second = attack.transform(grey, None), attack.transform(grey, None)
    assert abs((first - grey).std().item() - 0.05) < 0.002  # 65k draws: 0.3 % std error
    assert abs((first - grey).mean().item()) < 0.001
    assert not torch.equal(first, second)  # every query gets its own noise
    again = create_attack("input_noise", {"sigma": 0.05, "seed": 3})  # a rebuilt deployment
    assert torch.equal(again.transform(grey, None), first)
    assert torch.equal(again.transform(grey, None), second)
    other = create_attack("input_noise", {"sigma": 0.05, "seed": 4}).transform(grey, None)
    assert not torch.equal(other, first)


def test_noise_is_clipped_to_the_image_range():
    x = torch.tensor([0.0, 1.0]).repeat(1, 1, 8, 8)
    out = add_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out > 0).any() and (out < 1).any()


# ----------------------------------------------------------------------------- input_quantize


def test_squeezing_to_4_bits_is_wrts_round_15x_over_15():
    x = _rand(4, 3, 8, 8)
    out = quantize_inputs(x, 16, "squeeze")
    assert torch.equal(out, torch.round(x * 15) / 15)
    ramp = torch.linspace(0, 1, 1001).view(1, 1, 1, -1)
    values = quantize_inputs(ramp, 16, "squeeze").unique()
    assert torch.allclose(values, torch.arange(16) / 15)  # 0 and 1 included
    assert (quantize_inputs(ramp, 16, "squeeze") - ramp).abs().max() <= 0.5 / 15 + 1e-6


@pytest.mark.parametrize("levels", [16, 12, 10, 2])
def test_bins_map_every_pixel_to_its_bin_midpoint(levels):
    ramp = torch.linspace(0, 1, 1001).view(1, 1, 1, -1)
    out = quantize_inputs(ramp, levels, "bins")
    assert torch.allclose(out.unique(), (torch.arange(levels) + 0.5) / levels)
    assert (out - ramp).abs().max() <= 0.5 / levels + 1e-6
    assert out[..., -1].item() == pytest.approx(1 - 0.5 / levels)  # the top bin too (WRT: not)
    x = _rand(2, 3, 16, 16)
    assert len(quantize_inputs(x, levels, "bins").unique()) <= levels


# ----------------------------------------------------------------------------- flip


def test_flip_mirrors_and_twice_is_the_identity():
    x = _rand(3, 2, 5, 7)
    for direction, dim in [("horizontal", -1), ("vertical", -2)]:
        once = flip(x, direction)
        assert not torch.equal(once, x)
        assert torch.equal(once.select(dim, 0), x.select(dim, -1))
        assert torch.equal(flip(once, direction), x)


# ----------------------------------------------------------------------------- occlude


def test_occlude_covers_exactly_one_square_per_image_and_channel():
    x = 0.25 + 0.5 * _rand(32, 3, 16, 16)  # never 0: every cover shows
    attack = create_attack("occlude", {"size": 5, "fill": 0.0, "seed": 1})
    out = attack.transform(x, None)
    changed = out != x
    assert (changed.sum((2, 3)) == 25).all()  # size^2 pixels per channel
    assert (out[changed] == 0).all()
    assert torch.equal(changed, changed[:, :1].expand_as(changed))  # the same square in each
    rows, cols = changed[:, 0].any(2), changed[:, 0].any(1)  # N x H, N x W
    assert (rows.sum(1) == 5).all() and (cols.sum(1) == 5).all()  # one 5 x 5 square
    tops = rows.float().argmax(1)
    assert len(tops.unique()) > 3  # placed at random per query
    assert not torch.equal(attack.transform(x, None), out)  # and afresh per batch
    again = create_attack("occlude", {"size": 5, "fill": 0.0, "seed": 1})
    assert torch.equal(again.transform(x, None), out)  # replayed by a rebuilt deployment


def test_occlude_mean_fill_is_each_images_channel_mean_and_whole_image_fits():
    x = _rand(4, 3, 8, 8)
    out = create_attack("occlude", {"size": 8, "fill": "mean"}).transform(x, None)
    assert torch.allclose(out, x.mean((2, 3), keepdim=True).expand_as(x))


# ----------------------------------------------------------------------------- refusals


def _write(tmp_path: Path, attack: str, params: dict) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pre", "archs": ["lenet"], "methods": ["none"],
        "dataset": {"name": "digits", "image_size": 32, "channels": 1},
        "attacks": [{"name": attack, "params": params}],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("attack", "params", "field"),
    [("smooth", {"kernel": 4}, "kernel"),  # even
     ("smooth", {"kernel": 33}, "kernel"),  # larger than the 32-pixel images
     ("smooth", {"sigma": 6}, "kernel"),  # its default kernel (37) does not fit either
     ("smooth", {"sigma": -1}, "sigma"),
     ("occlude", {"size": 33}, "size"),
     ("occlude", {"fill": "grey"}, "fill"),
     ("input_noise", {"sigma": -0.1}, "sigma"),
     ("input_quantize", {"levels": 1}, "levels")],
)  # fmt: skip
def test_bad_parameters_exit_2(tmp_path: Path, capsys, attack, params, field):
    assert main(["validate", _write(tmp_path, attack, params)]) == 2
    err = capsys.readouterr().err
    assert f"attacks[0].params.{field}:" in err


def test_a_kernel_or_square_as_large_as_the_image_is_valid(tmp_path: Path):
    assert main(["validate", _write(tmp_path, "smooth", {"kind": "median", "kernel": 31})]) == 0
    assert main(["validate", _write(tmp_path, "occlude", {"size": 32})]) == 0


# ----------------------------------------------------------------------------- real cells

DATA = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=2, batch_size=32, lr=0.05)
MARK = {"n_keys": 20, "n_null": 2, "epochs": 6}


def _cell(attack: str, params: dict) -> Cell:
    return Cell(
        "pre", DATA.model_dump(mode="json"), TRAIN.model_dump(mode="json"), "lenet",
        "trigger_set", create_method("trigger_set", MARK).params.model_dump(mode="json"),
        attack, create_attack(attack, params).params.model_dump(mode="json"), 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("preprocessing-store"))


def _models(store: str, cell: Cell):
    artifacts = ArtifactStore(store)
    marked, _ = artifacts.load_model(artifacts.load_meta("embed", cell.embed_key()))
    attacked, spec = artifacts.load_model(artifacts.load_meta("attack", cell.attack_key()))
    return marked.eval(), attacked.eval(), spec


def _same_weights(marked, attacked) -> bool:
    theirs = attacked.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in marked.state_dict().items())


PROBE = _rand(16, 1, 16, 16, seed=5)


@pytest.mark.parametrize(
    ("attack", "params", "reference"),
    [("smooth", {}, lambda x: smooth(x, "gaussian", 5, 0.5)),
     ("smooth", {"kind": "median", "kernel": 3}, lambda x: median_filter(x, 3)),
     ("input_quantize", {}, lambda x: quantize_inputs(x, 16, "bins")),
     ("input_quantize", {"mode": "squeeze", "levels": 4}, lambda x: torch.round(x * 3) / 3),
     ("flip", {"direction": "vertical"}, lambda x: x.flip(-2)),
     ("flip", {}, lambda x: x.flip(-1)),
     ("input_noise", {"sigma": 0.1}, None),
     ("occlude", {"size": 6, "fill": 0.5}, None)],
)  # fmt: skip
def test_a_cell_leaves_the_marked_weights_and_serves_through_the_transform(
    store, one_thread, attack, params, reference
):
    cell = _cell(attack, params)
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    assert row["wm_score_marked"] >= 0.8 and 0.0 <= row["wm_score_attacked"] <= 1.0
    marked, attacked, spec = _models(store, cell)
    assert spec.wrapper == "input_transform" and spec.wrapper_params["attack"] == attack
    assert spec.wrapper_params["params"] == cell.attack_params
    assert _same_weights(marked, attacked)
    assert set(attacked.state_dict()) == set(marked.state_dict())  # no trained parts
    with torch.no_grad():
        if reference is not None:  # deterministic: exactly the marked model on the transform
            assert torch.allclose(attacked(PROBE), marked(reference(PROBE)), atol=1e-5)
        else:  # random: the answers move, and differ from one asking to the next
            first, second = attacked(PROBE), attacked(PROBE)
            assert not torch.allclose(first, marked(PROBE), atol=1e-4)
            assert not torch.allclose(first, second, atol=1e-4)
    print(f"{attack} {params}: task {row['task_score_marked']:.3f} -> "
          f"{row['task_score_attacked']:.3f}, wm {row['wm_score_marked']:.2f} -> "
          f"{row['wm_score_attacked']:.2f}")  # fmt: skip


def test_smoothing_with_fine_tuning_trains_the_weights_through_the_filter(
    store, one_thread, monkeypatch
):
    filtered, trained = [], {}
    transform, fine_tune = Smooth.transform, smooth_module.train_on_attacker_data

    def count(self, x, modules):
        filtered.append(len(x))
        return transform(self, x, modules)

    def watch(model, ctx, *args, **kw):
        before = sum(filtered)
        fine_tune(model, ctx, *args, **kw)
        trained.update(seen=sum(filtered) - before, attacker=len(ctx.data.attacker))

    monkeypatch.setattr(Smooth, "transform", count)
    monkeypatch.setattr(smooth_module, "train_on_attacker_data", watch)
    cell = _cell("smooth", {"kind": "mean", "kernel": 3, "fine_tune_epochs": 2})
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    assert trained["seen"] == 2 * trained["attacker"]  # every training image was filtered
    marked, attacked, spec = _models(store, cell)
    assert spec.wrapper == "input_transform" and not _same_weights(marked, attacked)
    bare = create_model(spec.replace(wrapper=None, wrapper_params=None)).eval()
    bare.load_state_dict(attacked.state_dict())
    with torch.no_grad():  # the stored model is the fine-tuned weights behind the filter
        assert torch.allclose(attacked(PROBE), bare(mean_filter(PROBE, 3)), atol=1e-5)
    print(f"smooth mean 3 + 2 epochs: task {row['task_score_marked']:.3f} -> "
          f"{row['task_score_attacked']:.3f}, wm {row['wm_score_marked']:.2f} -> "
          f"{row['wm_score_attacked']:.2f}")  # fmt: skip


def test_input_reconstruction_stores_its_trained_autoencoder(store, one_thread, monkeypatch):
    live = {}
    apply = InputReconstruction.apply

    def spy(self, model, ctx):
        out = apply(self, model, ctx)
        live["model"] = out.model
        return out

    monkeypatch.setattr(InputReconstruction, "apply", spy)
    cell = _cell("input_reconstruction", {"width": 16, "epochs": 20})
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    marked, attacked, spec = _models(store, cell)
    assert spec.wrapper_params["attack"] == "input_reconstruction"
    assert _same_weights(marked, attacked)  # the classifier's own weights are untouched
    parts = {k for k in attacked.state_dict() if k.startswith("input_transform0.")}
    assert {"input_transform0.encode.weight", "input_transform0.norm.running_mean"} <= parts
    with torch.no_grad():
        stored = attacked(PROBE)
        assert torch.allclose(stored, live["model"].eval()(PROBE), atol=1e-6)
        assert not torch.allclose(stored, marked(PROBE), atol=1e-3)
    psnr = row["metrics"]["reconstruction_psnr"]
    assert math.isfinite(psnr)
    print(f"input_reconstruction: PSNR {psnr:.1f} dB, task {row['task_score_marked']:.3f} -> "
          f"{row['task_score_attacked']:.3f}, wm {row['wm_score_marked']:.2f} -> "
          f"{row['wm_score_attacked']:.2f}")  # fmt: skip
    images = as_float(context(cell, "cpu").data.attacker.x)
    with torch.no_grad():
        blank = psnr_of(Autoencoder(1, 16).eval()(images), images).mean().item()
    assert psnr > blank + 5  # training, not the architecture, makes it reconstruct (~18 vs 11)
