"""DAWN: the serving filter (keyed, at the declared rate, a wrong label among the likely
classes), the engine's served API (counts, the owner's log), and DAWN judged on a stolen copy
from the log — on real cells (tiny data, lenet) run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from scipy.stats import binomtest

from harness.cells import Cell
from harness.cli import main
from harness.config import DatasetCfg, TrainCfg
from harness.methods import create_method
from harness.methods.dawn import relabel
from harness.serving import API, deployed
from harness.stages import run_cell

SECRET = {"hmac_key": torch.arange(32, dtype=torch.uint8), "rate": 0.1}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()


def test_relabel_moves_the_argmax_within_the_likely_classes():
    logits = torch.tensor([4.0, 3.5, 3.0, -5.0, -6.0])
    for seed in range(50):
        out = relabel(logits, seed, min_prob=0.2, top=3)
        assert int(out.argmax()) != 0 and int(out.argmax()) in (1, 2)
        assert sorted(out.tolist()) == sorted(logits.tolist())  # a permutation, not new values
        assert torch.equal(out[3:], logits[3:])  # unlikely classes untouched
    confident = torch.tensor([10.0, 0.0, -1.0, -2.0])  # one class above min_prob: the top 3
    assert int(relabel(confident, 7, 0.2, 3).argmax()) in (1, 2)


def test_serve_marks_the_declared_share_deterministically_and_alters_only_those():
    dawn = create_method("dawn", {"rate": 0.1})
    model = _model()
    x = torch.rand(2000, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = (x * 255).round() / 255  # 8-bit queries
    logits = model(x).detach()
    answers, marked = dawn.serve(x, logits, SECRET)
    again, marked_again = dawn.serve(x, logits, SECRET)
    assert torch.equal(marked, marked_again) and torch.equal(answers, again)
    share = binomtest(int(marked.sum()), len(x), 0.1)
    assert share.pvalue > 0.001, f"{int(marked.sum())} of {len(x)} at rate 0.1"
    assert torch.equal(answers[~marked], logits[~marked])
    assert (answers[marked].argmax(1) != logits[marked].argmax(1)).all()
    other_key = {**SECRET, "hmac_key": torch.arange(1, 33, dtype=torch.uint8)}
    assert not torch.equal(dawn.serve(x, logits, other_key)[1], marked)  # keyed


def test_the_api_counts_queries_and_logs_the_watermarked_answers():
    dawn = create_method("dawn", {"rate": 0.1})
    model = _model()
    x = (torch.rand(700, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 255).to(
        torch.uint8
    )
    api = API(deployed(model, dawn, SECRET), "cpu", batch_size=256)
    answers = api(x)
    log = api.log()
    assert api.figures()["queries"] == 700 and answers.shape == (700, 10)
    assert api.figures()["watermarked"] == len(log["x"]) > 0
    _, marked = dawn.serve(x.float() / 255, model(x.float() / 255).detach(), SECRET)
    assert torch.equal(log["x"], x[marked])  # the queries as sent (uint8), in order
    assert torch.equal(log["answers"].argmax(1), answers[marked].argmax(1))
    plain = API(deployed(model, create_method("none"), {}), "cpu")
    plain(x)
    assert plain.figures() == {"queries": 700, "watermarked": 0} and plain.log() is None


def _cell(attack: str, attack_params: dict) -> Cell:
    data = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
    train = TrainCfg(epochs=3, batch_size=32, lr=0.05)
    return Cell(
        "dawn", data.model_dump(mode="json"), train.model_dump(mode="json"), "lenet", "dawn",
        create_method("dawn", {"rate": 0.3, "n_keys": 50, "n_null": 2}).params.model_dump(),
        attack, attack_params, 0,
    )  # fmt: skip


def test_dawn_is_judged_on_what_each_suspect_went_through(tmp_path: Path):
    store = str(tmp_path / "store")
    stolen = run_cell(_cell("distill", {"epochs": 3, "student_arch": "lenet"}), store)
    assert stolen["status"] == "ok", stolen.get("traceback")
    m = stolen["metrics"]
    assert m["keys_from_api"] == 1.0 and m["api_queries"] > 0
    assert 0.15 < m["api_wm_share"] < 0.45  # rate 0.3 over ~100 attacker queries
    assert m["n_keys"] == min(50, round(m["api_wm_share"] * m["api_queries"]))
    assert m["wm_detected_marked"] == 1.0  # the deployment answers through the filter
    assert stolen["wm_score_marked"] == 1.0
    # the copy learnt some of the wrong answers: more than the independent models repeat
    assert stolen["wm_score_attacked"] > m["null_mean"]

    weights = run_cell(_cell("fine_tune", {"mode": "ftal", "epochs": 1}), store)
    assert weights["status"] == "ok", weights.get("traceback")
    assert weights["metrics"]["keys_from_api"] == 0.0 and "api_queries" not in weights["metrics"]
    assert not weights["wm_detected"]  # weights taken without the API carry no mark

    same = run_cell(_cell("identity", {}), store)
    assert same["wm_detected"] and same["wm_score_attacked"] == 1.0  # the deployment itself


def _scenario(tmp_path: Path, method: dict, attacks: list) -> str:
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({
        "name": "d", "dataset": {"name": "digits", "image_size": 32, "channels": 1},
        "archs": ["lenet"], "attacks": attacks, "methods": [method],
    }))  # fmt: skip
    return str(path)


def test_dawn_without_an_extraction_attack_is_a_warning_naming_them(tmp_path: Path, capsys):
    path = _scenario(tmp_path, {"name": "dawn"}, ["identity", {"name": "prune"}])
    assert main(["validate", path]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "methods[0] (dawn)" in err and "distill" in err
    path = _scenario(tmp_path, {"name": "dawn"}, ["identity", {"name": "distill"}])
    assert main(["validate", path]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("params, field", [({"rate": 0}, "rate"), ({"rate": 0.9}, "rate"),
                                           ({"n_keys": 0}, "n_keys")])  # fmt: skip
def test_bad_parameters_exit_2(tmp_path: Path, capsys, params, field):
    path = _scenario(tmp_path, {"name": "dawn", "params": params}, ["distill"])
    assert main(["validate", path]) == 2
    assert f"methods[0].params.{field}" in capsys.readouterr().err
