"""`harness tune`: plain Optuna ask/tell in the driver over the parameters of any method or
attack of the scenario; each trial's cells go through the same scheduler (K trials' cells in
flight together) and land as ordinary Parquet rows that carry the trial number.

The objective is a figure the tuned plug-in declares (`Plugin.tune_figures` over the trial's
rows: its row metrics aggregated as declared, table-level figures such as discriminative
samples' `disc_rel`, and the generic ones: watermark score, detection, removal, task drop).
Constraints (`trial.set_constraint`, feasible when <= 0) bound any such figure. A resumed
study re-seeds its sampler with the number of trials it already holds, so it never replays
the draws of the trials before it.
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
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from harness.attacks import ATTACKS
from harness.cells import Cell
from harness.config import Scenario, SearchRange, get_param, param_path, with_param
from harness.errors import ConfigError
from harness.grid import MAX_CELLS, expand_cells
from harness.methods import METHODS
from results import load

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class TrialResult:
    number: int
    params: dict[str, object]
    value: float | None
    figures: dict[str, float]  # the objective's and the constraints' figures
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
        backend = JournalFileBackend(storage or default_storage(store))
        storage_obj: optuna.storages.BaseStorage | str = JournalStorage(backend)
    else:
        storage_obj = storage
    tune = scenario.tune
    study = optuna.create_study(
        study_name=name,
        storage=storage_obj,
        direction=direction(scenario),
        load_if_exists=True,
    )
    # A sampler seeded afresh would replay the draws of the trials already held: offset it.
    seed = tune.seed + len(study.get_trials(deepcopy=False))
    study.sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
        if tune.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _driver_alive(stale.user_attrs.get("driver")):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    if not study.trials:  # the first trials measure the untuned parameters
        for params in baselines(scenario):
            study.enqueue_trial(params)
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


def plugin_class(scenario: Scenario, name: str | None = None):
    """The tuned plug-in's class (candidate `name` of a study that chooses among attacks;
    the first candidate by default)."""
    tune = scenario.tune
    return (METHODS if tune.kind == "method" else ATTACKS).get(name or tune.candidates[0])


def objective_name(scenario: Scenario) -> str:
    return scenario.tune.objective or plugin_class(scenario).default_objective()


def choosing(scenario: Scenario) -> bool:
    """Each trial draws which attack (the categorical parameter `attack`) before its space."""
    return len(scenario.tune.candidates) > 1


def direction(scenario: Scenario) -> str:
    """The tune section's, else the declared metric's (higher-is-better: maximise)."""
    tune = scenario.tune
    if tune.direction:
        return tune.direction
    metric = plugin_class(scenario).declared().get(objective_name(scenario))
    return "minimize" if metric is not None and metric.higher_is_better is False else "maximize"


def _components(scenario: Scenario):
    return scenario.methods if scenario.tune.kind == "method" else scenario.attacks


def _base(scenario: Scenario, name: str):
    return next(c for c in _components(scenario) if c.name == name)


def _raw_params(scenario: Scenario, name: str) -> dict[str, object]:
    """The scenario's params of candidate `name`, with the plug-in's default for each searched
    parameter it leaves out (a nested path is then set inside that default)."""
    base = _base(scenario, name)
    defaults = plugin_class(scenario, name).Params().model_dump(mode="json")
    tops = {param_path(key)[0] for key in scenario.tune.space_of(name)}
    return {**{t: defaults[t] for t in tops if t not in base.params}, **base.params}


def _with_drawn(params: dict, space_values: dict[str, object]) -> dict:
    for key, value in space_values.items():
        params = with_param(params, param_path(key), value)
    return params


def _key(scenario: Scenario, name: str, path: str) -> str:
    """A searched parameter's name in the study (`<attack>.<path>` when trials choose)."""
    return f"{name}.{path}" if choosing(scenario) else path


def baselines(scenario: Scenario) -> list[dict[str, object]]:
    """The first trials: each candidate at the scenario's own values (or its defaults) of the
    searched parameters."""
    out = []
    for name in scenario.tune.candidates:
        space = scenario.tune.space_of(name)
        cls = plugin_class(scenario, name)
        resolved = cls.Params(**cls.grid(_raw_params(scenario, name))[0])
        dumped = resolved.model_dump(mode="json")
        values = {}
        for path, spec in space.items():
            try:
                value = get_param(dumped, param_path(path))
            except (KeyError, IndexError, TypeError):
                continue  # a nested default the plug-in fills in later: drawn instead
            if spec.contains(value):
                values[_key(scenario, name, path)] = value
        out.append({"attack": name, **values} if choosing(scenario) else values)
    return out


def suggest(trial: optuna.Trial, name: str, space: SearchRange):
    if space.choices is not None:
        return trial.suggest_categorical(name, space.choices)
    if space.type == "int":
        return trial.suggest_int(name, int(space.low), int(space.high), log=space.log)
    return trial.suggest_float(name, space.low, space.high, log=space.log)


def trial_scenario(scenario: Scenario, trial: optuna.Trial) -> tuple[Scenario, dict[str, object]]:
    """The scenario with the tuned plug-in's parameters drawn for this trial (first which
    attack, when the study chooses among several: the others leave the trial's grid)."""
    tune = scenario.tune
    names = tune.candidates
    name = trial.suggest_categorical("attack", names) if choosing(scenario) else names[0]
    space = tune.space_of(name)
    values = {path: suggest(trial, _key(scenario, name, path), r) for path, r in space.items()}
    comps = [
        c.model_copy(update={"params": _with_drawn(_raw_params(scenario, name), values)})
        if c.name == name else c
        for c in _components(scenario)
        if c.name == name or c.name not in names
    ]  # fmt: skip
    field = "methods" if tune.kind == "method" else "attacks"
    drawn = {_key(scenario, name, path): v for path, v in values.items()}
    if choosing(scenario):
        drawn = {"attack": name, **drawn}
    return scenario.model_copy(update={field: comps}), drawn


def studies(scenario: Scenario) -> list[Scenario]:
    """The scenario as `tune.per` splits it: one per method component, arch and / or attack
    (of a list to choose from), named `<scenario>.<method>.<arch>.<attack>` (its study, trial
    labels and best fragment follow the name); the whole scenario when `per` is empty."""
    per = scenario.tune.per
    if not per:
        return [scenario]
    names = [m.name for m in scenario.methods]
    labels = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
    methods = (
        [([m], [label]) for m, label in zip(scenario.methods, labels, strict=True)]
        if "method" in per
        else [(list(scenario.methods), [])]
    )
    archs = [([a], [a]) for a in scenario.archs] if "arch" in per else [(scenario.archs, [])]
    parts = [
        scenario.model_copy(update={
            "name": ".".join([scenario.name, *m_label, *a_label]), "methods": ms, "archs": arch,
        })  # fmt: skip
        for ms, m_label in methods
        for arch, a_label in archs
    ]
    return [one for part in parts for one in _per_attack(part)] if "attack" in per else parts


def _per_attack(scenario: Scenario) -> list[Scenario]:
    """One scenario per candidate attack, named after it, tuning it alone (its space's keys
    without the `<attack>.` prefix), with the other candidates out of its grid."""
    tune, names = scenario.tune, scenario.tune.candidates
    if len(names) == 1:
        return [scenario]
    return [
        scenario.model_copy(update={
            "name": f"{scenario.name}.{name}",
            "attacks": [a for a in scenario.attacks if a.name == name or a.name not in names],
            "tune": tune.model_copy(update={"attack": name, "space": tune.space_of(name)}),
        })  # fmt: skip
        for name in names
    ]


def trial_label(scenario: Scenario, number: int) -> str:
    return f"{scenario.name}.trial{number}"


def trial_cells(scenario: Scenario, number: int, max_cells: int = MAX_CELLS) -> list[Cell]:
    """The trial's cells: scenario `<name>.trial<N>`, `trial` N (stage caches still shared)."""
    label = trial_label(scenario, number)
    cells = expand_cells(scenario, max_cells=max_cells)
    return [replace(c, scenario=label, trial=number) for c in cells]


def evaluate(df, scenario: Scenario, name: str | None = None) -> dict[str, float]:
    """The tuned plug-in's figures over one trial's rows (NaN where none); a tuned attack's
    over its own rows only (the scenario's other attacks run in the trial all the same)."""
    name = name or scenario.tune.candidates[0]
    if scenario.tune.kind == "attack":
        df = df[df["attack"] == name]
    return plugin_class(scenario, name).tune_figures(df)


def constraint_values(scenario: Scenario, figures: dict[str, float]) -> dict[str, float]:
    """Each constraint as Optuna wants it (<= 0: met); a figure that could not be measured
    counts as violated."""
    out = {}
    for name, (op, bound) in scenario.tune.bounds().items():
        value = figures.get(name, float("nan"))
        if not math.isfinite(value):
            out[name] = 1.0
        else:
            out[name] = bound - value if op == ">=" else value - bound
    return out


def finish(study: optuna.Study, trial: optuna.Trial, df, scenario: Scenario, drawn) -> TrialResult:
    figures = evaluate(df, scenario, drawn.get("attack") if choosing(scenario) else None)
    name = objective_name(scenario)
    value = figures.get(name, float("nan"))
    ok = value is not None and math.isfinite(value)
    for cname, cvalue in constraint_values(scenario, figures).items():
        trial.set_constraint(cname, cvalue)
    state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
    study.tell(trial, value if ok else None, state=state)
    shown = {k: figures.get(k, float("nan")) for k in (name, *scenario.tune.constraints)}
    return TrialResult(trial.number, drawn, value if ok else None, shown, state.name)


def tune(
    scenario: Scenario,
    store: str,
    run_cells: Callable[[list[Cell]], None],
    *,
    trials: int,
    parallel: int,
    storage: str | None = None,
    on_trial: Callable[[TrialResult, optuna.Study], None] | None = None,
    max_cells: int = MAX_CELLS,
) -> optuna.Study:
    """Run until the study holds `trials` finished trials (resuming an existing study)."""
    study = open_study(scenario.name, storage, store, scenario)
    attempts = 0
    while (done := _finished(study)) < trials and attempts < 2 * trials:
        batch = [study.ask() for _ in range(min(parallel, trials - done))]
        for trial in batch:
            trial.set_user_attr("driver", _driver_id())
        attempts += len(batch)
        drawn = [trial_scenario(scenario, t) for t in batch]
        pairs = zip(batch, drawn, strict=True)
        run_cells([c for t, (sc, _) in pairs for c in trial_cells(sc, t.number, max_cells)])
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
    if not feasible:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(feasible, key=lambda t: sign * t.value)


def best_fragment_path(store: str, scenario: Scenario) -> Path:
    return Path(store).expanduser() / "optuna" / f"{scenario.name}.best.yaml"


def write_best(study: optuna.Study, scenario: Scenario, path: Path) -> dict | None:
    """The best feasible trial's parameters as a YAML fragment a scenario can `include:`."""
    best = best_feasible(study)
    if best is None:
        return None
    tune = scenario.tune
    name = best.params["attack"] if choosing(scenario) else tune.target
    base = _base(scenario, name)
    space = tune.space_of(name)
    drawn = {path: best.params[_key(scenario, name, path)] for path in space}
    params = plugin_class(scenario, name).Params(**_with_drawn(_raw_params(scenario, name), drawn))
    values = params.model_dump(mode="json", exclude_defaults=True)
    dumped = params.model_dump(mode="json")
    values.update({t: dumped[t] for t in {param_path(p)[0] for p in space}})  # tuned: shown
    entry = {"name": name, "params": values}
    if tune.kind == "attack" and base.role is not None:
        entry["role"] = base.role
    fragment = {"methods" if tune.kind == "method" else "attacks": [entry]}
    header = (
        f"# best feasible trial {best.number} of study {study.study_name!r}: "
        f"{objective_name(scenario)} {best.value:.4f}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(fragment, sort_keys=False))
    return fragment
