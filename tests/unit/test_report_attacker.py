"""The report's tuned-attacker part: a study that tunes one attack against one scheme shows
its best feasible trial beside the strongest hand-set attack in the store."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from report_store import ARCHS, THRESHOLD, _row

from results.reporting import _tuned_attacker


def _trial_row(number: int, score: float, drop: float) -> dict:
    row = _row(ARCHS[0], "trigger_set", {"n_keys": 50}, "prune", {"sparsity": 0.5}, 0)
    removed = score < THRESHOLD and drop < 0.05
    row.update(
        scenario=f"tuned.trigger_set.{ARCHS[0]}.trial{number}",
        attack_params=json.dumps({"sparsity": 0.1 * number}),
        task_score_attacked=row["task_score_marked"] - drop,
        wm_score_attacked=score,
        wm_detected=score >= THRESHOLD,
        metrics={**row["metrics"], "trial": float(number), "wm_removed": float(removed)},
        stage_seconds={"attack": 2.0 + number},
    )
    return row


def test_the_best_feasible_trial_sits_beside_the_best_hand_set_attack():
    study = optuna.create_study(direction="minimize")
    figures = [(0.9, 0.0), (0.05, 0.2), (0.1, 0.01), (0.3, 0.02)]  # (score, task drop)
    for score, drop in figures:
        trial = study.ask()
        trial.set_constraint("task_drop", drop - 0.05)
        study.tell(trial, score)
    trials = pd.DataFrame([_trial_row(i, s, d) for i, (s, d) in enumerate(figures)])
    attacks = (("identity", {}), ("fine_tune", {}), ("prune", {"sparsity": 0.9}))
    hand = [_row(ARCHS[0], "trigger_set", {"n_keys": 50}, a, ap, 0) for a, ap in attacks]
    everything = pd.concat([trials, pd.DataFrame(hand)], ignore_index=True)
    part = _tuned_attacker(study, trials, everything)
    row = part.table.iloc[0]
    # trial 1 scores lowest but breaks the budget; trial 2 removes within it
    assert (row["trials"], row["feasible"], row["best_trial"]) == (4, 3, 2)
    assert row["removed"] == 1.0 and row["wm_score"] == 0.1
    assert row["task_drop"] == pytest.approx(0.01)
    assert row["cpu_s_per_trial"] == 3.5
    # the hand-set fine-tuning (score 0.25, drop 0.02) is the strongest within the budget;
    # pruning at 0.9 falls outside it
    assert row["hand_attack"] == "fine_tune" and row["hand_task_drop"] < 0.05
    assert "trigger_set" in part.text[0]


def test_other_studies_get_no_attacker_part():
    study = optuna.create_study()
    rows = [_trial_row(0, 0.5, 0.0), _trial_row(1, 0.5, 0.0)]
    rows[1]["method"] = "uchida"  # a study over two schemes is not one attacker's
    assert _tuned_attacker(study, pd.DataFrame(rows), None) is None


def test_a_study_choosing_among_attacks_names_the_one_its_best_trial_chose():
    study = optuna.create_study(direction="minimize")
    figures = [("prune", 0.9, 0.0), ("weight_shifting", 0.1, 0.01), ("prune", 0.4, 0.0)]
    rows = []
    for number, (attack, score, drop) in enumerate(figures):
        trial = study.ask()
        trial.set_constraint("task_drop", drop - 0.05)
        study.tell(trial, score)
        row = _trial_row(number, score, drop)
        rows.append({**row, "attack": attack})
    part = _tuned_attacker(study, pd.DataFrame(rows), None)
    row = part.table.iloc[0]
    assert (row["best_trial"], row["attack"], row["wm_score"]) == (1, "weight_shifting", 0.1)
    assert "chose among prune, weight_shifting" in part.text[0]
