"""The contract every registered plug-in inherits (Optuna's `optuna/testing` style), on tiny
data, in-process (no Ray).

Driven by the registries: a new method or attack is picked up with no edit here; it declares
its own small parameters (`tiny_params`). By default every method meets `identity` and one
weight attack, and every attack meets `none` and `trigger_set` (or the methods it applies to);
the full method x attack cross product is marked `slow`.
"""

from __future__ import annotations

import pytest

from harness.artifacts import ArtifactStore
from harness.attacks import ATTACKS
from harness.cells import Cell
from harness.config import ComponentCfg, DatasetCfg, Scenario, TrainCfg
from harness.errors import ConfigError
from harness.grid import check_scenario
from harness.methods import METHODS
from harness.stages import run_cell, verify_context
from harness.training import TASK_METRIC

# One tiny data set and network per task a plug-in can declare.
TASKS = {
    "classification": (
        DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4),
        TrainCfg(epochs=3, batch_size=32, lr=0.05),
        "lenet",
    ),
    "image2image": (
        DatasetCfg(name="photo_pairs", image_size=32, channels=3, samples=120),
        TrainCfg(epochs=2, batch_size=16, lr=1e-3, optimizer="adam"),
        "unet@8",
    ),
}
VOLATILE = {"run_id", "created_at", "duration_s", "stage_seconds", "node", "git_sha"}


def task_of(method: str) -> str:
    return METHODS.get(method).tasks[0]


def applies(method: str, attack: str) -> bool:
    a = ATTACKS.get(attack)
    return task_of(method) in a.tasks and (a.methods is None or method in a.methods)


def tiny(registry, name: str) -> dict:
    cls = registry.get(name)
    return cls.Params(**cls.tiny_params()).model_dump(mode="json")


def make_cell(method: str, attack: str, seed: int = 0) -> Cell:
    dataset, train, arch = TASKS[task_of(method)]
    return Cell(
        "contract",
        dataset.model_dump(mode="json"),
        train.model_dump(mode="json"),
        arch,
        method,
        tiny(METHODS, method),
        attack,
        tiny(ATTACKS, attack),
        seed,
    )


def _weight_attack(method: str) -> str | None:
    """The weight attack a method meets by default: fine-tuning, else the first that applies."""
    if applies(method, "fine_tune"):
        return "fine_tune"
    others = [a for a in ATTACKS.list() if a != "identity" and applies(method, a)]
    return others[0] if others else None


def _partners(attack: str) -> list[str]:
    """The methods an attack meets by default: `none` and `trigger_set` where they apply,
    else (image-to-image, or attacks on one method's models) the methods it applies to."""
    default = [m for m in ("none", "trigger_set") if applies(m, attack)]
    return default or [m for m in METHODS.list() if applies(m, attack)][:2]


ALL_PAIRS = [(m, a) for m in METHODS.list() for a in ATTACKS.list() if applies(m, a)]
DEFAULT_PAIRS = sorted(
    {(m, "identity") for m in METHODS.list()}
    | {(m, a) for m in METHODS.list() if (a := _weight_attack(m))}
    | {(m, a) for a in ATTACKS.list() for m in _partners(a)}
)
SLOW_PAIRS = [p for p in ALL_PAIRS if p not in DEFAULT_PAIRS]
WITH_SCORE = [m for m in METHODS.list() if METHODS.get(m).wm_metric]
INTRUSIVE = [m for m in WITH_SCORE if METHODS.get(m).marks_weights]


def test_every_plugin_is_exercised_by_default():
    assert {m for m, _ in DEFAULT_PAIRS} == set(METHODS.list())
    assert {a for _, a in DEFAULT_PAIRS} == set(ATTACKS.list())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("contract-store"))


def _check_row(method: str, row: dict) -> None:
    assert row["status"] == "ok", f"{row.get('error')}\n{row.get('traceback')}"
    assert row["task_metric"] == TASK_METRIC[task_of(method)]
    if row["task_metric"] == "accuracy":
        assert 0.0 <= row["task_score_attacked"] <= 1.0
    else:
        assert 5.0 < row["task_score_attacked"] < 60.0  # PSNR in dB of a (poorly) trained net
    assert row["wm_metric"] == METHODS.get(method).wm_metric
    if row["wm_metric"] is not None:
        assert row["wm_score_attacked"] is not None and row["wm_threshold"] is not None


@pytest.mark.parametrize(("method", "attack"), DEFAULT_PAIRS)
def test_method_meets_attack_as_a_valid_row(method, attack, store):
    _check_row(method, run_cell(make_cell(method, attack), store))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "attack"), SLOW_PAIRS)
def test_method_meets_attack_as_a_valid_row_full_product(method, attack, store):
    _check_row(method, run_cell(make_cell(method, attack), store))


@pytest.mark.parametrize("method", WITH_SCORE)
def test_embed_then_verify_detects(method, store):
    row = run_cell(make_cell(method, "identity"), store)
    assert row["wm_detected"], f"{method}: marked model not detected ({row['wm_score_attacked']})"


@pytest.mark.parametrize("method", INTRUSIVE)
def test_an_unmarked_model_is_not_detected(method, store):
    cell = make_cell(method, "identity")
    run_cell(cell, store)
    artifacts = ArtifactStore(store)
    victim = artifacts.load_meta("train_victim", cell.victim_key())
    marked = artifacts.load_meta("embed", cell.embed_key())
    model, secret, ctx = verify_context(cell, store, "cpu", marked, victim)
    score = METHODS.get(method)(cell.method_params).verify(model, secret, ctx)
    assert not score.detected, f"{method}: unmarked victim detected ({score.score})"


@pytest.mark.parametrize("method", METHODS.list())
def test_every_declared_metric_is_in_the_row(method, store):
    row = run_cell(make_cell(method, "identity"), store)
    required = [m.name for m in METHODS.get(method).metrics if m.level == "row" and not m.optional]
    missing = [name for name in required if name not in row["metrics"]]
    assert not missing, f"{method} declares metrics its rows lack: {missing}"


@pytest.mark.parametrize("method", METHODS.list())
def test_same_seed_gives_the_same_row(method, tmp_path):
    attack = _weight_attack(method) or "identity"
    cell = make_cell(method, attack)
    first = run_cell(cell, str(tmp_path / "a"))
    second = run_cell(cell, str(tmp_path / "b"))
    assert {k: v for k, v in first.items() if k not in VOLATILE} == {
        k: v for k, v in second.items() if k not in VOLATILE
    }


def _upstream_keys(job) -> dict[str, str]:
    out, stack = {}, list(job.deps)
    while stack:
        dep = stack.pop()
        out[dep.stage + ":" + dep.key] = dep.stage
        stack.extend(dep.deps)
    return out


@pytest.mark.parametrize("method", METHODS.list())
def test_a_method_version_bump_changes_its_own_keys_only(method, monkeypatch):
    cell = make_cell(method, "identity")
    before = cell.embed_job()
    monkeypatch.setattr(METHODS.get(method), "version", "bumped")
    after = cell.embed_job()
    assert after.key != before.key
    old, new = _upstream_keys(before), _upstream_keys(after)
    victims = {k for k, stage in old.items() if stage == "train_victim"}
    assert victims == {k for k, stage in new.items() if stage == "train_victim"}
    aux_old = {k for k, stage in old.items() if stage.startswith("aux/")}
    aux_new = {k for k, stage in new.items() if stage.startswith("aux/")}
    assert not aux_old & aux_new  # every aux step of the method is keyed anew


@pytest.mark.parametrize("attack", ATTACKS.list())
def test_an_attack_version_bump_changes_the_attack_key_only(attack, monkeypatch):
    cell = make_cell(_partners(attack)[0], attack)
    before = cell.attack_job()
    steps = ATTACKS.get(attack)(cell.attack_params).steps()
    # a chain of attacks (`stack`) is keyed by its steps: bumping the first step's version
    # changes every step's key, and nothing upstream of them
    bumped = ATTACKS.get(steps[0][0] if steps else attack)
    monkeypatch.setattr(bumped, "version", "bumped")
    after = cell.attack_job()
    assert after.key != before.key and after.deps[0].key == before.deps[0].key


def test_plugins_declare_pydantic_params_with_defaults_and_tiny_params():
    for registry in (METHODS, ATTACKS):
        for name in registry.list():
            cls = registry.get(name)
            assert cls.Params().model_config.get("extra") == "forbid", name
            cls.Params(**cls.tiny_params())  # validates
            names = [m.name for m in cls.metrics]
            assert len(names) == len(set(names)), f"{name}: a metric declared twice"
            assert all(m.meaning for m in cls.metrics), f"{name}: a metric without meaning"


@pytest.mark.parametrize(
    ("kind", "name"),
    [("method", m) for m in METHODS.list()] + [("attack", a) for a in ATTACKS.list()],
)
def test_data_of_a_task_the_plugin_does_not_declare_is_refused(kind, name):
    cls = (METHODS if kind == "method" else ATTACKS).get(name)
    other = [t for t in TASKS if t not in cls.tasks]
    if not other:
        pytest.skip(f"{name} takes every task")
    dataset, train, arch = TASKS[other[0]]
    comp = ComponentCfg(name=name, params=cls.tiny_params())
    scenario = Scenario(
        name="refuse",
        dataset=dataset,
        train=train,
        archs=[arch],
        methods=[comp] if kind == "method" else ["none"],
        attacks=[comp] if kind == "attack" else ["identity"],
    )
    with pytest.raises(ConfigError) as err:
        check_scenario(scenario, "refuse.yaml")
    assert err.value.exit_code == 2 and err.value.field == f"{kind}s[0].name"


@pytest.mark.parametrize("method", METHODS.list())
def test_report_section_is_declared_as_data_its_table_can_draw(method, store):
    """`describe()` is what the driver stores for `harness report` (JSON, no code); every bar
    figure it declares names columns the plug-in's own table has."""
    import json

    import pandas as pd

    cls = METHODS.get(method)
    described = json.loads(json.dumps(cls.describe()))
    assert described["name"] == method and described["kind"] == "method"
    assert [m["name"] for m in described["metrics"]] == [m.name for m in cls.metrics]
    row = run_cell(make_cell(method, "identity"), store)
    table = cls.summary_table(pd.DataFrame([row]))
    for fig in cls.report_figures:
        assert fig.title and fig.y, f"{method}: a report figure without title or bars"
        if table is None:  # e.g. discriminability needs benign and malicious rows
            continue
        assert set(fig.x) <= set(table.columns), f"{method}: {fig.x} not in {list(table)}"
        assert set(fig.y) & set(table.columns), f"{method}: none of {fig.y} in {list(table)}"
