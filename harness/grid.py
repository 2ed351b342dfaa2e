"""A scenario file to the validated grid of cells: load, check everything checkable against
the registered plug-ins (names, params, data, archs, tuning), expand - all before Ray starts.

Every error surfaces as a ConfigError naming the file, the field path, the bad value and what
is allowed (exit code 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import ValidationError

from harness import data
from harness.attacks import ATTACKS, Attack
from harness.cells import Cell, canonical
from harness.config import (
    ComponentCfg,
    Scenario,
    get_param,
    load_yaml_with_includes,
    param_names,
    param_path,
    parse_scenario,
    resolve_component,
    with_param,
)
from harness.errors import ConfigError
from harness.methods import METHODS
from harness.registry import close_match
from model_zoo import check_arch
from model_zoo.image2image import check_image_size
from results.analysis import GENERIC_FIGURES

REGISTRIES = {"method": METHODS, "attack": ATTACKS}
MAX_CELLS = 1_000_000  # `--max-cells`: a larger grid is refused before it is expanded


def load_scenario(path: str | Path, max_cells: int = MAX_CELLS) -> Scenario:
    """Parse and fully check a scenario file: schema, names, parameters, data availability,
    and a grid of at most `max_cells` cells."""
    path = Path(path)
    scenario = parse_scenario(load_yaml_with_includes(path), str(path))
    check_scenario(scenario, str(path), max_cells)
    for warning in scenario_warnings(scenario, str(path)):
        print(f"warning: {warning}", file=sys.stderr)
    return scenario


def scenario_warnings(scenario: Scenario, file: str | None = None) -> list[str]:
    """What each plug-in's `scenario_warnings` says of this scenario (it runs, but measures
    little: e.g. DAWN with no attack that queries the deployment), with the field it is about."""
    out: list[str] = []
    where = f"{file}: " if file else ""
    for field, comps, registry in (
        ("methods", scenario.methods, METHODS),
        ("attacks", scenario.attacks, ATTACKS),
    ):
        for i, comp in enumerate(comps):
            for params in resolve_component(comp, registry, f"{field}[{i}]", file):
                for text in registry.get(comp.name)(params).scenario_warnings(scenario):
                    line = f"{where}{field}[{i}] ({comp.name}): {text}"
                    out += [line] if line not in out else []
    return out


def _grid_points(scenario: Scenario, file: str | None) -> list[tuple]:
    """Every (method, params, params' canonical JSON, attack, params, role, params' canonical
    JSON) pair of grid points, in grid order; pairs of an attack that targets other methods'
    models (`Attack.methods`) are left out."""
    methods = [
        (m.name, p)
        for i, m in enumerate(scenario.methods)
        for p in resolve_component(m, METHODS, f"methods[{i}]", file)
    ]
    attacks = [
        (a.name, p, a.role, canonical(p), ATTACKS.get(a.name).methods)
        for i, a in enumerate(scenario.attacks)
        for p in resolve_component(a, ATTACKS, f"attacks[{i}]", file)
    ]
    return [
        (m, mp, canonical(mp), a, ap, role, ap_text)
        for m, mp in methods
        for a, ap, role, ap_text, targets in attacks
        if targets is None or m in targets
    ]


def _cells(scenario: Scenario, pairs: list[tuple], archs, seeds):
    dataset = scenario.dataset.model_dump(mode="json")
    train = scenario.train.model_dump(mode="json")
    texts = (canonical(dataset), canonical(train))
    points = [
        (m, mp, a, ap, role, (*texts, mp_text, ap_text))
        for m, mp, mp_text, a, ap, role, ap_text in pairs
    ]
    name = scenario.name
    for arch in archs:
        for seed in seeds:
            for m, mp, a, ap, role, shared in points:
                cell = Cell(name, dataset, train, arch, m, mp, a, ap, seed, role)
                yield cell._share_texts(shared)


def expand_cells(
    scenario: Scenario, file: str | None = None, max_cells: int = MAX_CELLS
) -> list[Cell]:
    """The full grid, ordered so that cells sharing a victim and a marked model are adjacent.

    Pairs of an attack that targets other methods' models (`Attack.methods`) are left out; a
    grid of more than `max_cells` cells is refused before any cell is made."""
    check_grid_size(scenario, file, max_cells)
    pairs = _grid_points(scenario, file)
    seen: dict[str, Cell] = {}
    for cell in _cells(scenario, pairs, scenario.archs, scenario.seeds):
        seen.setdefault(cell.cell_id, cell)
    return list(seen.values())


def count_cells(scenario: Scenario, file: str | None = None) -> int:
    """len(expand_cells(scenario)) from the axes alone, without making a cell: distinct archs
    x distinct seeds x the distinct (method point, attack point) pairs expand_cells keeps."""
    points = _grid_points(scenario, file)
    pairs = {(m, mp_text, a, ap_text, role) for m, _, mp_text, a, _, role, ap_text in points}
    return len(set(scenario.archs)) * len(set(scenario.seeds)) * len(pairs)


def _cells_bound(scenario: Scenario) -> int:
    """An upper bound of the grid's size from the raw parameter lists (no validation)."""
    methods = [(m.name, METHODS.get(m.name).grid_count(m.params)) for m in scenario.methods]
    pairs = 0
    for a in scenario.attacks:
        cls = ATTACKS.get(a.name)
        points = cls.grid_count(a.params)
        pairs += points * sum(n for m, n in methods if cls.methods is None or m in cls.methods)
    return len(scenario.archs) * len(scenario.seeds) * pairs


def check_grid_size(scenario: Scenario, file: str | None = None, max_cells: int = MAX_CELLS):
    """A ConfigError if the grid has more than `max_cells` cells, counted, not expanded."""
    try:
        if _cells_bound(scenario) <= max_cells:
            return
    except ConfigError:
        pass  # a bad name or params: count_cells says where
    count = count_cells(scenario, file)
    if count > max_cells:
        raise ConfigError(
            f"the grid has {count:,} cells, more than --max-cells allows ({max_cells:,}): "
            "shrink it, or raise --max-cells",
            file=file,
            field="grid",
            value=count,
        )


def check_scenario(
    scenario: Scenario, file: str | None = None, max_cells: int = MAX_CELLS
) -> None:
    task = data.task_of(scenario.dataset.name)
    for i, arch in enumerate(scenario.archs):
        try:
            check_arch(arch, image2image=task == "image2image")
            if task == "image2image":
                check_image_size(arch, scenario.dataset.image_size, scenario.dataset.channels)
        except ConfigError as e:
            raise e.with_location(file, f"archs[{i}]") from None
    try:
        data.check_dataset(scenario.dataset)
    except ConfigError as e:
        raise e.with_location(file, None if e.field else "dataset.name") from None
    for field, comps, registry in (
        ("methods", scenario.methods, METHODS),
        ("attacks", scenario.attacks, ATTACKS),
    ):
        for i, comp in enumerate(comps):
            check_component(comp, registry, f"{field}[{i}]", file, scenario)
    method_names = {m.name for m in scenario.methods}
    for i, a in enumerate(scenario.attacks):
        targets = ATTACKS.get(a.name).methods
        if targets is not None and not method_names & set(targets):
            raise ConfigError(
                f"attack {a.name!r} targets models of other methods only: no cell would run it",
                file=file,
                field=f"attacks[{i}].name",
                value=a.name,
                allowed=list(targets),
                hint="add one of those methods to `methods`",
            )
    check_pairs(scenario, file)
    check_grid_size(scenario, file, max_cells)
    pairs = _grid_points(scenario, file)
    for cell in _cells(scenario, pairs, scenario.archs[:1], scenario.seeds[:1]):
        cell.attack_job()  # every grid point's declared needs and aux steps resolve
    if scenario.tune is not None:
        check_tune(scenario, file)


def check_pairs(scenario: Scenario, file: str | None) -> None:
    """Each attack's `check_method` on every method grid point it meets (only attacks that
    define one: most do not, and a large grid skips this loop)."""
    for i, a in enumerate(scenario.attacks):
        cls = ATTACKS.get(a.name)
        if cls.check_method is Attack.check_method:
            continue
        methods = [
            METHODS.get(m.name)(params)
            for j, m in enumerate(scenario.methods)
            if cls.methods is None or m.name in cls.methods
            for params in resolve_component(m, METHODS, f"methods[{j}]", file)
        ]
        for params in resolve_component(a, ATTACKS, f"attacks[{i}]", file):
            attack = cls(params)
            for method in methods:
                try:
                    attack.check_method(method)
                except ConfigError as e:
                    raise e.with_location(file, f"attacks[{i}].params") from None


def check_component(comp: ComponentCfg, registry, field: str, file: str | None, scenario) -> None:
    """The plug-in handles the data set's task, and each grid point suits the data
    (`check_data`: e.g. a U-Net depth the image size allows) and every arch (`check_arch`:
    e.g. passport layers need BatchNorm) - before any task starts."""
    dataset = scenario.dataset
    task = data.task_of(dataset.name)
    grid = resolve_component(comp, registry, field, file)  # an unknown name fails here
    cls = registry.get(comp.name)
    if task not in cls.tasks:
        raise ConfigError(
            f"{registry.kind} {comp.name!r} does not apply to {task} data ({dataset.name})",
            file=file,
            field=f"{field}.name",
            value=comp.name,
            allowed=[n for n in registry.list() if task in registry.get(n).tasks],
        )
    for params in grid:
        try:
            plugin = cls(params)
            plugin.check_data(dataset)
            for arch in scenario.archs:
                plugin.check_arch(arch, dataset)
        except ConfigError as e:
            raise e.with_location(file, f"{field}.params") from None


def tune_figures_allowed(cls) -> list[str]:
    """What a tuning objective or constraint on plug-in `cls` may name."""
    own = [cls.wm_metric] if getattr(cls, "wm_metric", None) else []
    return sorted({*own, *cls.declared(), *GENERIC_FIGURES})


def _one_of(value: str, allowed: list[str], what: str, field: str, file: str | None) -> None:
    if value not in allowed:
        raise ConfigError(
            f"must be {what}",
            file=file,
            field=field,
            value=value,
            allowed=allowed,
            hint=close_match(str(value), allowed),
        )


def check_tune(scenario: Scenario, file: str | None) -> None:
    """The tuned plug-in (or each attack a trial chooses among) is one of the scenario's, the
    space names real parameters (a path into nested plug-ins' params for `stack`) at values
    they accept, and the objective and constraints name figures every candidate declares."""
    tune = scenario.tune
    kind, names = tune.kind, tune.candidates
    comps = scenario.methods if kind == "method" else scenario.attacks
    present = [c.name for c in comps]
    several = len(names) > 1
    for i, name in enumerate(names):
        field = f"tune.{kind}[{i}]" if several else f"tune.{kind}"
        _one_of(name, present, f"one of the scenario's {kind}s", field, file)
        if several and present.count(name) > 1:
            raise ConfigError(
                f"a trial choosing among attacks picks {name!r} by name: list it once in "
                "`attacks` (tune each setting in a study of its own)",
                file=file, field=field, value=name,
            )  # fmt: skip
    if several:
        prefixes = [f"{n}." for n in names]
        for key in tune.space:
            if not key.startswith(tuple(prefixes)):
                raise ConfigError(
                    "with several attacks to choose from, a searched parameter reads "
                    "`<attack>.<parameter>`",
                    file=file, field=f"tune.space.{key}", value=key,
                    allowed=[f"{p}<parameter>" for p in prefixes],
                )  # fmt: skip
    allowed = None
    objective = tune.objective or REGISTRIES[kind].get(names[0]).default_objective()
    for name in names:
        cls = REGISTRIES[kind].get(name)
        base = next(c for c in comps if c.name == name)
        base_params = resolve_component(base, REGISTRIES[kind], f"tune.{kind}", file)
        prefix = f"{name}." if several else ""
        for key, spec in tune.space_of(name).items():
            _check_searched(cls, name, base_params[0], key, spec, f"tune.space.{prefix}{key}", file)
        own = tune_figures_allowed(cls)
        allowed = own if allowed is None else [f for f in allowed if f in own]
        for params in base_params:
            if (why := cls(params).check_tune(scenario, objective)) is not None:
                raise ConfigError(why, file=file, field="tune.objective", value=objective)
    what = f"a figure {names[0]} declares" if not several else "a figure every attack declares"
    _one_of(objective, allowed, what, "tune.objective", file)
    for c in tune.constraints:
        _one_of(c, allowed, what, f"tune.constraints.{c}", file)


def _check_searched(cls, name: str, base: dict, key: str, spec, field: str, file) -> None:
    """One searched parameter: a path that exists in the plug-in's params (a nested plug-in's
    parameter may be new: its default is searched) and ends the plug-in accepts."""
    try:
        parts = param_path(key)
    except ValueError as e:
        raise ConfigError(str(e), file=file, field=field, value=key) from None
    _one_of(str(parts[0]), param_names(cls.Params), f"a parameter of {name}", field, file)
    for depth in range(1, len(parts) - 1):
        try:
            get_param(base, parts[: depth + 1])
        except (KeyError, IndexError, TypeError):
            inner = get_param(base, parts[:depth])
            keys = (
                [f"[{i}]" for i in range(len(inner))] if isinstance(inner, list)
                else sorted(inner) if isinstance(inner, dict) else []
            )  # fmt: skip
            raise ConfigError(
                f"the path leaves {name}'s parameters at {parts[depth]!r}",
                file=file, field=field, value=key, allowed=keys,
            ) from None  # fmt: skip
    ends = spec.choices if spec.choices is not None else [spec.low, spec.high]
    for value in ends:
        value = int(value) if spec.type == "int" and spec.choices is None else value
        try:
            cls.Params(**with_param(base, parts, value))
        except (ValidationError, ConfigError) as e:
            if isinstance(e, ValidationError):  # a nested plug-in's own ConfigError, if any
                e = (e.errors()[0].get("ctx") or {}).get("error", e)
            msg = (
                f"{e.field + ': ' if e.field else ''}{e.message}" if isinstance(e, ConfigError)
                else e.errors()[0]["msg"]
            )  # fmt: skip
            raise ConfigError(
                f"the search space reaches a value {name} refuses: "
                f"{msg.removeprefix('Value error, ')}",
                file=file, field=field, value=value,
            ) from None  # fmt: skip
