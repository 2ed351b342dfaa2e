"""Cells, stage jobs, keys and stable ids: the engine's side of the plug-in contract.

A key is the sha256 of the canonical JSON of everything a stage's output depends on,
including the plug-in's name and version, so a victim trained once serves every method, a
marked model serves every attack and an aux step (an ISN, a key set, null models) is shared
by every cell that declares the same one, across runs and scenarios that share a store.
Plug-ins declare their aux steps and needs (`harness.plugin`); only this module turns those
declarations into keys and jobs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from harness.attacks import ATTACKS, Attack
from harness.methods import METHODS, Method
from harness.plugin import AuxStep, Plugin, VictimRef, need_name

VICTIM_VERSION = "1"


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4096)
def _plugin(kind: str, name: str, params: str) -> Plugin:
    registry = METHODS if kind == "method" else ATTACKS
    return registry.get(name)(json.loads(params))


def method_of(cell: Cell) -> Method:
    """The cell's method plug-in (instances are cached: building the DAG asks often)."""
    return _plugin("method", cell.method, canonical(cell.method_params))


def attack_of(cell: Cell) -> Attack:
    return _plugin("attack", cell.attack, canonical(cell.attack_params))


def aux_stage(plugin: Plugin, step: str) -> str:
    """The stage (and artifact folder) name of a plug-in's aux step."""
    return f"aux/{plugin.name}/{step}"


def plugin_of_stage(cell: Cell, stage: str) -> tuple[Plugin, AuxStep]:
    """The plug-in and declared step an `aux/<plugin>/<step>` job of `cell` runs."""
    _, name, step = stage.split("/", 2)
    plugin = method_of(cell) if name == cell.method else attack_of(cell)
    steps = {s.name: s for s in plugin.aux_steps()}
    return plugin, steps[step]


@dataclass(frozen=True)
class Job:
    """One stage task: its function name, content key, cell, upstream jobs, resource class.

    `names` are the names the upstream jobs reach the plug-in under (``ctx.inputs``)."""

    stage: str  # train_victim | embed | attack | aux/<plugin>/<step>
    key: str
    cell: Cell
    deps: tuple[Job, ...] = ()
    resources: str = "train"  # which entry of the scenario's `resources` applies
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    scenario: str
    dataset: dict
    train: dict
    arch: str
    method: str
    method_params: dict
    attack: str
    attack_params: dict
    seed: int
    attack_role: str | None = None  # labels below: not part of any stage key
    trial: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(**d)

    def victim_key(self, seed: int | None = None, arch: str | None = None) -> str:
        seed = self.seed if seed is None else seed
        arch = arch or self.arch
        return digest(["train_victim", VICTIM_VERSION, self.dataset, self.train, arch, seed])

    def victim_job(self, seed: int | None = None, arch: str | None = None) -> Job:
        """The plain victim of this cell's data and training, for another seed or arch if asked."""
        cell = replace(self, seed=self.seed if seed is None else seed, arch=arch or self.arch)
        return Job("train_victim", cell.victim_key(), cell)

    # ------------------------------------------------------------------ declared upstream

    def _need(self, plugin: Plugin, need, steps: dict[str, AuxStep]) -> Job:
        if isinstance(need, VictimRef):
            return self.victim_job(seed=self.seed + need.seed_offset, arch=need.arch)
        return self.aux_job(plugin, steps[need], steps)

    def aux_job(self, plugin: Plugin, step: AuxStep, steps: dict[str, AuxStep]) -> Job:
        """A declared aux step: keyed by the plug-in's name and version, the step, the params
        that matter and its upstream keys (the data set for a scenario-level step)."""
        deps = tuple(self._need(plugin, n, steps) for n in step.needs)
        values = plugin.params.model_dump(mode="json")  # public (alias) names
        fields = values if step.params == "all" else step.params
        keyed = {k: values[k] for k in sorted(fields) if k not in step.exclude}
        upstream = [d.key for d in deps] or [self.dataset]
        key = digest(["aux", plugin.kind, plugin.name, plugin.version, step.name, keyed, upstream])
        names = tuple(need_name(n) for n in step.needs)
        return Job(aux_stage(plugin, step.name), key, self, deps, step.resources, names)

    def _needs(self, plugin: Plugin, needs) -> tuple[tuple[Job, ...], tuple[str, ...]]:
        steps = {s.name: s for s in plugin.aux_steps()}
        jobs = tuple(self._need(plugin, n, steps) for n in needs)
        return jobs, tuple(need_name(n) for n in needs)

    def embed_job(self) -> Job:
        method = method_of(self)
        key = digest(["embed", self.victim_key(), self.method, method.version, self.method_params])
        deps, names = self._needs(method, method.needs())
        return Job("embed", key, self, (self.victim_job(), *deps), "embed", ("victim", *names))

    def attack_job(self, embed: Job | None = None) -> Job:
        attack = attack_of(self)
        embed = embed or self.embed_job()
        key = digest(["attack", embed.key, self.attack, attack.version, self.attack_params])
        deps, names = self._needs(attack, tuple(s.name for s in attack.aux_steps()))
        return Job("attack", key, self, (embed, *deps), "attack", ("marked", *names))

    def embed_key(self) -> str:
        return self.embed_job().key

    def attack_key(self) -> str:
        return self.attack_job().key

    @property
    def cell_id(self) -> str:
        return cell_id_of(self.scenario, self.attack_key(), self.attack_role, self.trial)


def cell_id_of(scenario: str, attack_key: str, role: str | None = None, trial=None) -> str:
    return digest(["cell", scenario, attack_key, role, trial])


def distinct_jobs(cells: list[Cell]) -> dict[str, Job]:
    """Every distinct stage job the cells need, by key (what the scheduler submits once)."""
    jobs: dict[str, Job] = {}
    stack = [c.attack_job() for c in cells]
    while stack:
        job = stack.pop()
        if job.key not in jobs:
            jobs[job.key] = job
            stack.extend(job.deps)
    return jobs
