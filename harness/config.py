"""Scenario schema (pydantic, extra="forbid"), YAML loading with `include:`, grid expansion.

Every error a user can make in a scenario surfaces here as a ConfigError naming the file, the
field path, the bad value and what is allowed, before any Ray task is started.
"""

from __future__ import annotations

import itertools
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.errors import ConfigError
from harness.registry import close_match

STAGES = ("train", "embed", "attack", "verify")


SEED_MAX = 2**31 - 1  # every RNG the harness seeds (numpy, torch, offsets added) takes it
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetCfg(Strict):
    name: str = "digits"
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    root: str | None = None
    download: bool = False
    test_fraction: float = Field(0.2, gt=0, lt=1)
    attacker_fraction: float = Field(1 / 3, gt=0, lt=1)
    split_seed: Seed = 0
    samples: int = Field(1000, ge=10, description="synthetic / photo_pairs: number of images")
    num_classes: int = Field(10, ge=2, description="synthetic only: number of classes")
    degradation: Literal["noise", "rain", "blur"] = Field(
        "noise", description="photo_pairs only: how domain A is made from the clean patch B"
    )


class TrainCfg(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    augment: bool = False
    amp: bool = True


class StageResources(Strict):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(
                "num_gpus above 1 must be a whole number (Ray packs only fractions < 1)"
            )
        return v


class Resources(Strict):
    train: StageResources = StageResources()
    embed: StageResources | None = None
    attack: StageResources = StageResources()
    verify: StageResources = StageResources()

    def for_stage(self, stage: str) -> StageResources:
        """Embedding is usually a training job: it takes the train resources unless told."""
        if stage == "embed":
            return self.embed or self.train
        return getattr(self, stage)


class ComponentCfg(Strict):
    """A method or attack: a bare name, or {name, params}; list values expand the grid.

    `role` labels an attack as a benign or a malicious modification (for methods whose
    figure of merit contrasts the two)."""

    name: str
    params: dict[str, Any] = {}
    role: Literal["benign", "malicious"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class SearchRange(Strict):
    """One searched parameter: a float or int range (``log`` for a log scale), or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or a low / high range, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or give choices)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        whole = float(self.low).is_integer() and float(self.high).is_integer()
        if self.type == "int" and not whole:
            raise ValueError("an int range needs whole-number bounds")
        return self

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high


CONSTRAINT = r"^\s*(>=|<=)\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"

PATH_PART = re.compile(r"\[(\d+)\]|\.?([A-Za-z_][A-Za-z0-9_]*)")


def param_path(key: str) -> tuple[str | int, ...]:
    """A searched parameter's path inside a plug-in's params: `shift`, or into a nested list of
    plug-ins (`stack`'s steps) `attacks[0].params.sparsity`."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(key):
        m = PATH_PART.match(key, pos)
        if m is None or m.end() == pos or (pos == 0 and m.group(0)[0] in ".["):
            raise ValueError(f"not a parameter path: {key!r} (e.g. `shift`, "
                             "`attacks[0].params.sparsity`)")  # fmt: skip
        if m.group(2) and pos and not m.group(0).startswith("."):
            raise ValueError(f"not a parameter path: {key!r} (a `.` goes before a name)")
        parts.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    return tuple(parts)


def get_param(params: Any, parts: tuple[str | int, ...]) -> Any:
    """The value at `parts` (KeyError / IndexError / TypeError where the path leaves params)."""
    for part in parts:
        if isinstance(part, int) != isinstance(params, list):
            raise TypeError(f"{part!r} does not index a {type(params).__name__}")
        params = params[part]
    return params


def with_param(params: dict[str, Any], parts: tuple[str | int, ...], value: Any) -> dict:
    """A copy of `params` with `value` at `parts` (copied along the path, shared elsewhere).
    A missing key is made (a nested plug-in's default made explicit, e.g. a step written
    without `params`); a missing list index is an error."""
    head, rest = parts[0], parts[1:]
    if isinstance(params, list):
        get_param(params, (head,))
        inner = value if not rest else with_param(params[head], rest, value)
        return [inner if i == head else v for i, v in enumerate(params)]
    inner = value if not rest else with_param(params.get(head, {}), rest, value)
    return {**params, head: inner}



class TuneCfg(Strict):
    """`harness tune`: Optuna over the parameters of one method or one attack of the scenario.

    The objective is a figure the plug-in declares (default: its own, e.g. the watermark score
    after the scenario's attacks, or removal for an attack); constraints bound declared figures
    (``{ssim_min: ">= 0.99"}``) and are met when every one holds."""

    method: str | None = None
    # one attack, or several: each trial then draws which attack (a categorical `attack`)
    # and that attack's own space, whose keys read `<attack>.<param>`
    attack: str | list[str] | None = None
    space: dict[str, SearchRange] = Field(min_length=1)
    objective: str | None = None
    direction: Literal["maximize", "minimize"] | None = None
    constraints: dict[str, Annotated[str, StringConstraints(pattern=CONSTRAINT)]] = {}
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    # one study per method and / or arch of the scenario (a tuned attacker: the strongest
    # attack against each scheme on each arch), instead of one over the whole grid
    # `attack` (with a list of attacks): one study per attack instead of the choice among them
    per: list[Literal["method", "arch", "attack"]] = []

    @model_validator(mode="after")
    def _one_plugin(self) -> TuneCfg:
        if (self.method is None) == (self.attack is None):
            raise ValueError("name exactly one plug-in to tune: `method: NAME` or `attack: NAME`")
        if isinstance(self.attack, list):
            if not self.attack:
                raise ValueError("`attack:` lists no attack to choose from")
            if len(set(self.attack)) != len(self.attack):
                raise ValueError(f"`attack:` names an attack twice: {self.attack}")
        if "attack" in self.per and self.method is not None:
            raise ValueError("`per: [attack]` splits a tuned attacker; this tunes a method")
        return self

    @property
    def kind(self) -> str:
        return "method" if self.method is not None else "attack"

    @property
    def candidates(self) -> list[str]:
        """The plug-ins a trial may tune: one, or the attacks a trial chooses among."""
        if self.method is not None:
            return [self.method]
        return list(self.attack) if isinstance(self.attack, list) else [self.attack]

    @property
    def target(self) -> str:
        """The one tuned plug-in (a choice among attacks has none: see `candidates`)."""
        if len(self.candidates) != 1:
            raise ValueError(f"this study chooses among {self.candidates}")
        return self.candidates[0]

    def space_of(self, name: str) -> dict[str, SearchRange]:
        """Candidate `name`'s searched parameters by path (prefix `<name>.` dropped when a
        trial chooses among several attacks)."""
        if len(self.candidates) == 1:
            return dict(self.space)
        prefix = f"{name}."
        return {k.removeprefix(prefix): v for k, v in self.space.items() if k.startswith(prefix)}

    def bounds(self) -> dict[str, tuple[str, float]]:
        """Each constraint as (operator, bound)."""
        out = {}
        for name, text in self.constraints.items():
            text = text.strip()
            out[name] = (text[:2], float(text[2:]))
        return out


WHERE_KEYS = ("method", "attack", "arch", "attack_role", "method_params", "attack_params")


class ReportedFigure(Strict):
    """A figure the method's paper reports: `harness report` prints it beside the figure
    measured on the rows that `where` selects, and the gap (RobustBench style).

    `metric` is a generic figure (wm_score, wm_detected, wm_removed, task_score, task_drop,
    embed_drop), a row metric of the plug-in (e.g. ssim_min), or a column of its own summary
    table (e.g. disc_rel); `op` says what the paper claims: at least (>=), at most (<=) or
    about (==) `value`. `where` picks rows by name columns, and by parameters with a dict
    (``method_params: {adversarial: true}``)."""

    metric: str = Field(min_length=1)
    value: float
    op: Literal[">=", "<=", "=="] = "=="
    where: dict[str, Any] = {}
    setting: str = ""
    source: str = ""

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("where")
    @classmethod
    def _known_columns(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if key not in WHERE_KEYS:
                raise ValueError(f"unknown column {key!r}; allowed: {', '.join(WHERE_KEYS)}")
            if key.endswith("_params") != isinstance(value, dict):
                kind = "a mapping of parameters" if key.endswith("_params") else "a name"
                raise ValueError(f"{key} takes {kind}, got {value!r}")
        return v


class Scenario(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    dataset: DatasetCfg = DatasetCfg()
    train: TrainCfg = TrainCfg()
    seeds: list[Seed] = Field([0], min_length=1)
    archs: list[str] = Field(min_length=1)
    methods: list[ComponentCfg] = Field(min_length=1)
    attacks: list[ComponentCfg] = Field(min_length=1)
    resources: Resources = Resources()
    max_in_flight: int | None = Field(None, ge=1)
    max_retries: int = Field(2, ge=0)
    # figures from the paper, compared by `harness report`; a mapping is free text (notes)
    reported: list[ReportedFigure] | dict[str, Any] = []
    tune: TuneCfg | None = None

    @field_validator("name")
    @classmethod
    def _not_a_folder_name(cls, v: str) -> str:
        if set(v) == {"."}:
            raise ValueError("a name of dots only names a folder (the store uses it as one)")
        return v


def param_names(params_model: type[BaseModel]) -> list[str]:
    """A plug-in's parameter names as a scenario spells them (a field's alias if it has one,
    e.g. `lambda`, a Python keyword)."""
    return sorted(f.alias or name for name, f in params_model.model_fields.items())


UNION_TAG = re.compile(r"^[A-Za-z_]+\[.*\]$")  # pydantic's name of a union's branch in a loc


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and UNION_TAG.match(part):
            continue  # `reported.list[ReportedFigure][0]` reads `reported[0]`
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _inner_model(arg)) is not None:
            return found
    return None


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _inner_model(field.annotation) if field else None
    return model


def _from_validation(
    err: ValidationError, file: str | None, root: type[BaseModel], prefix: str | None = None
) -> ConfigError:
    """The first pydantic error as a ConfigError, with allowed values and a close match."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(p for p in (prefix, _field_path(loc)) if p)
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a plug-in validator re-raising one of ours
        return cause.with_location(file, path)
    allowed = hint = None
    if first["type"] == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        allowed = sorted(model.model_fields) if model else None
    elif first["type"] == "literal_error":
        model = _model_at(root, loc[:-1])
        field = model.model_fields.get(loc[-1]) if model else None
        allowed = _literal_values(field.annotation) if field else None
    if allowed:
        hint = close_match(
            str(loc[-1] if first["type"] == "extra_forbidden" else first["input"]),
            [str(a) for a in allowed],
        )
    msg = first["msg"].removeprefix("Value error, ")
    return ConfigError(
        msg, file=file, field=path, value=first.get("input"), allowed=allowed, hint=hint
    )


def _literal_values(annotation: Any) -> list | None:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        if (found := _literal_values(arg)) is not None:
            return found
    return None


def expand_params(params: dict[str, Any], params_model: type[BaseModel]) -> list[dict[str, Any]]:
    """Cartesian product over list values; a list-typed field expands only on a list of lists."""
    axes = _param_axes(params, params_model)
    return [dict(zip(params, combo, strict=True)) for combo in itertools.product(*axes)]


def grid_size(params: dict[str, Any], params_model: type[BaseModel]) -> int:
    """How many points `expand_params` makes, without making them (some may turn out equal
    once defaults are filled in)."""
    return math.prod(len(axis) for axis in _param_axes(params, params_model))


def _param_axes(params: dict[str, Any], params_model: type[BaseModel]) -> list[list[Any]]:
    axes: list[list[Any]] = []
    for key, value in params.items():
        field = params_model.model_fields.get(key)
        list_typed = field is not None and _is_list_type(field.annotation)
        if isinstance(value, list) and (not list_typed or (value and isinstance(value[0], list))):
            if not value:
                raise ConfigError("an empty list expands to no cells", field=key, value=value)
            axes.append(value)
        else:
            axes.append([value])
    return axes


def _is_list_type(annotation: Any) -> bool:
    origins = {typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))}
    return bool(origins & {list, tuple})


def resolve_component(comp: ComponentCfg, registry, field: str, file: str | None) -> list[dict]:
    """Validated, default-filled parameter dicts for every grid point of one component."""
    try:
        cls = registry.get(comp.name)
    except ConfigError as e:
        raise e.with_location(file, f"{field}.name") from None
    out = []
    try:
        grid = cls.grid(comp.params)
    except ConfigError as e:
        raise e.with_location(file, f"{field}.params") from None
    for point in grid:
        try:
            params = cls.Params(**point)
        except ValidationError as e:
            raise _from_validation(e, file, cls.Params, f"{field}.params") from None
        for path, value in _non_finite(params.model_dump(by_alias=True)):
            raise ConfigError(
                "must be a finite number",
                file=file,
                field=f"{field}.params.{path}",
                value=value,
            )
        out.append(params.model_dump(mode="json"))
    return out


def _non_finite(value: Any, path: str = ""):
    """(path, value) of every inf / nan float inside a plug-in's params (JSON would turn them
    into null, silently: the plug-in's default)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{path}[{i}]")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a mapping repeating a key is an error (not last-wins)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ConfigError("scenario file not found", file=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"not valid YAML{where}: {getattr(e, 'problem', e)}", file=str(path)
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            "a scenario must be a YAML mapping", file=str(path), value=type(data).__name__
        )
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_dicts else value
    return out


def load_yaml_with_includes(path: Path, _seen: tuple = ()) -> dict:
    """`include: [a.yaml, ...]` merges those files first (paths relative to this one)."""
    if path.resolve() in _seen:
        raise ConfigError("include cycle", file=str(path))
    data = _read_yaml(path)
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(
            "include must be a file name or a list of file names",
            file=str(path),
            field="include",
            value=includes,
        )
    merged: dict = {}
    for inc in includes:
        merged = _merge(
            merged, load_yaml_with_includes(path.parent / inc, (*_seen, path.resolve()))
        )
    return _merge(merged, data)


def parse_scenario(data: dict, file: str | None = None) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e, file, Scenario) from None
