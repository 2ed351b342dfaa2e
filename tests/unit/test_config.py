"""Scenario validation (ConfigError names file, field path, value, allowed values, a close match)
and grid expansion (cartesian product of list params, cell counts, `include:`, defaults)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from harness.attacks import ATTACKS
from harness.config import (
    Scenario,
    expand_params,
    load_yaml_with_includes,
)
from harness.data import DATASETS
from harness.errors import ConfigError, UnknownNameError
from harness.grid import expand_cells, load_scenario
from harness.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE = REPO_ROOT / "scenarios" / "smoke.yaml"

BASE: dict[str, Any] = {
    "name": "unit",
    "dataset": {"name": "synthetic", "image_size": 16, "channels": 1, "samples": 60},
    "train": {"epochs": 1, "batch_size": 32},
    "seeds": [0],
    "archs": ["lenet"],
    "methods": ["none"],
    "attacks": ["identity"],
}

PRUNE_DEFAULTS = {
    "sparsity": 0.5,
    "method": "l1",
    "fine_tune_epochs": 0,
    "lr": 0.01,
    "data_fraction": 1.0,
}


def write(tmp_path: Path, data: dict, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scenario_with(**changes: Any) -> dict:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return data


def config_error(tmp_path: Path, data: dict) -> tuple[ConfigError, Path]:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    return info.value, path


def cells_of(tmp_path: Path, **changes: Any) -> list:
    path = write(tmp_path, scenario_with(**changes))
    return expand_cells(load_scenario(path), str(path))


# --- validation errors -------------------------------------------------------------------------


def test_base_scenario_is_valid(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, BASE))
    assert isinstance(scenario, Scenario)
    assert scenario.archs == ["lenet"]


def test_smoke_scenario_is_valid() -> None:
    assert load_scenario(SMOKE).name == "smoke"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: t\narchs: [lenet\nmethods: [none]\n", 3),
        ("name: t\n  archs: [lenet]\n", 2),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert info.value.file == str(path)
    assert "not valid YAML" in str(info.value)
    assert f"line {line}" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as info:
        load_scenario(tmp_path / "nope.yaml")
    assert info.value.file == str(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_scenario(path)
    assert info.value.value == "list"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = scenario_with(datset={"name": "digits"})
    err, path = config_error(tmp_path, data)
    assert err.file == str(path)
    assert err.field == "datset"
    assert err.value == {"name": "digits"}
    assert err.hint == "dataset"
    assert "dataset" in err.allowed and "archs" in err.allowed and "datset" not in err.allowed
    text = str(err)
    assert text.startswith(f"{path}: datset: ")
    assert "Did you mean 'dataset'?" in text
    assert "Allowed: " in text


@pytest.mark.parametrize(
    ("section", "key", "hint", "known"),
    [
        ("dataset", "imag_size", "image_size", "channels"),
        ("train", "epoch", "epochs", "batch_size"),
    ],
)
def test_unknown_nested_key(tmp_path: Path, section: str, key: str, hint: str, known: str) -> None:
    data = scenario_with()
    data[section][key] = 3
    err, path = config_error(tmp_path, data)
    assert (err.file, err.field, err.value, err.hint) == (str(path), f"{section}.{key}", 3, hint)
    assert hint in err.allowed and known in err.allowed
    assert f"{section}.{key}" in str(err)


def test_unknown_key_in_resources_and_in_a_component(tmp_path: Path) -> None:
    err, _ = config_error(tmp_path, scenario_with(resources={"attack": {"num_gpu": 1}}))
    assert (err.field, err.hint) == ("resources.attack.num_gpu", "num_gpus")
    err, _ = config_error(tmp_path, scenario_with(attacks=[{"name": "prune", "param": {}}]))
    assert (err.field, err.hint, err.allowed) == (
        "attacks[0].param",
        "params",
        ["name", "params", "role"],
    )


def test_unknown_method_param_key(tmp_path: Path) -> None:
    data = scenario_with(attacks=["identity", {"name": "prune", "params": {"sparsty": 0.5}}])
    err, path = config_error(tmp_path, data)
    assert (err.file, err.field, err.value, err.hint) == (
        str(path),
        "attacks[1].params.sparsty",
        0.5,
        "sparsity",
    )
    assert err.allowed == sorted(PRUNE_DEFAULTS)


def test_unknown_arch_has_close_match(tmp_path: Path) -> None:
    err, path = config_error(tmp_path, scenario_with(archs=["lenet", "resnet10"]))
    assert isinstance(err, UnknownNameError)
    assert (err.file, err.field, err.value) == (str(path), "archs[1]", "resnet10")
    assert err.hint == "resnet10t"
    assert "lenet" in str(err.allowed) and "timm" in str(err.allowed)
    assert f"{path}: archs[1]: " in str(err)


@pytest.mark.parametrize(
    ("changes", "field", "value", "hint", "allowed"),
    [
        (
            {"methods": ["none", "trigger_sett"]},
            "methods[1].name",
            "trigger_sett",
            "trigger_set",
            METHODS.list(),
        ),
        (
            {"attacks": [{"name": "prun", "params": {"sparsity": 0.3}}]},
            "attacks[0].name",
            "prun",
            "prune",
            ATTACKS.list(),
        ),
        (
            {"dataset": {"name": "digit"}},
            "dataset.name",
            "digit",
            "digits",
            DATASETS.list(),
        ),
    ],
)
def test_unknown_registered_name(tmp_path: Path, changes, field, value, hint, allowed) -> None:
    err, path = config_error(tmp_path, scenario_with(**changes))
    assert isinstance(err, UnknownNameError)
    assert (err.file, err.field, err.value, err.hint, err.allowed) == (
        str(path),
        field,
        value,
        hint,
        allowed,
    )
    text = str(err)
    assert f"Did you mean {hint!r}?" in text
    assert "Allowed: " + ", ".join(allowed) in text


@pytest.mark.parametrize("sparsity", [1.5, -0.1, [0.3, 1.01]])
def test_sparsity_outside_unit_interval(tmp_path: Path, sparsity) -> None:
    data = scenario_with(attacks=[{"name": "prune", "params": {"sparsity": sparsity}}])
    err, path = config_error(tmp_path, data)
    bad = sparsity[-1] if isinstance(sparsity, list) else sparsity
    assert (err.file, err.field, err.value) == (str(path), "attacks[0].params.sparsity", bad)
    assert ("than or equal to 1" if bad > 1 else "than or equal to 0") in str(err)


@pytest.mark.parametrize(
    ("bits", "bound"), [(0, "greater than or equal to 1"), (17, "less than or equal to 16")]
)
def test_bits_outside_1_to_16(tmp_path: Path, bits: int, bound: str) -> None:
    data = scenario_with(attacks=[{"name": "quantize", "params": {"bits": [8, bits]}}])
    err, _ = config_error(tmp_path, data)
    assert (err.field, err.value) == ("attacks[0].params.bits", bits)
    assert bound in str(err)


def test_unknown_distill_student_arch(tmp_path: Path) -> None:
    data = scenario_with(attacks=[{"name": "distill", "params": {"student_arch": "resnet10"}}])
    err, path = config_error(tmp_path, data)
    assert (err.file, err.field, err.value) == (
        str(path),
        "attacks[0].params.student_arch",
        "resnet10",
    )
    assert "unknown architecture" in str(err)
    assert "Did you mean 'resnet10t'?" in str(err)


def test_unknown_distill_student_arch_keeps_hint_and_allowed(tmp_path: Path) -> None:
    """The arch check inside the Params validator must not flatten the ConfigError into text."""
    data = scenario_with(attacks=[{"name": "distill", "params": {"student_arch": "resnet10"}}])
    err, _ = config_error(tmp_path, data)
    assert err.hint == "resnet10t"
    assert "lenet" in str(err.allowed)
    assert str(err).count("(got 'resnet10')") == 1, str(err)


@pytest.mark.parametrize(
    ("dataset", "value"),
    [
        ({"name": "cifar10"}, None),
        ({"name": "cifar100"}, None),
        ({"name": "imagefolder", "root": "/definitely/not/here"}, "/definitely/not/here"),
    ],
)
def test_missing_dataset_root(tmp_path: Path, dataset: dict, value) -> None:
    err, path = config_error(tmp_path, scenario_with(dataset=dataset))
    assert (err.file, err.field, err.value) == (str(path), "dataset.root", value)
    assert "root" in str(err)


def test_existing_dataset_root_passes_validation(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "0.png").write_bytes(b"")  # the check lists, never decodes
    data = scenario_with(dataset={"name": "imagefolder", "root": str(tmp_path / "imgs")})
    assert load_scenario(write(tmp_path, data)).dataset.root == str(tmp_path / "imgs")


def test_bad_literal_names_allowed_values(tmp_path: Path) -> None:
    data = scenario_with(attacks=[{"name": "fine_tune", "params": {"mode": "ftxx"}}])
    err, path = config_error(tmp_path, data)
    assert (err.file, err.field, err.value) == (str(path), "attacks[0].params.mode", "ftxx")
    for mode in ("ftll", "ftal", "rtll", "rtal"):
        assert mode in str(err)


def test_bad_literal_has_close_match(tmp_path: Path) -> None:
    """DESIGN §7: a bad value names a close match, Literal typos included."""
    data = scenario_with(attacks=[{"name": "quantize", "params": {"granularity": "per_chanel"}}])
    err, _ = config_error(tmp_path, data)
    assert err.field == "attacks[0].params.granularity"
    assert err.hint == "per_channel"
    assert "Did you mean 'per_channel'?" in str(err)


def test_bad_channels(tmp_path: Path) -> None:
    err, _ = config_error(tmp_path, scenario_with(dataset={"name": "digits", "channels": 2}))
    assert (err.field, err.value) == ("dataset.channels", 2)
    assert "1 or 3" in str(err)


@pytest.mark.parametrize("gpus", [1.5, 2.25])
def test_fractional_num_gpus_above_one(tmp_path: Path, gpus: float) -> None:
    err, path = config_error(tmp_path, scenario_with(resources={"train": {"num_gpus": gpus}}))
    assert (err.file, err.field, err.value) == (str(path), "resources.train.num_gpus", gpus)
    assert "whole number" in str(err)


@pytest.mark.parametrize("gpus", [0, 0.25, 1, 2])
def test_whole_or_fractional_below_one_num_gpus_ok(tmp_path: Path, gpus: float) -> None:
    data = scenario_with(resources={"attack": {"num_gpus": gpus}})
    scenario = load_scenario(write(tmp_path, data))
    assert scenario.resources.for_stage("attack").num_gpus == gpus


def test_missing_required_field(tmp_path: Path) -> None:
    data = scenario_with()
    del data["archs"]
    err, _ = config_error(tmp_path, data)
    assert err.field == "archs"
    assert "required" in str(err)


def test_empty_list_value_expands_to_nothing(tmp_path: Path) -> None:
    err, _ = config_error(
        tmp_path, scenario_with(attacks=[{"name": "prune", "params": {"sparsity": []}}])
    )
    assert err.field == "attacks[0].params.sparsity"


# --- grid expansion ----------------------------------------------------------------------------


def test_list_params_expand_to_cartesian_product(tmp_path: Path) -> None:
    attack = {"name": "fine_tune", "params": {"mode": ["ftll", "rtal"], "epochs": [1, 2, 3]}}
    cells = cells_of(tmp_path, attacks=[attack])
    points = {(c.attack_params["mode"], c.attack_params["epochs"]) for c in cells}
    assert points == {(m, e) for m in ("ftll", "rtal") for e in (1, 2, 3)}
    assert len(cells) == 6


def test_cell_count_is_product_of_axes(tmp_path: Path) -> None:
    cells = cells_of(
        tmp_path,
        seeds=[0, 1, 2],
        archs=["lenet", "resnet10t"],
        methods=["none", {"name": "trigger_set", "params": {"n_keys": [10, 20]}}],
        attacks=[
            "identity",
            {"name": "prune", "params": {"sparsity": [0.3, 0.6]}},
            {
                "name": "quantize",
                "params": {"bits": [8, 4], "granularity": ["per_channel", "per_tensor"]},
            },
        ],
    )
    assert len(cells) == 3 * 2 * (1 + 2) * (1 + 2 + 4)
    assert len({c.cell_id for c in cells}) == len(cells)


def test_smoke_scenario_cell_count() -> None:
    cells = expand_cells(load_scenario(SMOKE), str(SMOKE))
    # 2 archs x 1 seed x 2 methods x (identity + 2 fine_tune + 2 prune + 2 quantize + distill)
    assert len(cells) == 2 * 1 * 2 * 8
    assert {c.arch for c in cells} == {"resnet10t", "mobilenetv3_small_050"}


def test_defaults_are_filled_into_params(tmp_path: Path) -> None:
    cells = cells_of(
        tmp_path,
        methods=[{"name": "trigger_set", "params": {"n_keys": 5}}],
        attacks=["prune", {"name": "quantize", "params": {"bits": 4}}],
    )
    by_attack = {c.attack: c for c in cells}
    assert by_attack["prune"].attack_params == PRUNE_DEFAULTS
    assert by_attack["quantize"].attack_params == {"bits": 4, "granularity": "per_channel"}
    method_params = cells[0].method_params
    assert method_params["n_keys"] == 5
    assert method_params["pattern"] == "abstract"
    assert method_params["p_value"] == 0.05
    assert method_params["epochs"] is None
    assert cells[0].dataset["test_fraction"] == 0.2
    assert cells[0].train["optimizer"] == "sgd"


class ListParams(BaseModel):
    layers: list[int] = []
    rate: float = 0.1


def test_list_typed_param_expands_only_on_list_of_lists() -> None:
    assert expand_params({"layers": [1, 2]}, ListParams) == [{"layers": [1, 2]}]
    assert expand_params({"layers": [[1], [2, 3]], "rate": [0.1, 0.2]}, ListParams) == [
        {"layers": [1], "rate": 0.1},
        {"layers": [1], "rate": 0.2},
        {"layers": [2, 3], "rate": 0.1},
        {"layers": [2, 3], "rate": 0.2},
    ]
    assert expand_params({}, ListParams) == [{}]


# --- include: ----------------------------------------------------------------------------------


def test_include_merges_nested_mappings(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    write(
        tmp_path / "common",
        {
            "dataset": BASE["dataset"],
            "train": {"epochs": 3, "lr": 0.2},
            "archs": ["resnet10t"],
            "methods": ["none"],
        },
        "base.yaml",
    )
    top = {
        "include": ["common/base.yaml"],
        "name": "inc",
        "train": {"epochs": 1},
        "archs": ["lenet"],
        "attacks": ["identity"],
    }
    path = write(tmp_path, top)
    merged = load_yaml_with_includes(path)
    assert "include" not in merged
    assert merged["train"] == {"epochs": 1, "lr": 0.2}  # nested keys merge, the includer wins
    assert merged["archs"] == ["lenet"]  # lists are replaced, not concatenated
    scenario = load_scenario(path)
    assert (scenario.train.epochs, scenario.train.lr) == (1, 0.2)
    assert scenario.dataset.name == "synthetic"
    assert scenario.methods[0].name == "none"


def test_include_as_string_and_chained(tmp_path: Path) -> None:
    write(tmp_path, {"train": {"batch_size": 16, "lr": 0.3}}, "a.yaml")
    write(tmp_path, {"include": "a.yaml", "train": {"lr": 0.4}}, "b.yaml")
    path = write(tmp_path, scenario_with(include="b.yaml", train={"epochs": 2}))
    train = load_scenario(path).train
    assert (train.batch_size, train.lr, train.epochs) == (16, 0.4, 2)


def test_include_list_later_files_win(tmp_path: Path) -> None:
    write(tmp_path, {"seeds": [1], "description": "first"}, "a.yaml")
    write(tmp_path, {"seeds": [2, 3]}, "b.yaml")
    data = scenario_with(include=["a.yaml", "b.yaml"])
    del data["seeds"]
    scenario = load_scenario(write(tmp_path, data))
    assert scenario.seeds == [2, 3]
    assert scenario.description == "first"


def test_include_cycle_and_missing_include(tmp_path: Path) -> None:
    write(tmp_path, {"include": "b.yaml"}, "a.yaml")
    write(tmp_path, {"include": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="include cycle"):
        load_scenario(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found") as info:
        load_scenario(write(tmp_path, scenario_with(include="missing.yaml")))
    assert info.value.file == str(tmp_path / "missing.yaml")


@pytest.mark.parametrize("include", [5, ["base.yaml", 3]])
def test_include_of_wrong_type_is_a_config_error(tmp_path: Path, include) -> None:
    write(tmp_path, {"seeds": [1]}, "base.yaml")
    err, path = config_error(tmp_path, scenario_with(include=include))
    assert err.file == str(path)
    assert err.field is not None and err.field.startswith("include")


def _pair_scenario(tmp_path, **over):
    from harness.config import parse_scenario

    base = {
        "name": "x",
        "dataset": {"name": "photo_pairs", "image_size": 32},
        "archs": ["unet@8"],
        "methods": ["none"],
        "attacks": ["identity"],
    }
    return parse_scenario({**base, **over})


@pytest.mark.parametrize(
    ("over", "field", "value"),
    [
        ({"archs": ["resnet10t"]}, "archs[0]", "resnet10t"),  # a classifier on image pairs
        ({"archs": ["unet@x"]}, "archs[0]", "unet@x"),
        ({"methods": ["trigger_set"]}, "methods[0].name", "trigger_set"),
        ({"attacks": ["fine_tune"]}, "attacks[0].name", "fine_tune"),
    ],
)
def test_plugins_must_fit_the_tasks_data(tmp_path, over, field, value):
    from harness.grid import check_scenario

    with pytest.raises(ConfigError) as err:
        check_scenario(_pair_scenario(tmp_path, **over), "x.yaml")
    assert (err.value.field, err.value.value, err.value.exit_code) == (field, value, 2)
    assert err.value.allowed


def test_image_pair_scenario_with_task_agnostic_plugins_validates(tmp_path):
    from harness.grid import check_scenario

    check_scenario(_pair_scenario(tmp_path), "x.yaml")


TUNE_BASE = {
    **BASE,
    "methods": [{"name": "trigger_set", "params": {"n_keys": 10}}],
    "attacks": [{"name": "prune", "params": {"sparsity": 0.3}}],
}


@pytest.mark.parametrize(
    ("tune", "field"),
    [
        ({"method": "uchidaa", "space": {"x": {"low": 0, "high": 1}}}, "tune.method"),
        ({"attack": "fine_tune", "space": {"epochs": {"low": 1, "high": 3}}}, "tune.attack"),
        ({"method": "trigger_set", "space": {"n_keyz": {"low": 1, "high": 3}}},
         "tune.space.n_keyz"),
        ({"method": "trigger_set", "space": {"p_value": {"low": 0.2, "high": 0.1}}},
         "tune.space.p_value"),
        ({"method": "trigger_set", "space": {"p_value": {"low": 0.1, "high": 0.1}}},
         "tune.space.p_value"),
        ({"method": "trigger_set", "space": {"p_value": {"choices": []}}},
         "tune.space.p_value.choices"),
        ({"method": "trigger_set", "space": {"n_keys": {"low": -5, "high": 10, "type": "int"}}},
         "tune.space.n_keys"),
        ({"method": "trigger_set", "space": {"n_keys": {"low": 1, "high": 9}},
          "objective": "disc_rel"}, "tune.objective"),
        ({"method": "trigger_set", "space": {"n_keys": {"low": 1, "high": 9}},
          "constraints": {"ssim_min": ">= 0.9"}}, "tune.constraints.ssim_min"),
        ({"method": "trigger_set", "space": {"n_keys": {"low": 1, "high": 9}},
          "constraints": {"task_drop": "about 0.05"}}, "tune.constraints.task_drop"),
        ({"method": "trigger_set", "attack": "prune", "space": {"n_keys": {"low": 1, "high": 9}}},
         "tune"),
        ({"space": {"n_keys": {"low": 1, "high": 9}}}, "tune"),
    ],
)
def test_bad_tune_sections_exit_2_with_the_field(tmp_path, tune, field):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**TUNE_BASE, "tune": tune}))
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert err.value.exit_code == 2 and err.value.field == field, str(err.value)
    assert str(path) in str(err.value)


CHOICE_BASE = {
    **TUNE_BASE,
    "attacks": [
        {"name": "prune", "params": {"sparsity": 0.3}},
        {"name": "stack", "params": {"attacks": [{"name": "prune", "params": {"sparsity": 0.6}},
                                                 {"name": "fine_tune"}]}},
    ],
}
CHOICE = {"attack": ["prune", "stack"], "objective": "wm_score", "direction": "minimize"}


@pytest.mark.parametrize(
    ("space", "field", "allowed"),
    [
        # with a choice of attacks, every key names its attack
        ({"sparsity": {"low": 0.1, "high": 0.9}}, "tune.space.sparsity", "prune.<parameter>"),
        ({"prune.sparsty": {"low": 0.1, "high": 0.9}}, "tune.space.prune.sparsty", "sparsity"),
        # a path into the stack's steps: an index it lacks, a key a step lacks
        ({"stack.attacks[2].params.sparsity": {"low": 0.1, "high": 0.9}},
         "tune.space.stack.attacks[2].params.sparsity", "[1]"),
        ({"stack.attacks[0].parms.sparsity": {"low": 0.1, "high": 0.9}},
         "tune.space.stack.attacks[0].parms.sparsity", "params"),
        # a step's parameter it lacks, or a value the step refuses
        ({"stack.attacks[0].params.sparsty": {"low": 0.1, "high": 0.9}},
         "tune.space.stack.attacks[0].params.sparsty", None),
        ({"stack.attacks[0].params.sparsity": {"low": 0.1, "high": 1.5}},
         "tune.space.stack.attacks[0].params.sparsity", None),
        ({"stack.attacks[x]": {"low": 0.1, "high": 0.9}}, "tune.space.stack.attacks[x]", None),
    ],
)
def test_a_choice_of_attacks_and_nested_paths_are_checked(tmp_path, space, field, allowed):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**CHOICE_BASE, "tune": {**CHOICE, "space": space}}))
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert err.value.exit_code == 2 and err.value.field == field, str(err.value)
    if allowed is not None:
        assert allowed in err.value.allowed, str(err.value)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"attack": ["prune", "jpeg"]}, "tune.attack[1]"),  # not one of the scenario's
        ({"attack": []}, "tune"),
        ({"attack": ["prune", "prune"]}, "tune"),
        ({"attack": None, "method": "trigger_set", "per": ["attack"],
          "space": {"n_keys": {"low": 5, "high": 9, "type": "int"}}}, "tune"),
    ],
)
def test_bad_attack_choices_exit_2(tmp_path, over, field):
    tune = {k: v for k, v in {**CHOICE, "space": {"prune.sparsity": {"low": 0.1, "high": 0.9}},
                              **over}.items() if v is not None}  # fmt: skip
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**CHOICE_BASE, "tune": tune}))
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert err.value.exit_code == 2 and err.value.field == field, str(err.value)


def test_a_trial_chooses_an_attack_and_sets_a_stacked_steps_parameter(tmp_path):
    """Each trial draws the attack, then that attack's space (a path into `stack`'s steps);
    the first trials measure each candidate as the scenario sets it; `per: [attack]` makes
    one study per attack instead."""
    import optuna

    from harness import tuning

    space = {"prune.sparsity": {"low": 0.1, "high": 0.9},
             "stack.attacks[0].params.sparsity": {"low": 0.1, "high": 0.9},
             "stack.attacks[1].params.epochs": {"low": 1, "high": 4, "type": "int"}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**CHOICE_BASE, "tune": {**CHOICE, "space": space}}))
    scenario = load_scenario(path)
    assert tuning.baselines(scenario) == [
        {"attack": "prune", "prune.sparsity": 0.3},
        # fine_tune's default epochs (2) is the step's untuned value
        {"attack": "stack", "stack.attacks[0].params.sparsity": 0.6,
         "stack.attacks[1].params.epochs": 2},
    ]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for params in tuning.baselines(scenario):
        study.enqueue_trial(params)
    seen = set()
    for _ in range(8):
        trial = study.ask()
        trial_sc, drawn = tuning.trial_scenario(scenario, trial)
        (attack,) = trial_sc.attacks  # the other candidate leaves the trial's grid
        assert attack.name == drawn["attack"]
        seen.add(attack.name)
        if attack.name == "stack":
            first, second = attack.params["attacks"]
            assert first["params"]["sparsity"] == drawn["stack.attacks[0].params.sparsity"]
            assert second == {"name": "fine_tune",
                              "params": {"epochs": drawn["stack.attacks[1].params.epochs"]}}
        else:
            assert attack.params == {"sparsity": drawn["prune.sparsity"]}
        study.tell(trial, 0.5)
    assert seen == {"prune", "stack"}
    best = tuning.write_best(study, scenario, tmp_path / "best.yaml")
    assert best["attacks"][0]["name"] in {"prune", "stack"}

    per_attack = scenario.tune.model_copy(update={"per": ["attack"]})
    split = scenario.model_copy(update={"tune": per_attack})
    parts = tuning.studies(split)
    assert [p.name for p in parts] == [f"{scenario.name}.prune", f"{scenario.name}.stack"]
    assert [[a.name for a in p.attacks] for p in parts] == [["prune"], ["stack"]]
    assert list(parts[1].tune.space) == ["attacks[0].params.sparsity", "attacks[1].params.epochs"]


def test_a_tune_section_may_name_any_plugin_and_declared_figure(tmp_path):
    tune = {
        "attack": "prune",
        "space": {"sparsity": {"low": 0.1, "high": 0.9}, "method": {"choices": ["l1", "random"]}},
        "objective": "wm_removed",
        "constraints": {"task_drop": "<= 0.05"},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**TUNE_BASE, "tune": tune}))
    scenario = load_scenario(path)
    assert scenario.tune.kind == "attack" and scenario.tune.bounds() == {"task_drop": ("<=", 0.05)}


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("train: {lr: .inf}\n", "train.lr", "finite"),
        ("train: {momentum: .nan}\n", "train.momentum", "finite"),
        ("attacks: [{name: fine_tune, params: {lr: .inf}}]\n", "attacks[0].params.lr", "finite"),
        ("methods: [{name: trigger_set, params: {p_value: .nan}}]\n",
         "methods[0].params.p_value", ""),
        ("seeds: [-1]\n", "seeds[0]", "greater than or equal to 0"),
        ("seeds: [4294967296]\n", "seeds[0]", "less than or equal to"),
        ("dataset: {name: synthetic, split_seed: 99999999999}\n", "dataset.split_seed", "less"),
        ("name: '..'\n", "name", "dots only"),
        ("name: '.'\n", "name", "dots only"),
    ],
)  # fmt: skip
def test_values_no_task_could_use_exit_2_with_their_field(tmp_path, text, field, message):
    base = {k: v for k, v in BASE.items() if k not in yaml.safe_load(text)}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base) + text)
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert err.value.exit_code == 2 and err.value.field == field, str(err.value)
    assert message in str(err.value)


def test_a_repeated_yaml_key_is_an_error_not_last_wins(tmp_path):
    path = tmp_path / "s.yaml"
    base = {k: v for k, v in BASE.items() if k != "train"}
    path.write_text(yaml.safe_dump(base) + "train: {epochs: 1, lr: 0.1, lr: 0.01}\n")
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert err.value.exit_code == 2 and "duplicate key 'lr'" in str(err.value)
    assert str(path) in str(err.value) and "line" in str(err.value)


# --- reported figures (compared by `harness report`) ---------------------------------------


def test_reported_figures_parse_and_free_text_stays_valid(tmp_path: Path) -> None:
    figure = {"metric": "wm_score", "value": 0.93, "op": ">=", "where": {"attack": "identity"},
              "setting": "CIFAR-10", "source": "paper"}  # fmt: skip
    scenario = load_scenario(write(tmp_path, scenario_with(reported=[figure])))
    (got,) = scenario.reported
    assert (got.metric, got.value, got.op, got.where) == ("wm_score", 0.93, ">=", figure["where"])
    notes = load_scenario(write(tmp_path, scenario_with(reported={"paper": "free text"})))
    assert notes.reported == {"paper": "free text"}


@pytest.mark.parametrize(
    "figure, field, needle",
    [
        ({"metric": "wm_score", "value": 0.9, "op": ">"}, "reported[0].op",
         ">="),
        ({"metric": "wm_score", "value": 0.9, "where": {"seed": 0}},
         "reported[0].where", "attack_role"),
        ({"metric": "wm_score", "value": 0.9, "where": {"method_params": "x"}},
         "reported[0].where", "a mapping of parameters"),
        ({"metric": "wm_score", "value": float("inf")},
         "reported[0].value", "finite"),
    ],
)  # fmt: skip
def test_bad_reported_figure_names_field_and_allowed(tmp_path: Path, figure, field, needle) -> None:
    err, path = config_error(tmp_path, scenario_with(reported=[figure]))
    assert err.file == str(path)
    assert err.field == field
    assert needle in str(err), str(err)
