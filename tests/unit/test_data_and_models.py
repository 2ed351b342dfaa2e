"""Data sets (real digits, synthetic), disjoint seeded splits, and model_zoo.create_model."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import torch
from sklearn.datasets import load_digits as sk_digits

from harness import data
from harness.config import DatasetCfg
from harness.errors import UnknownNameError
from model_zoo import LeNet, ModelSpec, check_arch, create_model, list_archs

pytestmark = pytest.mark.usefixtures("offline")


def fingerprints(split: data.Split) -> Counter:
    """A multiset of (image bytes, label) hashes: equal multisets mean the same examples."""
    return Counter(
        hashlib.sha1(x.numpy().tobytes() + bytes([int(y)])).hexdigest()
        for x, y in zip(split.x, split.y, strict=True)
    )


def all_examples(splits: data.Splits) -> list[data.Split]:
    return [splits.owner, splits.attacker, splits.test]


# --- digits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "channels"), [(32, 1), (32, 3), (16, 1), (48, 3)])
def test_digits_shapes_and_dtype(size: int, channels: int) -> None:
    cfg = DatasetCfg(name="digits", image_size=size, channels=channels)
    raw = data.load_digits(cfg)
    assert raw.x.shape == (1797, channels, size, size)
    assert raw.x.dtype == torch.uint8 and raw.y.dtype == torch.int64
    assert raw.num_classes == 10
    assert sorted(raw.y.unique().tolist()) == list(range(10))
    if channels == 3:
        assert torch.equal(raw.x[:, 0], raw.x[:, 1]) and torch.equal(raw.x[:, 1], raw.x[:, 2])
    splits = data.load_splits(cfg)
    assert sum(len(s) for s in all_examples(splits)) == 1797
    for s in all_examples(splits):
        assert s.x.shape[1:] == (channels, size, size) and s.x.dtype == torch.uint8
    assert (splits.num_classes, splits.channels, splits.image_size) == (10, channels, size)


def test_digits_are_the_real_scikit_learn_images() -> None:
    raw = data.load_digits(DatasetCfg(name="digits", image_size=8, channels=1))
    bunch = sk_digits()
    expected = torch.from_numpy(bunch.images / 16.0 * 255).round().to(torch.uint8)
    assert torch.equal(raw.x[:, 0], expected)
    assert torch.equal(raw.y, torch.from_numpy(bunch.target).long())


def test_splits_partition_the_pool_with_wrt_proportions() -> None:
    cfg = DatasetCfg(name="digits", image_size=16, channels=1)
    raw = data.load_digits(cfg)
    splits = data.split(raw, cfg)
    # Together the splits hold exactly the pool's examples, each once: they are disjoint.
    union = fingerprints(splits.owner) + fingerprints(splits.attacker) + fingerprints(splits.test)
    assert union == fingerprints(data.Split(raw.x, raw.y))
    assert len(splits.test) == round(1797 * cfg.test_fraction)
    pool = len(splits.owner) + len(splits.attacker)
    assert len(splits.owner) / pool == pytest.approx(2 / 3, abs=0.01)
    for s in all_examples(splits):
        assert sorted(s.y.unique().tolist()) == list(range(10))


def test_splits_are_disjoint_on_unique_examples() -> None:
    cfg = DatasetCfg(name="synthetic", image_size=12, channels=1, samples=300, num_classes=5)
    splits = data.split(data.load_synthetic(cfg), cfg)
    sets = [set(fingerprints(s)) for s in all_examples(splits)]
    assert sum(map(len, sets)) == 300  # synthetic noise makes every example unique
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_splits_are_seeded() -> None:
    cfg = DatasetCfg(name="digits", image_size=8, channels=1)
    raw = data.load_digits(cfg)
    a, b = data.split(raw, cfg), data.split(raw, cfg)
    other = data.split(raw, cfg.model_copy(update={"split_seed": 1}))
    for sa, sb in zip(all_examples(a), all_examples(b), strict=True):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    assert fingerprints(other.test) != fingerprints(a.test)
    assert fingerprints(other.owner) != fingerprints(a.owner)
    assert len(other.owner) == len(a.owner)


def test_own_test_split_is_kept_and_pool_is_split() -> None:
    cfg = DatasetCfg(name="synthetic", image_size=8, channels=1, samples=90, num_classes=3)
    pool = data.load_synthetic(cfg)
    test_x, test_y = pool.x[:10].clone(), pool.y[:10].clone()
    raw = data.RawData(pool.x[10:], pool.y[10:], 3, test_x, test_y)
    splits = data.split(raw, cfg)
    assert torch.equal(splits.test.x, test_x) and torch.equal(splits.test.y, test_y)
    assert len(splits.owner) + len(splits.attacker) == 80
    assert fingerprints(splits.owner) + fingerprints(splits.attacker) == fingerprints(
        data.Split(raw.x, raw.y)
    )


def test_load_splits_is_cached_per_config() -> None:
    cfg = DatasetCfg(name="synthetic", image_size=8, channels=1, samples=50)
    assert data.load_splits(cfg) is data.load_splits(DatasetCfg(**cfg.model_dump()))


def test_split_take_is_a_seeded_subset() -> None:
    cfg = DatasetCfg(name="synthetic", image_size=8, channels=1, samples=100)
    owner = data.load_splits(cfg).owner
    a, b, c = owner.take(10, seed=3), owner.take(10, seed=3), owner.take(10, seed=4)
    assert len(a) == 10 and torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert set(fingerprints(a)) <= set(fingerprints(owner))
    assert owner.take(None) is owner and owner.take(10_000) is owner


# --- synthetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "channels", "classes"), [(16, 1, 10), (20, 3, 4), (64, 3, 2)])
def test_synthetic(size: int, channels: int, classes: int) -> None:
    cfg = DatasetCfg(
        name="synthetic", image_size=size, channels=channels, samples=120, num_classes=classes
    )
    raw = data.load_synthetic(cfg)
    assert raw.x.shape == (120, channels, size, size) and raw.x.dtype == torch.uint8
    assert raw.num_classes == classes
    assert sorted(raw.y.unique().tolist()) == list(range(classes))
    again = data.load_synthetic(cfg)
    assert torch.equal(raw.x, again.x) and torch.equal(raw.y, again.y)
    splits = data.load_splits(cfg)
    assert sum(len(s) for s in all_examples(splits)) == 120
    assert splits.num_classes == classes


def test_synthetic_classes_are_separable_by_their_means() -> None:
    """Class prototypes differ, so the data set is learnable in a few steps."""
    cfg = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=200, num_classes=4)
    raw = data.load_synthetic(cfg)
    x = raw.x.float().flatten(1)
    means = torch.stack([x[raw.y == k].mean(0) for k in range(4)])
    nearest = torch.cdist(x, means).argmin(1)
    assert (nearest == raw.y).float().mean() > 0.9


# --- model_zoo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "channels", "size"),
    [
        ("resnet10t", 1, 32),
        ("resnet10t", 3, 24),
        ("test_vit", 3, 32),
        ("test_vit", 1, 48),
        ("lenet", 1, 32),
        ("lenet", 3, 32),
        ("lenet", 1, 8),
    ],
)
def test_create_model_gives_logits(arch: str, channels: int, size: int) -> None:
    model = create_model(ModelSpec(arch, 7, channels, size)).eval()
    with torch.no_grad():
        out = model(torch.rand(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_fixed_input_size_model_gets_img_size() -> None:
    model = create_model(ModelSpec("test_vit", 5, 1, 48))
    assert tuple(model.patch_embed.img_size) == (48, 48)
    assert model.patch_embed.proj.in_channels == 1


def test_lenet_is_the_own_network() -> None:
    model = create_model(ModelSpec("lenet", 4, 3, 32))
    assert isinstance(model, LeNet)
    assert model.get_classifier().out_features == 4
    model.reset_classifier(6)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 6)


def test_models_are_freshly_initialised_and_seedable() -> None:
    spec = ModelSpec("lenet", 3, 1, 16)
    torch.manual_seed(0)
    a = create_model(spec).state_dict()
    torch.manual_seed(0)
    b = create_model(spec).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_arch_names() -> None:
    archs = list_archs()
    assert archs == sorted(archs)
    assert {"lenet", "resnet10t", "test_vit"} <= set(archs)
    check_arch("lenet")
    with pytest.raises(UnknownNameError) as info:
        create_model(ModelSpec("lenett", 3, 1, 16))
    assert info.value.hint == "lenet"


def test_model_spec_round_trip() -> None:
    spec = ModelSpec("lenet", 10, 1, 32)
    assert ModelSpec(**spec.to_dict()) == spec
    assert spec.replace(arch="resnet10t") == ModelSpec("resnet10t", 10, 1, 32)
