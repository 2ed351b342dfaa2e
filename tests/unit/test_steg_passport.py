"""Steganographic Passport as a harness method: the model wrapper, embed + verify through the
stages, the ambiguity attacks, and clear refusals of bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from harness.artifacts import ArtifactStore
from harness.attacks import ATTACKS
from harness.cells import Cell
from harness.config import DatasetCfg, TrainCfg, parse_scenario
from harness.errors import ConfigError
from harness.grid import check_scenario
from harness.image_metrics import psnr
from harness.methods import METHODS, create_method
from harness.methods.steg_passport import install
from harness.stages import run_cell, verify_context
from model_zoo import ModelSpec, create_model
from model_zoo.passport import (
    add_residual_tlp,
    capture_passports,
    convert_to_passport,
    passport_layers,
    set_mode,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DATASET = DatasetCfg(name="synthetic", image_size=16, channels=3, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=3, batch_size=32, lr=0.05)
TINY = {
    "n_users": 2,
    "isn_blocks": 1,
    "isn_growth": 8,
    "isn_steps": 30,
    "isn_pool": 32,
    "isn_patch": 16,
    "isn_lr": 1e-3,
    "epochs": 4,
}
TINY_ATTACKS = {
    "erb_ambiguity": {"epochs": 2, "lr": 0.01},
    "forged_user_passport": {"steps": 5},
    "forged_key": {"steps": 5},
}


def _spec(arch: str = "resnet10t", channels: int = 3) -> ModelSpec:
    return ModelSpec(arch, 4, channels, 16)


def _images(channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, 16, 16, generator=g), torch.rand(channels, 16, 16, generator=g)


def _outputs(model, x) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for mode in ("deployment", "verification"):
            set_mode(model, mode)
            out.append(model(x))
    set_mode(model, "deployment")
    return out


@pytest.mark.parametrize("residual", [False, True])
def test_passport_wrapper_rebuilds_a_stored_model_exactly(tmp_path, residual: bool):
    torch.manual_seed(0)
    spec = _spec()
    model = create_model(spec).eval()
    convert_to_passport(model, None, *_images())
    wrapper = {"stages": None, **({"residual_tlp": True} if residual else {})}
    if residual:
        add_residual_tlp(model)
        for layer in passport_layers(model):  # the residual starts at zero: make it count
            torch.nn.init.normal_(layer.tlp.residual[-1].weight)
    store = ArtifactStore(str(tmp_path))
    meta = {"spec": spec.replace(wrapper="passport", wrapper_params=wrapper).to_dict()}
    loaded, loaded_spec = store.load_model(store.save("embed", "k", meta, model=model))
    assert loaded_spec.wrapper == "passport" and len(passport_layers(loaded)) == 3
    x = torch.rand(2, 3, 16, 16)
    for a, b in zip(_outputs(model, x), _outputs(loaded, x), strict=True):
        assert torch.equal(a, b)


def test_lenet_sequential_layout_takes_one_channel_passports():
    model = create_model(_spec("lenet", channels=1)).eval()
    reference = copy.deepcopy(model)
    layers = convert_to_passport(model, ["features"], *_images(channels=1))
    assert [layer.channels for layer in layers] == [16, 32]
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(model(x), reference(x))
    captured = capture_passports(model, torch.stack(_images(channels=1)))
    assert [tuple(c.shape) for c in captured] == [(2, 1, 16, 16), (2, 16, 8, 8)]


def _cell(attack: str, arch: str = "resnet10t") -> Cell:
    mp = METHODS.get("steg_passport").Params(**TINY).model_dump(mode="json")
    ap = ATTACKS.get(attack).Params(**TINY_ATTACKS.get(attack, {})).model_dump(mode="json")
    return Cell(
        "unit",
        DATASET.model_dump(mode="json"),
        TRAIN.model_dump(mode="json"),
        arch,
        "steg_passport",
        mp,
        attack,
        ap,
        0,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("steg-passport-store"))


def test_genuine_passport_is_detected_and_the_unmarked_victim_is_not(store):
    cell = _cell("identity")
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("error")
    assert row["wm_detected"] and row["wm_score_attacked"] >= 0.9
    m = row["metrics"]
    assert m["acc_gap"] <= 0.05 and m["ber"] <= 0.1
    assert m["user_detection_owner_bits"] >= 0.9  # a licence works like the owner passport...
    assert m["user_detection_own_hash"] <= 0.65  # ...but its own hash is another signature
    assert {"reveal_psnr", "reveal_psnr_noise_key", "reveal_psnr_other_key"} <= set(m)
    assert all(not isinstance(v, torch.Tensor) for v in row.values())  # floats only in rows
    artifacts = ArtifactStore(store)
    victim = artifacts.load_meta("train_victim", cell.victim_key())
    marked = artifacts.load_meta("embed", cell.embed_key())
    model, secret, ctx = verify_context(cell, store, "cpu", marked, victim)
    score = create_method("steg_passport", cell.method_params).verify(model, secret, ctx)
    assert not score.detected and score.score < 0.65


def test_forged_passports_are_not_detected(store):
    for attack in ("random_passport", "erb_ambiguity"):
        row = run_cell(_cell(attack), store)
        assert row["status"] == "ok", row.get("error")
        m = row["metrics"]
        assert m["forged_detection"] <= 0.65, attack  # the hash of a forged passport differs
        assert row["wm_score_attacked"] >= 0.9, attack  # the owner's passport still proves it


def test_licence_attacks_leave_the_model_and_report_reveal_quality(store):
    cell = _cell("forged_user_passport")
    near = run_cell(cell, store)
    assert near["status"] == "ok", near.get("error")
    # It started from the genuine licence (user 0's stego passport) and 5 fidelity-weighted
    # Adam steps moved it little: it is as near the owner's passport as that licence is. (How
    # near the licence itself is depends on how well the tiny 30-step ISN hides.)
    artifacts = ArtifactStore(store)
    secret = artifacts.load_secret(artifacts.load_meta("embed", cell.embed_key()))
    licence = psnr(secret["user_passports"][:1], secret["passport_gamma"][None].float() / 255)
    assert near["metrics"]["forged_near_copy_psnr"] > licence.item() - 1.0
    assert near["metrics"]["forged_detection"] <= 0.65
    assert "forged_reveal_psnr" in near["metrics"]
    key = run_cell(_cell("forged_key"), store)
    assert key["status"] == "ok", key.get("error")
    assert "forged_key_reveal_psnr" in key["metrics"]
    assert key["task_score_attacked"] == key["task_score_marked"]


def test_generic_attacks_run_on_passport_models(store):
    for attack, params in (("prune", {"sparsity": 0.5}), ("fine_tune", {"mode": "rtal"})):
        TINY_ATTACKS[attack] = {**params, **({"epochs": 1} if attack == "fine_tune" else {})}
        row = run_cell(_cell(attack), store)
        assert row["status"] == "ok", row.get("error")
        assert row["metrics"]["passport_layers"] == 3


def test_function_preserving_attacks_leave_the_signature(store):
    # passport layers are opaque to the rewrites, and install recaptures the passports through
    # the rewritten layers: the signs survive with and without alignment
    for align in (False, True):
        for attack in ("permute", "dummy_neurons"):
            cell = _cell(attack)
            cell = dataclasses.replace(cell, method_params={**cell.method_params, "align": align})
            row = run_cell(cell, store)
            assert row["status"] == "ok", row.get("error")
            m = row["metrics"]
            assert m["max_logit_deviation"] <= 1e-4 and m["channels_changed"] > 0
            assert row["wm_detected"] and row["wm_score_attacked"] >= 0.9, (attack, align)
            assert ("aligned_chains" in m) == align
            if align:
                assert m["aligned_chains"] >= 1 and m["match_corr"] > 0.999


def test_install_is_undone_by_verify(store):
    cell = _cell("identity")
    artifacts = ArtifactStore(store)
    marked = artifacts.load_meta("embed", cell.embed_key())
    model, secret, ctx = verify_context(cell, store, "cpu", marked)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    create_method("steg_passport", cell.method_params).verify(model, secret, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    install(model, *_images())  # sanity: installing does change the buffers
    assert not torch.equal(
        before["layer4.0.conv1.passport_gamma"], model.layer4[0].conv1.passport_gamma
    )


def _scenario(method_params: dict, archs=("resnet10t",)) -> dict:
    return {
        "name": "bad",
        "dataset": DATASET.model_dump(mode="json"),
        "train": TRAIN.model_dump(mode="json"),
        "seeds": [0],
        "archs": list(archs),
        "methods": [{"name": "steg_passport", "params": method_params}],
        "attacks": ["identity"],
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"n_users": 0}, "methods[0].params.n_users"),
        ({"passport_path": "/no/such/passport.png"}, "methods[0].params.passport_path"),
        ({"isn_patch": 15}, "methods[0].params.isn_patch"),
        ({"stages": []}, "methods[0].params.stages"),
    ],
)
def test_bad_params_are_config_errors_with_the_field_path(params: dict, field: str):
    with pytest.raises(ConfigError) as err:
        check_scenario(parse_scenario(_scenario(params)), "s.yaml")
    assert err.value.field == field and err.value.file == "s.yaml"


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("test_vit", "this model has no BatchNorm2d"),
        ("resnet14t", "2048 channels but one SHA-512 signature holds 512 bits"),
        ("lenet", "no timm feature_info"),
    ],
)
def test_archs_without_a_usable_passport_stage_are_refused(arch: str, message: str):
    method = create_method("steg_passport", {})
    with pytest.raises(ConfigError, match=message) as err:
        method.check_arch(arch, DATASET)
    assert err.value.field == "stages" and arch in str(err.value)
    create_method("steg_passport", {"stages": ["features"]}).check_arch("lenet", DATASET)
    create_method("steg_passport", {"stages": ["layer2"]}).check_arch("resnet14t", DATASET)


def test_attacks_target_passport_models_only():
    for name in ("erb_ambiguity", "random_passport", "forged_user_passport", "forged_key"):
        assert ATTACKS.get(name).methods == ("steg_passport",)


def test_passport_table_summarises_the_stored_rows(store):
    from results import load

    for attack in ("identity", "random_passport"):
        run_cell(_cell(attack), store)
    df = load(store)
    rows = df[(df["status"] == "ok") & (df["method"] == "steg_passport")]
    table = METHODS.get("steg_passport").summary_table(rows).set_index("attack")
    assert table.loc["identity", "detection"] >= 0.9 and table.loc["identity", "detected"] == 1
    assert table.loc["random_passport", "forged_detection"] <= 0.65
    assert {"acc_dep", "acc_ver", "acc_gap", "reveal_psnr"} <= set(table.columns)
