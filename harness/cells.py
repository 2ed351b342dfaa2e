"""Cells, stage keys and stable ids.

A key is the sha256 of the canonical JSON of everything a stage's output depends on,
including the plug-in's version, so a victim trained once serves every method and a marked
model serves every attack, across runs and scenarios that share a store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

VICTIM_VERSION = "1"


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Job:
    """One stage task: its function name, content key, cell, upstream jobs, resource class."""

    stage: str  # train_victim | embed | attack | aux/<step> (a method's own stage)
    key: str
    cell: Cell
    deps: tuple[Job, ...] = ()
    resources: str = "train"  # which entry of the scenario's `resources` applies


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

    def embed_job(self) -> Job:
        from harness.methods import METHODS, create_method

        version = METHODS.get(self.method).version
        key = digest(["embed", self.victim_key(), self.method, version, self.method_params])
        aux = create_method(self.method, self.method_params).aux_jobs(self)
        return Job("embed", key, self, (self.victim_job(), *aux), "embed")

    def attack_job(self, embed: Job | None = None) -> Job:
        from harness.attacks import ATTACKS

        embed = embed or self.embed_job()
        version = ATTACKS.get(self.attack).version
        key = digest(["attack", embed.key, self.attack, version, self.attack_params])
        return Job("attack", key, self, (embed,), "attack")

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


def expand_cells(scenario, file: str | None = None) -> list[Cell]:
    """The full grid, ordered so that cells sharing a victim and a marked model are adjacent.

    Pairs of an attack that targets other methods' models (`Attack.methods`) are left out."""
    from harness.attacks import ATTACKS
    from harness.config import resolve_component
    from harness.methods import METHODS

    methods = [
        (m.name, p)
        for i, m in enumerate(scenario.methods)
        for p in resolve_component(m, METHODS, f"methods[{i}]", file)
    ]
    attacks = [
        (a.name, p, a.role)
        for i, a in enumerate(scenario.attacks)
        for p in resolve_component(a, ATTACKS, f"attacks[{i}]", file)
    ]
    dataset, train = (
        scenario.dataset.model_dump(mode="json"),
        scenario.train.model_dump(mode="json"),
    )
    cells = [
        Cell(scenario.name, dataset, train, arch, m, mp, a, ap, seed, role)
        for arch in scenario.archs
        for seed in scenario.seeds
        for m, mp in methods
        for a, ap, role in attacks
        if ATTACKS.get(a).methods is None or m in ATTACKS.get(a).methods
    ]
    seen: dict[str, Cell] = {}
    for cell in cells:
        seen.setdefault(cell.cell_id, cell)
    return list(seen.values())
