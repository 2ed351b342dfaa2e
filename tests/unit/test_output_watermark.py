"""Output watermarking and the surrogate attack: watermarks, bad input, the marked model's
rebuild, the training loops, stage 2's simulated surrogates (real tiny cells), on tiny data
(the full method x attack grid is in tests/contract)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.artifacts import Artifact, ArtifactStore
from harness.cells import Cell
from harness.config import DatasetCfg, TrainCfg, parse_scenario
from harness.errors import ConfigError
from harness.grid import check_scenario
from harness.image_training import LOSSES, quantised_outputs, train_image_model
from harness.methods.output_watermark import (
    BUILTIN_WATERMARKS,
    MIN_DARK_AREA,
    OutputWatermark,
    OutputWatermarkParams,
    builtin_watermark,
    dark_area,
)
from harness.stages import load_splits, run_cell, run_job
from harness.training import as_float
from model_zoo import ModelSpec, create_model
from model_zoo.image2image import Barrier

pytestmark = pytest.mark.usefixtures("one_thread")


def scenario(method_params=None, attack=None, size=32, arch="unet@8"):
    return parse_scenario(
        {
            "name": "ow",
            "dataset": {"name": "photo_pairs", "image_size": size, "samples": 60},
            "archs": [arch],
            "methods": [{"name": "output_watermark", "params": method_params or {}}],
            "attacks": [attack or "identity"],
        }
    )


def refused(sc) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        check_scenario(sc, "ow.yaml")
    assert err.value.exit_code == 2
    return err.value


@pytest.mark.parametrize("name", BUILTIN_WATERMARKS)
@pytest.mark.parametrize("size", [32, 64, 256])
def test_builtin_watermarks_are_binary_with_enough_dark_area(name, size):
    delta = builtin_watermark(name, size)
    assert delta.shape == (1, size, size)
    assert set(delta.unique().tolist()) == {0.0, 1.0}
    assert dark_area(delta) >= MIN_DARK_AREA
    # the NC pitfall: a blank (white) extraction stays far below the 0.95 threshold
    from harness.image_metrics import nc

    assert nc(torch.ones(1, 1, size, size), delta[None]).item() < 0.8


def test_user_watermark_path_must_exist_and_fit(tmp_path):
    err = refused(scenario({"watermark_path": str(tmp_path / "missing.png")}))
    assert err.field == "methods[0].params.watermark_path"
    assert "not found" in str(err)
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(wrong)
    err = refused(scenario({"watermark_path": str(wrong)}))
    assert err.field == "methods[0].params.watermark_path" and err.allowed == "32x32"
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(blank)
    err = refused(scenario({"watermark_path": str(blank)}))
    assert "dark area" in str(err)
    good = tmp_path / "good.png"
    Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).save(good)
    check_scenario(scenario({"watermark_path": str(good)}), "ow.yaml")


def test_image_size_below_what_the_unet_depth_needs_is_refused():
    err = refused(scenario({"h_depth": 6}))
    assert err.field == "methods[0].params.h_depth" and 5 in err.allowed
    err = refused(scenario(size=16, arch="cnet@8", method_params={"h_depth": 4, "lambda3": 0}))
    assert err.field == "archs[0]" or err.field.startswith("methods[0]")
    err = refused(scenario(size=16, arch="unet@8", method_params={"h_depth": 4, "lambda3": 0}))
    assert err.field == "archs[0]" and "16x16" in str(err)


def test_unknown_loss_and_arch_of_the_surrogate_are_refused():
    err = refused(scenario(attack={"name": "surrogate", "params": {"loss": "l3"}}))
    assert err.field == "attacks[0].params.loss" and "l2+gan" in err.allowed
    err = refused(scenario(attack={"name": "surrogate", "params": {"arch": "resnet8"}}))
    assert err.field == "attacks[0].params.arch" and err.hint == "resnet9"


def test_marked_model_rebuilds_from_its_spec(tmp_path):
    spec = ModelSpec("cnet@4", 0, 3, 32, wrapper="barrier", wrapper_params={"width": 4, "depth": 5})
    marked = create_model(spec)
    assert isinstance(marked, Barrier)
    marked.delta.copy_(builtin_watermark("coins", 32)[None].expand(1, 3, -1, -1))
    store = ArtifactStore(str(tmp_path))
    meta = store.save("embed", "k", {"spec": spec.to_dict()}, model=marked.eval())
    loaded, loaded_spec = store.load_model(meta)
    x = torch.rand(2, 3, 32, 32)
    assert loaded_spec == spec
    assert torch.equal(loaded(x), marked(x))
    assert torch.equal(loaded.delta, marked.delta)


@pytest.mark.parametrize("loss", LOSSES)
def test_surrogate_training_lowers_its_loss(loss):
    torch.manual_seed(0)
    x = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    targets = (255 - x.float()).to(torch.uint8)  # an easy, learnable mapping
    from model_zoo.image2image import create_image2image

    net = create_image2image("cnet@8", 3, 3)
    kw = dict(loss=loss, lr=1e-2, batch_size=8, device="cpu", seed=0, disc_width=8)
    first = train_image_model(net, x, targets, epochs=1, **kw)["loss"]
    later = train_image_model(net, x, targets, epochs=6, **kw)["loss"]
    assert later < first
    assert quantised_outputs(net, x, "cpu").dtype == torch.uint8


# ---------------------------------------------------------------- stage 2: simulated surrogates

DATA = DatasetCfg(name="photo_pairs", image_size=32, channels=3, samples=60)
TRAIN = TrainCfg(epochs=2, batch_size=16, lr=1e-3, optimizer="adam")
TINY = {"h_width": 8, "r_width": 8, "d_width": 8, "epochs": 20, "lr": 0.002, "batch_size": 8,
        "sim_epochs": 1, "r_epochs": 3}  # fmt: skip
SIM = "aux/output_watermark/sim_"


def ow_cell(**params) -> Cell:
    method = OutputWatermarkParams(**{**TINY, **params}).model_dump(mode="json")
    return Cell(
        "ow", DATA.model_dump(mode="json"), TRAIN.model_dump(mode="json"), "unet@8",
        "output_watermark", method, "identity", {}, 0,
    )  # fmt: skip


def aux_jobs(cell: Cell) -> dict:
    return {j.stage: j for j in cell.embed_job().deps if j.stage.startswith("aux/")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ow-store"))


def owner_x() -> torch.Tensor:
    return load_splits(DATA).owner.x


def extraction_error(extractor, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((extractor(as_float(x)) - target) ** 2).mean())


def test_a_list_of_simulated_surrogates_is_one_value_and_a_list_of_lists_sweeps():
    assert len(OutputWatermark.grid({"sim_arch": ["unet", "cnet"], "sim_loss": "l1"})) == 1
    assert len(OutputWatermark.grid({"sim_arch": [["unet"], ["unet", "cnet"]]})) == 2
    # one loss for every arch, or one per arch
    assert OutputWatermark({"sim_arch": ["unet", "cnet"]}).params.sim_loss == "l2"
    # stage 2's steps only where it runs; a string and a one-entry list share their steps
    assert list(aux_jobs(ow_cell(adversarial=False))) == ["aux/output_watermark/initial"]
    keys = {s: j.key for s, j in aux_jobs(ow_cell(sim_arch="cnet@8")).items()}
    assert keys == {s: j.key for s, j in aux_jobs(ow_cell(sim_arch=["cnet@8"])).items()}
    # a simulated surrogate's key: its own arch and loss and the stage-1 model, not the list
    a = aux_jobs(ow_cell(sim_arch=["cnet@8", "unet@8"], r_epochs=5, neg_weight=2))
    b = aux_jobs(ow_cell(sim_arch=["unet@8"]))
    assert a[SIM + "unet@8_l2"].key == b[SIM + "unet@8_l2"].key
    assert a[SIM + "clean_unet@8_l2"].key == b[SIM + "clean_unet@8_l2"].key
    other_stage1 = aux_jobs(ow_cell(sim_arch=["unet@8"], h_width=4))
    assert other_stage1[SIM + "unet@8_l2"].key != b[SIM + "unet@8_l2"].key
    # ... while the unmarked twin depends on the victim only
    assert other_stage1[SIM + "clean_unet@8_l2"].key == b[SIM + "clean_unet@8_l2"].key


def artifact(store: str, stage: str, key: str) -> Artifact:
    artifacts = ArtifactStore(store)
    return Artifact(artifacts, artifacts.load_meta(stage, key), "cpu")


def test_two_simulated_surrogates_are_two_aux_stages_and_r_learns_both(store):
    two = ow_cell(sim_arch=["cnet@8", "resnet9@8"], sim_loss=["l2", "l1"])
    jobs = aux_jobs(two)
    assert set(jobs) == {
        "aux/output_watermark/initial", SIM + "cnet@8_l2", SIM + "clean_cnet@8_l2",
        SIM + "resnet9@8_l1", SIM + "clean_resnet9@8_l1",
    }  # fmt: skip
    row = run_cell(two, store)
    assert row["status"] == "ok", row.get("traceback")
    assert row["wm_score_marked"] >= 0.5  # the served model itself is detected
    embed = artifact(store, "embed", two.embed_key())
    assert {tuple(v) for v in embed.meta["inputs"].values()} == {
        (j.stage, j.key) for j in jobs.values()
    }
    stage1 = jobs["aux/output_watermark/initial"]
    initial = artifact(store, stage1.stage, stage1.key)
    stage1_r = OutputWatermark._extractor(initial.secret(), "cpu")
    stage2_r = OutputWatermark._extractor(embed.secret(), "cpu")
    delta = initial.secret()["delta"][None]
    for name in ("cnet@8_l2", "resnet9@8_l1"):  # R was fine-tuned on each surrogate's outputs
        sim = artifact(store, SIM + name, jobs[SIM + name].key)
        assert sim.spec.arch == name.split("_")[0] and sim.meta["outputs"] == "marked"
        outputs = quantised_outputs(sim.model(), owner_x(), "cpu")
        before = extraction_error(stage1_r, outputs, delta)
        assert extraction_error(stage2_r, outputs, delta) < 0.9 * before, name


def test_a_second_setting_reuses_the_cached_simulated_surrogate(store):
    run_cell(ow_cell(sim_arch=["cnet@8", "resnet9@8"], sim_loss=["l2", "l1"]), store)
    one = ow_cell(sim_arch="cnet@8", neg_weight=3.0)
    done: dict = {}
    run_job(one.embed_job(), store, "cpu", done)
    jobs = aux_jobs(one)
    assert set(jobs) == {"aux/output_watermark/initial", SIM + "cnet@8_l2", SIM + "clean_cnet@8_l2"}
    assert all(done[j.key]["cached"] for j in jobs.values())  # nothing simulated again
    assert not done[one.embed_key()]["cached"]  # but R is fine-tuned anew


def test_neg_weight_keeps_r_blank_on_unmarked_outputs(store):
    errors = {}
    for weight in (0.0, 10.0):
        cell = ow_cell(sim_arch="cnet@8", neg_weight=weight)
        run_job(cell.embed_job(), store, "cpu", {})
        r = OutputWatermark._extractor(artifact(store, "embed", cell.embed_key()).secret(), "cpu")
        job = aux_jobs(cell)[SIM + "clean_cnet@8_l2"]
        unmarked = quantised_outputs(artifact(store, job.stage, job.key).model(), owner_x(), "cpu")
        errors[weight] = extraction_error(r, unmarked, torch.ones(1, 3, 32, 32))  # -> delta0
    assert errors[10.0] < 0.75 * errors[0.0]


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"sim_arch": []}, "sim_arch", "empty list"),
        ({"sim_arch": ["unet@8", "resnet8"]}, "sim_arch", "sim_arch[1]"),
        ({"sim_arch": ["unet@8", "cnet@8"], "sim_loss": ["l1", "l2", "l1"]}, "sim_loss", "2 archs"),
        ({"sim_arch": ["cnet@8", "cnet@8"]}, "sim_arch[1]", "simulated twice"),
        ({"sim_loss": ["l3"]}, "sim_loss", "l1"),
        ({"neg_weight": -1.0}, "neg_weight", "greater than or equal to 0"),
    ],
)
def test_bad_simulated_surrogates_and_weights_are_refused(params, field, says):
    err = refused(scenario(params))
    assert err.field == f"methods[0].params.{field}" and says in str(err)


def test_a_simulated_arch_that_cannot_take_the_image_size_is_refused():
    params = {"sim_arch": ["cnet@8", "unet@8"], "h_depth": 4}  # 48 px: a depth-5 U-Net cannot
    err = refused(scenario(params, size=48, arch="cnet@8"))
    assert err.field == "methods[0].params.sim_arch[1]" and "48x48" in str(err)
    err = refused(scenario({**params, "sim_arch": "unet@8"}, size=48, arch="cnet@8"))
    assert err.field == "methods[0].params.sim_arch"
    check_scenario(scenario({**params, "adversarial": False}, size=48, arch="cnet@8"), "ow.yaml")
