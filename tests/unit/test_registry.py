"""Registry[T]: register / get / list / contains, refusals, and the project's registries."""

from __future__ import annotations

import pytest

from harness.attacks import ATTACKS, Attack
from harness.data import DATASETS
from harness.errors import ConfigError, UnknownNameError
from harness.methods import METHODS, Method
from harness.registry import Registry, close_match


class Base:
    pass


@pytest.fixture
def registry() -> Registry[type[Base]]:
    return Registry("widget", Base)


def test_register_get_list_contains(registry: Registry) -> None:
    @registry.register("beta")
    class Beta(Base):
        pass

    @registry.register("alpha")
    class Alpha(Base):
        pass

    assert registry.get("alpha") is Alpha
    assert registry.get("beta") is Beta
    assert registry.list() == ["alpha", "beta"]
    assert "alpha" in registry
    assert "gamma" not in registry
    assert Alpha.name == "alpha"


def test_decorator_returns_the_object_unchanged(registry: Registry) -> None:
    class Plain(Base):
        pass

    assert registry.register("plain")(Plain) is Plain


def test_registry_without_base_accepts_functions() -> None:
    loaders: Registry = Registry("loader")

    @loaders.register("f")
    def f() -> int:
        return 1

    assert loaders.get("f")() == 1


def test_duplicate_registration_raises(registry: Registry) -> None:
    registry.register("same")(type("A", (Base,), {}))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("same")(type("B", (Base,), {}))
    assert registry.list() == ["same"]


@pytest.mark.parametrize("obj", [type("NotBase", (), {}), lambda: None, 3])
def test_non_subclass_raises(registry: Registry, obj: object) -> None:
    with pytest.raises(TypeError, match="must subclass Base"):
        registry.register("bad")(obj)
    assert "bad" not in registry


def test_unknown_name_has_hint_and_available_names(registry: Registry) -> None:
    for name in ("trigger_set", "none"):
        registry.register(name)(type(name, (Base,), {}))
    with pytest.raises(UnknownNameError) as info:
        registry.get("trigger_sett")
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.value == "trigger_sett"
    assert err.hint == "trigger_set"
    assert err.allowed == ["none", "trigger_set"]
    text = str(err)
    assert "unknown widget" in text
    assert "Did you mean 'trigger_set'?" in text
    assert "Allowed: none, trigger_set." in text


def test_unknown_name_without_close_match_has_no_hint(registry: Registry) -> None:
    registry.register("alpha")(type("A", (Base,), {}))
    with pytest.raises(UnknownNameError) as info:
        registry.get("zzzzzz")
    assert info.value.hint is None
    assert "Did you mean" not in str(info.value)
    assert "Allowed: alpha." in str(info.value)


def test_close_match() -> None:
    assert close_match("resnet10", ["resnet10t", "vit_tiny"]) == "resnet10t"
    assert close_match("qqq", ["resnet10t", "vit_tiny"]) is None


def test_project_registries_list_what_is_registered() -> None:
    # plug-ins are added as files: the lists hold at least these, sorted
    assert METHODS.list() == sorted(METHODS.list())
    assert set(METHODS.list()) >= {
        "discriminative",
        "none",
        "output_watermark",
        "steg_passport",
        "trigger_set",
    }
    assert set(ATTACKS.list()) >= {
        "distill",
        "erb_ambiguity",
        "fine_tune",
        "forged_key",
        "forged_user_passport",
        "identity",
        "prune",
        "quantize",
        "random_passport",
        "surrogate",
    }
    assert DATASETS.list() == [
        "cifar10",
        "cifar100",
        "digits",
        "imagefolder",
        "pairs_folder",
        "photo_pairs",
        "synthetic",
    ]


def test_plugins_subclass_their_base_and_carry_their_name() -> None:
    for registry, base in ((METHODS, Method), (ATTACKS, Attack)):
        for name in registry.list():
            cls = registry.get(name)
            assert issubclass(cls, base)
            assert cls.name == name
