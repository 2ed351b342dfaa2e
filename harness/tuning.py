"""`harness tune`: plain Optuna ask/tell in the driver; each trial's cells go through the
same scheduler (K trials' cells in flight together) and land as ordinary Parquet rows that
carry the trial number.

Objective: mean discriminability relative to the natural-image control over the scenario's
(source, target) pairs. Constraints (`trial.set_constraint`, feasible when <= 0): minimum
key SSIM >= `tune.ssim_min`, and at least `tune.min_keys` accepted keys per key set.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import yaml

from harness.cells import Cell, expand_cells
from harness.config import Scenario
from harness.errors import ConfigError
from harness.methods import METHODS

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class TrialResult:
    number: int
    params: dict[str, float]
    value: float | None
    ssim_min: float
    n_keys: float
    state: str


def default_storage(store: str) -> str:
    if "://" in store:
        raise ConfigError(
            "an object-store results store needs --storage (an RDB URL such as "
            "postgresql://...) for the Optuna study",
            field="--storage",
            value=None,
        )
    path = Path(store).expanduser().resolve() / "optuna" / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def open_study(name: str, storage: str | None, store: str, scenario: Scenario) -> optuna.Study:
    """Create or resume the study; trials a killed driver left RUNNING are marked FAIL."""
    if storage is None or "://" not in storage:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(storage or default_storage(store))
        storage_obj: optuna.storages.BaseStorage | str = JournalStorage(backend)
    else:
        storage_obj = storage
    tune = scenario.tune
    sampler = (
        optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=4)
        if tune.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=tune.seed)
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage_obj,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _driver_alive(stale.user_attrs.get("driver")):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    if not study.trials:
        study.enqueue_trial(baseline(scenario))  # trial 0 measures the untuned parameters
    return study


def _driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_alive(driver: str | None) -> bool:
    """A trial's driver is alive if it is another live process on this host, or on another
    host (which this driver cannot see: a shared RDB study leaves those trials alone)."""
    if not driver:
        return False
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


def baseline(scenario: Scenario) -> dict[str, float]:
    """The scenario's own values (or the method's defaults) of the searched parameters."""
    tune = scenario.tune
    base = next(m for m in scenario.methods if m.name == tune.method)
    defaults = METHODS.get(tune.method).Params()
    values = {name: base.params.get(name, getattr(defaults, name)) for name in tune.space}
    return {
        k: v
        for k, v in values.items()
        if isinstance(v, (int, float)) and tune.space[k].low <= v <= tune.space[k].high
    }


def trial_scenario(scenario: Scenario, trial: optuna.Trial) -> tuple[Scenario, dict[str, float]]:
    """The scenario with the tuned method's parameters drawn for this trial."""
    tune = scenario.tune
    drawn = {
        name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in tune.space.items()
    }
    methods = [
        m.model_copy(update={"params": {**m.params, **drawn}}) if m.name == tune.method else m
        for m in scenario.methods
    ]
    return scenario.model_copy(update={"methods": methods}), drawn


def trial_label(scenario: Scenario, number: int) -> str:
    return f"{scenario.name}.trial{number}"


def trial_cells(scenario: Scenario, number: int) -> list[Cell]:
    """The trial's cells: scenario `<name>.trial<N>`, `trial` N (stage caches still shared)."""
    label = trial_label(scenario, number)
    return [replace(c, scenario=label, trial=number) for c in expand_cells(scenario)]


def evaluate(df, scenario: Scenario) -> tuple[float | None, float, float]:
    """(objective, worst key SSIM, fewest keys) of one trial's rows."""
    from results.analysis import discriminability

    disc = discriminability(df)
    if disc.empty or disc["disc_rel"].isna().all():
        return None, float("nan"), 0.0
    return (
        float(disc["disc_rel"].mean()),
        float(disc["ssim_min"].min()),
        float(disc["n_keys"].min()),
    )


def finish(study: optuna.Study, trial: optuna.Trial, df, scenario: Scenario, drawn) -> TrialResult:
    tune = scenario.tune
    value, ssim_min, n_keys = evaluate(df, scenario)
    ok = value is not None and math.isfinite(value)
    trial.set_constraint("ssim_min", tune.ssim_min - ssim_min if math.isfinite(ssim_min) else 1.0)
    trial.set_constraint("min_keys", tune.min_keys - n_keys)
    state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
    study.tell(trial, value if ok else None, state=state)
    return TrialResult(trial.number, drawn, value, ssim_min, n_keys, state.name)


def tune(
    scenario: Scenario,
    store: str,
    run_cells: Callable[[list[Cell]], None],
    *,
    trials: int,
    parallel: int,
    storage: str | None = None,
    on_trial: Callable[[TrialResult, optuna.Study], None] | None = None,
) -> optuna.Study:
    """Run until the study holds `trials` finished trials (resuming an existing study)."""
    from results import load

    study = open_study(scenario.name, storage, store, scenario)
    attempts = 0
    while (done := _finished(study)) < trials and attempts < 2 * trials:
        batch = [study.ask() for _ in range(min(parallel, trials - done))]
        for trial in batch:
            trial.set_user_attr("driver", _driver_id())
        attempts += len(batch)
        drawn = [trial_scenario(scenario, t) for t in batch]
        run_cells(
            [c for t, (sc, _) in zip(batch, drawn, strict=True) for c in trial_cells(sc, t.number)]
        )
        df = load(store)
        for t, (_, params) in zip(batch, drawn, strict=True):
            rows = df[df["scenario"] == trial_label(scenario, t.number)]
            result = finish(study, t, rows, scenario, params)
            if on_trial:
                on_trial(result, study)
    return study


def _finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE,)
    return len(study.get_trials(deepcopy=False, states=states))


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    feasible = [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if all(v <= 0 for v in t.constraints.values())
    ]
    return max(feasible, key=lambda t: t.value) if feasible else None


def best_fragment_path(store: str, scenario: Scenario) -> Path:
    return Path(store).expanduser() / "optuna" / f"{scenario.name}.best.yaml"


def write_best(study: optuna.Study, scenario: Scenario, path: Path) -> dict | None:
    """The best feasible trial's parameters as a YAML fragment a scenario can `include:`."""
    best = best_feasible(study)
    if best is None:
        return None
    tune = scenario.tune
    base = next(m for m in scenario.methods if m.name == tune.method)
    params = METHODS.get(tune.method).Params(**{**base.params, **best.params})
    values = params.model_dump(mode="json", exclude_defaults=True)
    values.update({name: getattr(params, name) for name in tune.space})  # tuned: always shown
    fragment = {"methods": [{"name": tune.method, "params": values}]}
    header = (
        f"# best feasible trial {best.number} of study {study.study_name!r}: "
        f"disc_rel {best.value:.4f}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(fragment, sort_keys=False))
    return fragment
