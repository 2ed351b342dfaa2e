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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(**d)

    def victim_key(self, seed: int | None = None) -> str:
        seed = self.seed if seed is None else seed
        return digest(["train_victim", VICTIM_VERSION, self.dataset, self.train, self.arch, seed])

    def null_seeds(self) -> list[int]:
        from harness.methods import create_method

        return create_method(self.method, self.method_params).null_seeds(self.seed)

    def embed_key(self) -> str:
        from harness.methods import METHODS

        version = METHODS.get(self.method).version
        return digest(["embed", self.victim_key(), self.method, version, self.method_params])

    def attack_key(self) -> str:
        from harness.attacks import ATTACKS

        version = ATTACKS.get(self.attack).version
        return digest(["attack", self.embed_key(), self.attack, version, self.attack_params])

    @property
    def cell_id(self) -> str:
        return digest(["cell", self.scenario, self.attack_key()])

    def with_seed(self, seed: int) -> Cell:
        return replace(self, seed=seed)


def expand_cells(scenario, file: str | None = None) -> list[Cell]:
    """The full grid, ordered so that cells sharing a victim and a marked model are adjacent."""
    from harness.attacks import ATTACKS
    from harness.config import resolve_component
    from harness.methods import METHODS

    methods = [
        (m.name, p)
        for i, m in enumerate(scenario.methods)
        for p in resolve_component(m, METHODS, f"methods[{i}]", file)
    ]
    attacks = [
        (a.name, p)
        for i, a in enumerate(scenario.attacks)
        for p in resolve_component(a, ATTACKS, f"attacks[{i}]", file)
    ]
    dataset, train = (
        scenario.dataset.model_dump(mode="json"),
        scenario.train.model_dump(mode="json"),
    )
    cells = [
        Cell(scenario.name, dataset, train, arch, m, mp, a, ap, seed)
        for arch in scenario.archs
        for seed in scenario.seeds
        for m, mp in methods
        for a, ap in attacks
    ]
    seen: dict[str, Cell] = {}
    for cell in cells:
        seen.setdefault(cell.cell_id, cell)
    return list(seen.values())
