"""Cells, stage jobs, keys and stable ids: the engine's side of the plug-in contract.

A key is the sha256 of the canonical JSON of everything a stage's output depends on,
including the plug-in's name and version, so a victim trained once serves every method, a
marked model serves every attack and an aux step (an ISN, a key set, null models) is shared
by every cell that declares the same one, across runs and scenarios that share a store.
Plug-ins declare their aux steps and needs (`harness.plugin`); only this module turns those
declarations into keys and jobs.

Grids reach 10^5 cells, so the keys are cheap to ask for again: a cell encodes each of its
dicts once (cells of one grid share those texts), a key's canonical JSON is assembled from
the encoded parts (the canonical JSON of a list is its items' texts joined by commas), and
victim and embed keys, shared by many cells, are remembered by what they digest. A cell is a
value: its dicts are never changed in place (`dataclasses.replace` makes another cell).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from harness.attacks import ATTACKS, Attack
from harness.methods import METHODS, Method
from harness.plugin import AuxStep, Plugin, VictimRef, need_name

VICTIM_VERSION = "1"

# what json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str) builds on each call
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical(obj: Any) -> str:
    return _ENCODER.encode(obj)


_encode_str = json.encoder.encode_basestring_ascii  # what the encoder does with a str


def _text(value: Any) -> str:
    """`canonical`, short-cut for the str and None items of keys."""
    if type(value) is str:
        return _encode_str(value)
    return "null" if value is None else canonical(value)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def digest(obj: Any) -> str:
    return _sha(canonical(obj))


def _digest_of(*texts: str) -> str:
    """`digest` of a list given the canonical texts of its items."""
    return _sha("[" + ",".join(texts) + "]")


# Victim and embed keys by exactly what they digest (each shared by many cells). Bounded:
# emptied when full, which costs only recomputation.
_MEMO_MAX = 65_536
_VICTIM_KEYS: dict[tuple, str] = {}
_EMBED_KEYS: dict[tuple, str] = {}


def _remember(memo: dict, key: tuple, value: str) -> str:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value
    return value


@functools.lru_cache(maxsize=4096)
def _plugin(kind: str, name: str, params: str) -> Plugin:
    registry = METHODS if kind == "method" else ATTACKS
    return registry.get(name)(json.loads(params))


def method_of(cell: Cell) -> Method:
    """The cell's method plug-in (instances are cached: building the DAG asks often)."""
    return _plugin("method", cell.method, cell._texts()[2])


def attack_of(cell: Cell) -> Attack:
    return _plugin("attack", cell.attack, cell._texts()[3])


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


_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """A copy of a JSON-like value, as `dataclasses.asdict` makes it (faster)."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {_plain(k): _plain(v) for k, v in value.items()}
    if kind is list:
        return [_plain(v) for v in value]
    if kind is tuple:
        return tuple(_plain(v) for v in value)
    return copy.deepcopy(value)


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
        return {name: _plain(getattr(self, name)) for name in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(**d)

    # ------------------------------------------------------------------ memo (not fields)

    def _texts(self) -> tuple[str, str, str, str]:
        """Canonical JSON of dataset, train, method_params and attack_params, made once."""
        texts = self.__dict__.get("memo_texts")
        if texts is None:
            texts = self.__dict__["memo_texts"] = (
                canonical(self.dataset),
                canonical(self.train),
                canonical(self.method_params),
                canonical(self.attack_params),
            )
        return texts

    def _share_texts(self, texts: tuple[str, str, str, str]) -> Cell:
        """Hand this cell the canonical texts of its dicts (cells of one grid share them)."""
        self.__dict__["memo_texts"] = texts
        return self

    def _moved(self, seed: int, arch: str) -> Cell:
        """This cell for another seed / arch (as `dataclasses.replace`, faster)."""
        if seed == self.seed and arch == self.arch and type(seed) is type(self.seed):
            return self
        cell = Cell(
            self.scenario, self.dataset, self.train, arch, self.method, self.method_params,
            self.attack, self.attack_params, seed, self.attack_role, self.trial,
        )  # fmt: skip
        if (texts := self.__dict__.get("memo_texts")) is not None:
            cell.__dict__["memo_texts"] = texts
        return cell

    # ------------------------------------------------------------------ keys

    def victim_key(self, seed: int | None = None, arch: str | None = None) -> str:
        seed = self.seed if seed is None else seed
        arch = arch or self.arch
        dataset, train = self._texts()[:2]
        memo = (dataset, train, arch, seed) if type(seed) is int and type(arch) is str else None
        key = _VICTIM_KEYS.get(memo) if memo else None
        if key is None:
            key = _digest_of(
                '"train_victim"', _text(VICTIM_VERSION), dataset, train, _text(arch), _text(seed)
            )
            if memo:
                _remember(_VICTIM_KEYS, memo, key)
        return key

    def victim_job(self, seed: int | None = None, arch: str | None = None) -> Job:
        """The plain victim of this cell's data and training, for another seed or arch if asked."""
        cell = self._moved(self.seed if seed is None else seed, arch or self.arch)
        return Job("train_victim", cell.victim_key(), cell)

    def _method_key_texts(self) -> tuple[str, str | None]:
        """(the method params the embed key holds, the verify-only params set away from their
        defaults - which only the cell id holds - or None). Most methods have no verify-only
        params: then the first is the params' text and the second None."""
        memo = self.__dict__.get("memo_key_texts")
        if memo is None:
            cls = METHODS.get(self.method)
            only = cls.verify_params
            if not only:
                memo = (self._texts()[2], None)
            else:
                defaults = cls.Params().model_dump(mode="json")
                params = self.method_params
                extra = {k: params[k] for k in only if k in params and params[k] != defaults[k]}
                keyed = {k: v for k, v in params.items() if k not in only}
                memo = (canonical(keyed), canonical(extra) if extra else None)
            self.__dict__["memo_key_texts"] = memo
        return memo

    def embed_key(self) -> str:
        version = method_of(self).version
        victim, params = self.victim_key(), self._method_key_texts()[0]
        memo = (victim, self.method, type(version), version, params)
        key = _EMBED_KEYS.get(memo)
        if key is None:
            key = _remember(
                _EMBED_KEYS,
                memo,
                _digest_of('"embed"', _text(victim), _text(self.method), _text(version), params),
            )
        return key

    def _attack_key(self, embed_key: str, attack: Attack) -> str:
        if (steps := attack.steps()) is not None:  # a chain: each step keyed on the one before
            key = embed_key
            for step in self._steps(steps):
                key = step._attack_key(key, attack_of(step))
            return key
        version = attack.version
        memo = self.__dict__.get("memo_attack_key")
        if (
            memo is not None
            and memo[0] == embed_key
            and type(memo[1]) is type(version)
            and memo[1] == version
        ):
            return memo[2]
        key = _digest_of(
            '"attack"', _text(embed_key), _text(self.attack), _text(version), self._texts()[3]
        )
        self.__dict__["memo_attack_key"] = (embed_key, version, key)
        return key

    def attack_key(self) -> str:
        return self._attack_key(self.embed_key(), attack_of(self))

    @property
    def cell_id(self) -> str:
        attack_key = self.attack_key()
        memo = self.__dict__.get("memo_cell_id")
        if memo is not None and memo[0] == attack_key:
            return memo[1]
        verify = self._method_key_texts()[1]
        cell_id = cell_id_of(self.scenario, attack_key, self.attack_role, self.trial, verify)
        self.__dict__["memo_cell_id"] = (attack_key, cell_id)
        return cell_id

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
        if not needs:
            return (), ()
        steps = {s.name: s for s in plugin.aux_steps()}
        jobs = tuple(self._need(plugin, n, steps) for n in needs)
        return jobs, tuple(need_name(n) for n in needs)

    def embed_job(self) -> Job:
        method = method_of(self)
        deps, names = self._needs(method, method.needs())
        return Job(
            "embed", self.embed_key(), self, (self.victim_job(), *deps), "embed", ("victim", *names)
        )

    def _steps(self, steps: list[tuple[str, dict]]) -> list[Cell]:
        """This cell with each step's attack in place of its own (the cells of a chain's jobs)."""
        return [
            dataclasses.replace(self, attack=name, attack_params=params) for name, params in steps
        ]

    def attack_job(self, embed: Job | None = None) -> Job:
        attack = attack_of(self)
        embed = embed or self.embed_job()
        if (steps := attack.steps()) is not None:
            # one attack stage per step, each on the previous step's model ("previous"); the
            # marked model stays an input of every step (ctx.marked, the served API)
            job = embed
            for step in self._steps(steps):
                plugin = attack_of(step)
                key = step._attack_key(job.key, plugin)
                deps, names = step._needs(plugin, tuple(s.name for s in plugin.aux_steps()))
                prev = () if job is embed else (job,)
                names = ("marked", *("previous" for _ in prev), *names)
                job = Job("attack", key, step, (embed, *prev, *deps), "attack", names)
            return job
        key = self._attack_key(embed.key, attack)
        deps, names = self._needs(attack, tuple(s.name for s in attack.aux_steps()))
        return Job("attack", key, self, (embed, *deps), "attack", ("marked", *names))


_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))


def cell_id_of(
    scenario: str, attack_key: str, role: str | None = None, trial=None, verify: str | None = None
) -> str:
    """A cell's id; `verify`: the canonical text of its method's verify-only params set away
    from their defaults (two cells that share every stage but verify differently)."""
    parts = [_text(scenario), _text(attack_key), _text(role), _text(trial)]
    return _digest_of('"cell"', *parts, *([_text(verify)] if verify is not None else []))


def job_keys(job: Job) -> set[str]:
    """The keys of a job and of everything upstream of it."""
    keys: set[str] = set()
    stack = [job]
    while stack:
        job = stack.pop()
        if job.key not in keys:
            keys.add(job.key)
            stack.extend(job.deps)
    return keys


def stage_counts(cells: list[Cell]) -> Counter[str]:
    """How many distinct jobs of each stage the cells need (`distinct_jobs`, counted without
    keeping a job: a marked model's upstream is walked once)."""
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for cell in cells:
        embed_key = cell.embed_key()
        # a marked model counted before stands in as a bare job: its upstream is counted
        embed = Job("embed", embed_key, cell) if embed_key in seen else cell.embed_job()
        stack = [cell.attack_job(embed)]
        while stack:
            job = stack.pop()
            if job.key not in seen:
                seen.add(job.key)
                counts[job.stage] += 1
                stack.extend(job.deps)
    return counts


def distinct_jobs(cells: list[Cell]) -> dict[str, Job]:
    """Every distinct stage job the cells need, by key (what the scheduler submits once).

    Depth first from the last cell's attack job, as a stack of all of them would visit; a
    marked model seen before is not built again."""
    jobs: dict[str, Job] = {}
    for cell in reversed(cells):
        stack = [cell.attack_job(jobs.get(cell.embed_key()))]
        while stack:
            job = stack.pop()
            if job.key not in jobs:
                jobs[job.key] = job
                stack.extend(job.deps)
    return jobs
