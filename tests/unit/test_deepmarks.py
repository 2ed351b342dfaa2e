"""DeepMarks: the BIBD anti-collusion codebook (design properties, distinct codes, AND-ACC
tracing of up to k - 1 colluders), the orthogonal alternative, the collusion attack's
averaging, real cells on tiny data (lenet) run in-process, and bad input refused (exit 2)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.attacks.collude import average_states
from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.methods import create_method
from harness.methods.deepmarks import (
    DeepMarksParams,
    and_acc_accused,
    and_acc_codes,
    codebook,
    correlations,
    designs,
    orthogonal_codes,
    pick_design,
)
from harness.stages import run_cell, verify_context
from model_zoo import ModelSpec, create_model


@pytest.mark.parametrize("design", designs()[:7], ids=lambda d: d.name)
def test_each_plane_is_a_bibd_with_lambda_one(design):
    inc = design.incidence()
    assert inc.shape == (design.v, design.b)
    assert (inc.sum(0) == design.k).all()  # every block has k points
    r = (design.v - 1) // (design.k - 1)
    assert (inc.sum(1) == r).all()  # every point on r blocks
    pairs = inc.float() @ inc.float().T
    off_diagonal = ~torch.eye(design.v, dtype=torch.bool)
    assert (pairs[off_diagonal] == 1).all()  # every pair of points in exactly one block
    blocks = inc.float().T @ inc.float()
    assert (blocks[~torch.eye(design.b, dtype=torch.bool)] <= 1).all()  # blocks share <= 1


def test_the_smallest_design_resisting_the_colluders_is_chosen():
    assert pick_design(4, 2).name == "PG:2"  # the Fano plane: 7 points, 7 blocks of 3
    assert pick_design(8, 2).name == "AG:3"  # 9 points, 12 blocks of 3
    assert pick_design(4, 3).name == "PG:3"  # blocks of 4 resist 3 colluders
    assert pick_design(4, 1).name == "AG:2"


@pytest.mark.parametrize("n_users", [2, 4, 7, 12])
def test_bibd_codes_are_distinct_and_trace_up_to_k_minus_1_colluders(n_users):
    p = DeepMarksParams(n_users=n_users)
    codes, _ = codebook(p)
    design = pick_design(n_users, p.max_colluders)
    assert codes.shape == (n_users, design.v)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(c.tolist()) for c in codes}) == n_users
    assert ((codes < 0).sum(1) == design.k).all()  # -1 on its block's k points
    for size in range(1, min(design.k - 1, n_users) + 1):
        for group in itertools.combinations(range(n_users), size):
            average = codes[list(group)].mean(0)
            assert and_acc_accused(average, codes) == list(group)
            assert and_acc_accused(0.3 * average, codes) == list(group)  # scale-free


def test_the_codes_are_the_complements_of_the_incidence_columns():
    inc = pick_design(7, 2).incidence()
    codes = and_acc_codes(inc, 7)
    assert torch.equal(codes > 0, ~inc.T)


@pytest.mark.parametrize("n_users", [2, 3, 4, 7, 8, 20])
def test_orthogonal_codes_are_orthogonal_and_zero_mean(n_users):
    codes = orthogonal_codes(n_users)
    assert codes.shape[0] == n_users and codes.shape[1] > n_users
    assert torch.equal(codes @ codes.T, codes.shape[1] * torch.eye(n_users))
    assert (codes.sum(1) == 0).all()


def test_correlation_is_blind_to_offset_and_scale():
    codes, _ = codebook(DeepMarksParams())
    corr = correlations(3.0 * codes[2] + 5.0, codes)
    assert corr[2].item() == pytest.approx(1.0) and corr.argmax().item() == 2


def test_average_states_takes_integer_buffers_from_the_first():
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(create_model(ModelSpec("resnet10t", 4, 1, 16)))
    states = [n.state_dict() for n in nets]
    for i, s in enumerate(states):
        s["bn1.num_batches_tracked"] = torch.tensor(10 + i)
    out = average_states(states)
    assert torch.allclose(out["conv1.0.weight"], sum(s["conv1.0.weight"] for s in states) / 3)
    assert torch.allclose(out["bn1.running_var"], sum(s["bn1.running_var"] for s in states) / 3)
    assert out["bn1.num_batches_tracked"].item() == 10


# ------------------------------------------------------------------------- real cells

METHOD = {"n_users": 3, "epochs": 2, "n_null": 2, "rows": 70}


def _cell(attack: str, attack_params: dict, **method) -> Cell:
    data = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
    train = TrainCfg(epochs=3, batch_size=32, lr=0.05)
    params = create_method("deepmarks", {**METHOD, **method}).params.model_dump()
    return Cell(
        "dm", data.model_dump(mode="json"), train.model_dump(mode="json"), "lenet", "deepmarks",
        params, attack, create_attack(attack, attack_params).params.model_dump(), 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("deepmarks-store"))


def test_the_marked_copy_is_detected_and_names_its_user(store, one_thread):
    row = run_cell(_cell("identity", {}), store)
    assert row["status"] == "ok", row.get("traceback")
    m = row["metrics"]
    assert row["wm_detected"] and row["wm_score_attacked"] > 0.8
    assert m["identified_user"] == 0.0 and m["user_margin"] > 0.5
    assert m["users_flagged"] == 1.0 and m["accused"] == 1.0
    assert m["layer_found"] == 1.0 and m["code_length"] == 7.0  # the Fano plane
    assert m["null_mean"] < 0.3 and row["wm_threshold"] < 0.5
    assert "colluders" not in m  # no collusion, nothing to count


def test_two_colluders_are_both_traced_and_no_one_else(store, one_thread):
    alone = run_cell(_cell("identity", {}), store)
    row = run_cell(_cell("collude", {"k": 2}), store)
    assert row["status"] == "ok", row.get("traceback")
    m = row["metrics"]
    assert m["k"] == 2.0 and m["colluders"] == 2.0
    # the average carries half of each colluder's code: weaker than one copy, far above chance
    assert row["wm_threshold"] < row["wm_score_attacked"] < alone["wm_score_attacked"]
    assert row["wm_detected"] and m["identified_user"] in (0.0, 1.0)
    assert m["users_flagged"] >= 1.0
    assert m["colluders_found"] == 2.0 and m["innocents_accused"] == 0.0
    assert row["task_score_attacked"] >= row["task_score_marked"] - 0.1


def test_orthogonal_codes_trace_colluders_by_correlation(store, one_thread):
    row = run_cell(_cell("collude", {"k": 2}, code="orthogonal"), store)
    assert row["status"] == "ok", row.get("traceback")
    m = row["metrics"]
    assert m["code_length"] == 4.0 and row["wm_detected"]  # Hadamard rows 1..3 of order 4
    assert row["wm_score_attacked"] == pytest.approx(2**-0.5, abs=0.15)  # 1/sqrt(k)
    assert m["accused"] == m["users_flagged"] and m["colluders_found"] == 2.0


def test_more_colluders_than_copies_fail_the_cell(store, one_thread):
    row = run_cell(_cell("collude", {"k": 4}), store)
    assert row["status"] == "failed"
    assert "needs 3 other licensed copies" in row["error"] and "comes with 2" in row["error"]


def test_a_suspect_of_another_arch_scores_nothing(store, one_thread):
    cell = _cell("identity", {})
    run_cell(cell, store)
    marked = ArtifactStore(store).load_meta("embed", cell.embed_key())
    _, secret, ctx = verify_context(cell, store, "cpu", marked)
    other = create_model(ModelSpec("resnet10t", 4, 1, 16))
    score = create_method("deepmarks", METHOD).verify(other, secret, ctx)
    assert score.score == 0.0 and not score.detected
    assert score.metrics["layer_found"] == 0.0 and score.metrics["identified_user"] == -1.0


# ------------------------------------------------------------------------- validation


def _scenario(tmp_path: Path, params: dict, attacks: list | None = None) -> str:
    path = tmp_path / "dm.yaml"
    path.write_text(yaml.safe_dump({
        "name": "dm", "dataset": {"name": "synthetic", "image_size": 16, "channels": 1},
        "archs": ["lenet"], "methods": [{"name": "deepmarks", "params": params}],
        "attacks": attacks or ["identity"],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"n_users": 1}, "n_users"), ({"gamma": -1}, "gamma"), ({"layer": "features.9"}, "layer"),
     ({"layer": "features.0"}, "layer"), ({"code": "random"}, "code"),
     ({"rows": 5}, "rows"), ({"max_colluders": 12}, "rows")],
)  # fmt: skip
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    assert main(["validate", _scenario(tmp_path, params)]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err


def test_collusion_beyond_the_copies_exits_2_and_beyond_the_code_warns(tmp_path: Path, capsys):
    attacks = ["identity", {"name": "collude", "params": {"k": [2, 3, 5]}}]
    assert main(["validate", _scenario(tmp_path, {"n_users": 4}, attacks)]) == 2
    err = capsys.readouterr().err
    assert "attacks[1].params.k" in err and "n_users=4" in err and "2 to 4" in err
    attacks = ["identity", {"name": "collude", "params": {"k": [2, 3]}}]
    assert main(["validate", _scenario(tmp_path, {"n_users": 4}, attacks)]) == 0
    err = capsys.readouterr().err
    assert "collude k=3 exceeds max_colluders=2" in err and "k=2" not in err


def test_collude_alone_needs_deepmarks(tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "name": "c", "dataset": {"name": "synthetic", "image_size": 16, "channels": 1},
        "archs": ["lenet"], "methods": ["none"], "attacks": ["collude"],
    }))  # fmt: skip
    assert main(["validate", str(path)]) == 2
    assert "attacks[0].name" in capsys.readouterr().err
