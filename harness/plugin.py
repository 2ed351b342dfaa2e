"""What every method and attack plug-in declares, and what the engine hands back to it.

A plug-in is one file: a pydantic ``Params``, a class with ``@register("name")`` and the hooks
below. The engine owns everything around the hooks - validation, grid expansion, stage keys,
artifacts, caching and sharing of aux steps, timing, failure capture, the row, the removal
rule, ``harness show`` and ``harness tune`` - so a plug-in never builds a key, names a stage
string or touches the store.

Declarations (class attributes or cheap instance methods, all read in the driver):

- ``version``: bump it when the plug-in's output changes; its aux, embed (methods) and attack
  keys change with it, nothing upstream does.
- ``tasks``: the data it applies to ("classification", "image2image").
- ``metrics``: `Metric`s it writes into a row's ``metrics`` map (and, for methods, the score
  itself under ``wm_metric``); ``show``, the report and tuning objectives read them.
- ``aux_steps()``: `AuxStep`s, each a cached job the engine runs once per distinct key and
  shares between cells (an ISN per scenario, a key set per source victim, ...).
- ``tiny_params()``: parameters small enough for the inherited contract suite.
- ``summary_table(df)`` and ``report_figures``: the plug-in's own section of ``harness show``
  and ``harness report`` (the driver stores the table and ``describe()`` with the results; the
  report reads them from the store and never imports a plug-in).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from harness.config import expand_params, grid_size
from model_zoo import ModelSpec
from results.analysis import aggregate_metrics


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Metric:
    """A figure a plug-in writes into rows (``metrics[name]``) or, with ``level="table"``,
    computes over a group of rows in `Plugin.tune_figures` (e.g. discriminability)."""

    name: str
    meaning: str
    higher_is_better: bool | None = True  # None: neither (a diagnostic)
    agg: Literal["mean", "min", "max", "sum"] = "mean"  # over the cells of a group
    optional: bool = False  # only some attacks or models produce it
    level: Literal["row", "table"] = "row"


@dataclass(frozen=True)
class Bars:
    """A figure of the plug-in's own section in `harness report`: bars of the `y` columns of
    its `summary_table`, one group per row (labelled by the `x` columns joined). Data, not
    code: the report draws it from the stored table without importing the plug-in."""

    title: str
    x: tuple[str, ...]
    y: tuple[str, ...]
    ylabel: str = ""
    hline: float | None = None  # a reference line (a threshold, chance)


@dataclass(frozen=True)
class VictimRef:
    """An upstream victim: the cell's own (default) or an independently trained one of another
    seed (``seed_offset``) or architecture - a null model, a key-generation source. Victims are
    shared with the cells that train them anyway."""

    name: str = "victim"
    seed_offset: int = 0
    arch: str | None = None


Need = str | VictimRef  # a str names another aux step of the same plug-in


@dataclass(frozen=True)
class AuxStep:
    """A cached job the plug-in needs before ``embed`` (methods) or ``apply`` (attacks).

    The engine keys it by the plug-in's name and version, the step name, the values of
    ``params`` (``"all"``: every parameter, minus ``exclude``) and the keys of ``needs``
    (victims and other steps, by name); a step that needs nothing is keyed by the data set
    instead (one per scenario: an ISN). It calls ``run(ctx)`` once per key, with each need
    loaded as ``ctx.inputs[name]`` (an `Artifact`), saves the returned `AuxOutput` (model and
    secret under ``artifacts/`` only), times it and hands it to every cell that needs it."""

    name: str
    run: Callable[..., AuxOutput]
    needs: tuple[Need, ...] = (VictimRef(),)
    params: Collection[str] | Literal["all"] = ()
    exclude: Collection[str] = ()
    resources: Literal["train", "embed"] = "embed"


@dataclass
class AuxOutput:
    """What an aux step returns: a model (with its ``spec``, or rebuilt by the plug-in from
    ``meta`` and ``Artifact.state()``), secret material, and small public figures."""

    model: nn.Module | None = None
    spec: ModelSpec | None = None
    secret: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Embedded:
    """What ``Method.embed`` returns: the marked model (the victim itself for non-intrusive
    methods), the secret key material (saved under ``artifacts/`` only, handed back to
    ``verify``) and the model's spec if the method changed its structure."""

    model: nn.Module
    secret: dict[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    # the other licensed copies the owner hands out (one per user: DeepMarks' fingerprinted
    # copies), same spec as `model`: not secret - a collusion attack reads them
    # (`ctx.marked.copy(name)`); `model` is the copy the cell's attacks start from
    copies: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class Attacked:
    """What ``Attack.apply`` returns: the attacked model (a new one for extraction), its spec
    if the structure or arch changed, evidence the attacker claims with (forged passports,
    keys: artifacts only, handed to the method's ``verify`` as ``ctx.evidence``) and public
    figures of the attack itself (declared in the attack's ``metrics``; written into the row,
    e.g. how far a function-preserving change moved the logits)."""

    model: nn.Module
    spec: ModelSpec | None = None
    evidence: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class WatermarkScore:
    """A verification outcome; ``score`` is None for methods with nothing to verify."""

    score: float | None
    detected: bool
    threshold: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Plugin:
    """Shared by methods and attacks (see the module docstring)."""

    kind: ClassVar[str] = "plug-in"
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[BaseModel]] = NoParams
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    metrics: ClassVar[tuple[Metric, ...]] = ()
    # `harness tune`: the figure maximised (or minimised) by default, from `tune_figures`
    objective: ClassVar[str | None] = None
    summary_title: ClassVar[str | None] = None  # title of `summary_table` in `harness show`
    report_figures: ClassVar[tuple[Bars, ...]] = ()  # drawn from `summary_table` by the report

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = self.Params(**(params or {}))

    # -------------------------------------------------------------- validation (driver)

    def check_data(self, dataset) -> None:
        """Raise a ConfigError (field: the parameter's name) if these params cannot work on
        `dataset` (a DatasetCfg). Called at validation, before any task starts."""

    def check_arch(self, arch: str, dataset) -> None:
        """As `check_data`, for each arch of the scenario (e.g. passport layers need BatchNorm);
        may build (never train) the network."""

    def scenario_warnings(self, scenario) -> list[str]:
        """What in `scenario` (a Scenario) makes these params run but measure little (e.g. no
        attack that exercises them): printed as warnings at validation, never errors."""
        return []

    def check_tune(self, scenario, objective: str) -> str | None:
        """Why `objective` cannot be measured on this scenario (None: it can). Called at
        validation for a `tune:` section naming this plug-in."""
        return None

    @classmethod
    def tiny_params(cls) -> dict[str, Any]:
        """Parameters small enough for the contract suite (seconds on a CPU)."""
        return {}

    @classmethod
    def grid(cls, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The raw parameter dicts of every grid point a scenario's `params` expand to (before
        validation): the cartesian product over list values. A plug-in whose parameters nest
        other plug-ins' (`stack`) expands theirs too."""
        return expand_params(params, cls.Params)

    @classmethod
    def grid_count(cls, params: dict[str, Any]) -> int:
        """len(grid(params)), counted without making the points (the grid-size guard)."""
        return grid_size(params, cls.Params)

    # -------------------------------------------------------------- stages (workers)

    def aux_steps(self) -> list[AuxStep]:
        """Cached jobs this plug-in's stage needs first; read in the driver for every cell."""
        return []

    # -------------------------------------------------------------- analysis (no torch)

    @classmethod
    def declared(cls) -> dict[str, Metric]:
        return {m.name: m for m in cls.metrics}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What the report needs to know of this plug-in, as JSON (stored with the results, so
        that the report reads the store alone): its declared metrics and section figures."""
        return {
            "kind": cls.kind,
            "name": cls.name,
            "version": cls.version,
            "summary_title": cls.summary_title,
            "objective": cls.objective,
            "metrics": [asdict(m) for m in cls.metrics],
            "figures": [asdict(f) for f in cls.report_figures],
        }

    @classmethod
    def summary_table(cls, df):
        """This plug-in's own table for `harness show` / the report from its ok rows (a pandas
        DataFrame), or None. Default: none beyond the engine's method x attack table."""
        return None

    @classmethod
    def tune_figures(cls, df) -> dict[str, float]:
        """Figures of one tuning trial from its rows: each declared row metric aggregated as
        declared, plus table-level figures a plug-in adds (override and extend)."""
        return aggregate_metrics(df, cls.metrics)


def need_name(need: Need) -> str:
    return need.name if isinstance(need, VictimRef) else need
