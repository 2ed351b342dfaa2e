"""`harness tune` through local Ray: trials run as ordinary cells and rows; a killed tune
resumes and finishes its trial count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from integration_support import kill_session, tiny_scenario_dict

from harness import scheduler, tuning
from harness.config import parse_scenario
from harness.grid import load_scenario
from results import load

TUNE = tiny_scenario_dict(
    name="tune_tiny",
    methods=[
        {
            "name": "discriminative",
            "params": {"n_keys": 10, "n_control": 20, "steps": 40, "alpha": 0.005, "pool_size": 80},
        }
    ],
    attacks=[
        {"name": "quantize", "params": {"bits": 8, "granularity": "per_tensor"}, "role": "benign"},
        {"name": "fine_tune", "params": {"epochs": 1, "label_noise": 0.8}, "role": "malicious"},
    ],
    tune={
        "method": "discriminative",
        "space": {"w_f": {"low": 0.0, "high": 5.0}},
        "constraints": {"ssim_min": ">= 0.0", "n_keys": ">= 1"},
    },
)


def _tune_local(scenario, store: str, **kw) -> optuna.Study:
    """`tuning.tune` with the trials' cells run on the session's local Ray."""
    return tuning.tune(
        scenario,
        store,
        lambda cells: scheduler.run_cells(cells, store, resources=scenario.resources),
        **kw,
    )


def test_three_trials_run_as_cells_and_write_an_includable_best(ray_session, tmp_path):
    scenario = parse_scenario(TUNE)
    store = str(tmp_path / "store")

    def run(cells):
        scheduler.run_cells(cells, store, resources=scenario.resources)

    seen = []
    study = tuning.tune(
        scenario, store, run, trials=3, parallel=2, on_trial=lambda result, _: seen.append(result)
    )
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3 and [r.number for r in seen] == [0, 1, 2]
    assert complete[0].params == {"w_f": 0.0}  # trial 0: the untuned setting
    assert (Path(store) / "optuna" / "journal.log").is_file()
    df = load(store)
    trials = df["metrics"].map(lambda m: m.get("trial"))
    assert sorted(set(trials)) == [0.0, 1.0, 2.0]
    assert (df.groupby(trials).size() == 2).all()  # each trial: its two cells, its own rows
    assert set(df["scenario"]) == {f"tune_tiny.trial{i}" for i in range(3)}
    assert all(t.constraints.keys() == {"ssim_min", "n_keys"} for t in complete)

    best = tuning.best_feasible(study)
    path = tmp_path / "best.yaml"
    fragment = tuning.write_best(study, scenario, path)
    assert fragment["methods"][0]["params"]["w_f"] == best.params["w_f"]
    including = {k: v for k, v in TUNE.items() if k != "methods"}
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump({**including, "include": ["best.yaml"]}))
    tuned = load_scenario(tmp_path / "tuned.yaml")
    assert tuned.methods[0].params["w_f"] == best.params["w_f"]


def _finished(journal: Path) -> int:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not journal.exists():
        return 0
    storage = JournalStorage(JournalFileBackend(str(journal)))
    try:
        study = optuna.load_study(study_name="tune_tiny", storage=storage)
    except KeyError:
        return 0
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_a_killed_tune_resumes_and_finishes_its_trial_count(tmp_path):
    scenario_file, store = tmp_path / "tune.yaml", tmp_path / "store"
    scenario_file.write_text(yaml.safe_dump(TUNE))
    journal = store / "optuna" / "journal.log"
    argv = [
        sys.executable,
        "-m",
        "harness.cli",
        "tune",
        str(scenario_file),
        "--trials",
        "4",
        "--parallel",
        "1",
        "--store",
        str(store),
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while _finished(journal) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, "the first tune ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # no clean-up at all: trial 1 is left RUNNING
    first.wait(timeout=30)
    kill_session(first.pid)
    killed_at = _finished(journal)
    assert 1 <= killed_at < 4

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _finished(journal) == 4
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(
        study_name="tune_tiny", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    assert all(t.state in done for t in study.trials)  # a trial left RUNNING was marked FAIL
    assert "best parameters" in second.stderr


ATTACK_TUNE = tiny_scenario_dict(
    name="tune_attack",
    methods=[{"name": "trigger_set", "params": {"n_keys": 20, "n_null": 2}}],
    attacks=[{"name": "prune", "params": {"sparsity": 0.2}}],
    tune={
        "attack": "prune",
        "space": {
            "sparsity": {"low": 0.1, "high": 0.95},
            "method": {"choices": ["l1", "random"]},
        },
        "sampler": "random",
    },
)


def test_an_attack_is_tuned_for_removal_and_a_resume_never_replays_draws(ray_session, tmp_path):
    """The attacker's side: `tune: {attack: prune}` maximises WRT's removal under the default
    objective; a resumed study (3 trials, then 5) draws new parameters for trials 3 and 4
    instead of repeating trials 1 and 2."""
    scenario = parse_scenario(ATTACK_TUNE)
    store = str(tmp_path / "store")

    def run(cells):
        scheduler.run_cells(cells, store, resources=scenario.resources)

    first = tuning.tune(scenario, store, run, trials=3, parallel=1)
    assert len(first.trials) == 3
    assert tuning.objective_name(scenario) == "wm_removed"
    assert tuning.direction(scenario) == "maximize"
    second = tuning.tune(scenario, store, run, trials=5, parallel=1)
    trials = second.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 5
    assert trials[0].params == {"sparsity": 0.2, "method": "l1"}  # trial 0: the scenario's own
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert drawn[3] not in drawn[:3] and drawn[4] not in drawn[:3]
    df = load(store)
    assert set(df["attack"]) == {"prune"} and (df["status"] == "ok").all()
    assert all(0.0 <= t.value <= 1.0 for t in trials)  # the removal share of each trial
    fragment = tuning.write_best(second, scenario, tmp_path / "best.yaml")
    assert fragment is not None and fragment["attacks"][0]["name"] == "prune"


def test_a_method_added_as_one_file_is_tunable(ray_session, tmp_path):
    """`uchida` has no tuning code: its `lambda` is searched, its bit accuracy after the
    scenario's attack is the objective and the generic embedding cost the constraint."""
    scenario = parse_scenario(
        tiny_scenario_dict(
            name="tune_uchida",
            methods=[{"name": "uchida", "params": {"n_bits": 64, "n_null": 2, "epochs": 2}}],
            attacks=[{"name": "fine_tune", "params": {"mode": "ftal", "epochs": 1}}],
            tune={
                "method": "uchida",
                "space": {"lambda": {"low": 0.01, "high": 10.0, "log": True}},
                "constraints": {"embed_drop": "<= 0.5"},
            },
        )
    )
    store = str(tmp_path / "store")
    study = _tune_local(scenario, store, trials=2, parallel=2)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 and trials[0].params == {"lambda": 0.1}  # trial 0: the default
    assert all(0.0 <= t.value <= 1.0 for t in trials)  # bit accuracies
    assert all(set(t.constraints) == {"embed_drop"} for t in trials)
    df = load(store)
    assert set(df["wm_metric"]) == {"bit_acc"} and (df["status"] == "ok").all()


def test_a_tuned_attacker_runs_one_study_per_scheme_and_arch(ray_session, tmp_path):
    """`tune.per: [method, arch]`: the attacker's parameters are searched against each scheme
    on each arch in a study of its own (named after it), with its own rows and best fragment."""
    scenario = parse_scenario(
        tiny_scenario_dict(
            name="attacker",
            methods=[
                {"name": "trigger_set", "params": {"n_keys": 20, "n_null": 2}},
                {"name": "uchida", "params": {"n_bits": 64, "n_null": 2, "epochs": 2}},
            ],
            attacks=[{"name": "weight_shifting", "params": {"epochs": 0}}],
            tune={
                "attack": "weight_shifting",
                "space": {"shift": {"low": 0.0, "high": 3.0}},
                "objective": "wm_score",
                "direction": "minimize",
                "constraints": {"task_drop": "<= 0.05"},
                "per": ["method", "arch"],
            },
        )
    )
    parts = tuning.studies(scenario)
    assert [p.name for p in parts] == ["attacker.trigger_set.lenet", "attacker.uchida.lenet"]
    assert [[m.name for m in p.methods] for p in parts] == [["trigger_set"], ["uchida"]]
    store = str(tmp_path / "store")
    for part in parts:
        study = tuning.tune(
            part,
            store,
            lambda cells: scheduler.run_cells(cells, store, resources=scenario.resources),
            trials=2,
            parallel=1,
        )
        assert study.study_name == part.name and len(study.trials) == 2
    df = load(store)
    assert set(df["scenario"]) == {f"{p.name}.trial{i}" for p in parts for i in range(2)}
    by_study = df.groupby(df["scenario"].str.rsplit(".", n=1).str[0])["method"].unique()
    assert {k: list(v) for k, v in by_study.items()} == {
        "attacker.trigger_set.lenet": ["trigger_set"], "attacker.uchida.lenet": ["uchida"]
    }


def test_a_tuned_attacker_chooses_its_attack_and_tunes_a_stacks_steps(ray_session, tmp_path):
    """`tune.attack` as a list: each trial draws the attack, then its space - here a path
    into `stack`'s steps; the first trials run each attack as the scenario sets it, each
    trial's figures come from its own attack's rows, and the best fragment names the chosen
    attack with its tuned parameters."""
    scenario = parse_scenario(
        tiny_scenario_dict(
            name="chooser",
            methods=[{"name": "trigger_set", "params": {"n_keys": 20, "n_null": 2}}],
            attacks=[
                {"name": "prune", "params": {"sparsity": 0.2}},
                {"name": "stack", "params": {"attacks": [
                    {"name": "prune", "params": {"sparsity": 0.5}},
                    {"name": "fine_tune", "params": {"epochs": 1}}]}},
            ],  # fmt: skip
            tune={
                "attack": ["prune", "stack"],
                "space": {
                    "prune.sparsity": {"low": 0.1, "high": 0.9},
                    "stack.attacks[0].params.sparsity": {"low": 0.1, "high": 0.9},
                },
                "objective": "wm_score",
                "direction": "minimize",
                "constraints": {"task_drop": "<= 0.5"},
                "sampler": "random",
            },
        )
    )
    store = str(tmp_path / "store")
    study = _tune_local(scenario, store, trials=3, parallel=1)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trials[0].params == {"attack": "prune", "prune.sparsity": 0.2}
    assert trials[1].params == {"attack": "stack", "stack.attacks[0].params.sparsity": 0.5}
    df = load(store)
    trial_of = df["metrics"].map(lambda m: int(m["trial"]))
    for t in trials:  # one cell per trial: the chosen attack's, scored from its own row
        (row,) = df[trial_of == t.number].itertuples()
        assert row.attack == t.params["attack"] and t.value == row.wm_score_attacked
    (stacked,) = df[trial_of == 1].itertuples()
    steps = json.loads(stacked.attack_params)["attacks"]
    assert [s["name"] for s in steps] == ["prune", "fine_tune"]
    assert steps[0]["params"]["sparsity"] == 0.5 and steps[1]["params"]["epochs"] == 1
    fragment = tuning.write_best(study, scenario, tmp_path / "best.yaml")
    best = tuning.best_feasible(study)
    assert fragment["attacks"][0]["name"] == best.params["attack"]
