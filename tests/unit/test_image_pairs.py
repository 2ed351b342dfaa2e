"""Image-to-image pair data sets: photo_pairs (real offline photos + a degradation) and
pairs_folder (side-by-side A|B files). x = domain A (degraded input), y = domain B (clean)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from harness import data
from harness.config import DatasetCfg
from harness.errors import ConfigError

DEGRADATIONS = ("noise", "rain", "blur")


pytestmark = pytest.mark.usefixtures("offline")


def photo_cfg(**kw) -> DatasetCfg:
    return DatasetCfg(**{"name": "photo_pairs", "image_size": 32, "samples": 42, **kw})


def load(cfg: DatasetCfg) -> data.RawData:
    return data.DATASETS.get(cfg.name)(cfg)


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def pair_fingerprints(split: data.Split) -> Counter:
    """A multiset of (A, B) hashes: equal multisets mean the same pairs."""
    return Counter(
        hashlib.sha1(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()
        for a, b in zip(split.x, split.y, strict=True)
    )


def high_frequency_energy(x: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels: what a blur removes."""
    x = as_float(x)
    return float((x.diff(dim=-1) ** 2).mean() + (x.diff(dim=-2) ** 2).mean())


# --- photo_pairs -------------------------------------------------------------------------------


def test_offline_photos_are_the_shipped_ones() -> None:
    sources = dict(data.photo_sources())
    assert {"astronaut", "camera", "coffee", "chelsea", "brick", "china", "flower"} <= set(sources)
    assert "cat" not in sources  # the same photograph as chelsea
    assert len(sources) >= 15
    for image in sources.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 3


@pytest.mark.parametrize("degradation", DEGRADATIONS)
@pytest.mark.parametrize(("size", "channels"), [(32, 1), (32, 3), (64, 1), (64, 3)])
def test_photo_pairs_shapes_and_dtype(size: int, channels: int, degradation: str) -> None:
    cfg = photo_cfg(image_size=size, channels=channels, samples=24, degradation=degradation)
    raw = load(cfg)
    assert raw.num_classes == 0 and raw.test_x is None
    for images in (raw.x, raw.y):
        assert images.shape == (24, channels, size, size) and images.dtype == torch.uint8


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_pairs_are_aligned(degradation: str) -> None:
    """A is a degraded B: far closer to its own B than to another pair's B."""
    raw = load(photo_cfg(degradation=degradation))
    a, b = as_float(raw.x), as_float(raw.y)
    own = (a - b).abs().mean()
    shuffled = (a - b.roll(1, dims=0)).abs().mean()
    assert 0 < own < 0.5 * shuffled


def test_noise_is_small_zero_mean_gaussian() -> None:
    raw = load(photo_cfg(degradation="noise"))
    a, b = as_float(raw.x), as_float(raw.y)
    assert 0.02 < (a - b).abs().mean() < 0.1
    unclipped = (b > 0.35) & (b < 0.65)  # 3 sigma from 0 and 1: clipping does not bias these
    residual = (a - b)[unclipped]
    assert abs(residual.mean()) < 0.01
    assert residual.std() == pytest.approx(data.NOISE_SIGMA, abs=0.01)


@pytest.mark.parametrize("size", [32, 64])
def test_blur_removes_high_frequencies(size: int) -> None:
    raw = load(photo_cfg(degradation="blur", image_size=size))
    assert high_frequency_energy(raw.x) < 0.5 * high_frequency_energy(raw.y)


def test_rain_adds_sparse_bright_streaks() -> None:
    raw = load(photo_cfg(degradation="rain"))
    diff = raw.x.int() - raw.y.int()
    assert diff.min() >= -1  # screen blend only brightens (up to rounding)
    assert 0.01 < (diff > 25).float().mean() < 0.25  # thin streaks, not a veil
    # On black every image shows its streaks (on a white patch rain is invisible).
    streaks = data.degrade(torch.zeros(20, 1, 32, 32), "rain", seed=0)
    lit = (streaks > 0.2).float().mean(dim=(1, 2, 3))
    assert (lit > 0.01).all() and (lit < 0.25).all()
    assert streaks.max() <= 0.8 + 1e-6  # streak opacity is at most 0.8


def test_photo_pairs_are_seeded() -> None:
    a, b = load(photo_cfg()), load(photo_cfg())
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = load(photo_cfg(split_seed=1))
    assert not torch.equal(a.x, other.x) and not torch.equal(a.y, other.y)


def test_degradation_changes_a_only() -> None:
    """The clean targets depend on the seed alone, so degradations compare on the same B."""
    raws = {d: load(photo_cfg(degradation=d)) for d in DEGRADATIONS}
    assert torch.equal(raws["noise"].y, raws["rain"].y) and torch.equal(
        raws["rain"].y, raws["blur"].y
    )
    assert not torch.equal(raws["noise"].x, raws["rain"].x)
    assert not torch.equal(raws["rain"].x, raws["blur"].x)


def test_splits_are_disjoint_and_keep_pairs_together() -> None:
    cfg = photo_cfg(samples=60)
    raw = load(cfg)
    splits = data.split(raw, cfg)
    parts = [splits.owner, splits.attacker, splits.test]
    assert pair_fingerprints(data.Split(raw.x, raw.y)) == sum(
        map(pair_fingerprints, parts), Counter()
    )
    sets = [set(pair_fingerprints(s)) for s in parts]
    assert sum(map(len, sets)) == 60  # noise makes every pair unique
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert (len(splits.test), len(splits.attacker), len(splits.owner)) == (12, 16, 32)
    assert splits.num_classes == 0 and splits.owner.y.shape[1:] == (3, 32, 32)
    assert data.load_splits(cfg).test.x.shape == (12, 3, 32, 32)


def test_patches_are_spread_over_all_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one flat colour per fake photo, each patch's colour names its source."""
    fakes = tuple((f"p{k}", np.full((3, 50 + 7 * k, 80), 10 * k, np.uint8)) for k in range(6))
    monkeypatch.setattr(data, "photo_sources", lambda: fakes)
    patches = data.photo_patches(30, 32, seed=0)
    sources = Counter(round(float(p.mean()) * 255 / 10) for p in patches)
    assert sources == Counter({k: 5 for k in range(6)})


def test_real_patches_come_from_several_photos() -> None:
    """Grey photos (camera, moon, ...) give R == G == B patches, colour photos do not."""
    y = load(photo_cfg(samples=42)).y
    grey = sum(bool(torch.equal(p[0], p[1]) and torch.equal(p[1], p[2])) for p in y)
    assert 10 <= grey <= 32
    assert len({tuple(p.float().mean((1, 2)).round().tolist()) for p in y}) > 30


def test_degradation_field() -> None:
    assert DatasetCfg().degradation == "noise"
    assert DatasetCfg(degradation="rain").degradation == "rain"
    with pytest.raises(ValidationError):
        DatasetCfg(degradation="snow")


# --- pairs_folder ------------------------------------------------------------------------------


def write_pairs(folder: Path, n: int, height: int, half: int, seed: int = 0):
    """n side-by-side [A | B] PNGs; returns the A and B halves as uint8 (n, 3, H, W)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, height, half, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (n, height, half, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(np.concatenate([a[i], b[i]], axis=1)).save(folder / f"{i:03d}.png")
    return (torch.from_numpy(t).permute(0, 3, 1, 2) for t in (a, b))


def folder_cfg(root: Path, **kw) -> DatasetCfg:
    return DatasetCfg(**{"name": "pairs_folder", "root": str(root), "image_size": 32, **kw})


def test_pairs_folder_round_trip(tmp_path: Path) -> None:
    a, b = write_pairs(tmp_path, 12, 32, 32)
    (tmp_path / "notes.txt").write_text("not an image")
    raw = load(folder_cfg(tmp_path))
    assert raw.num_classes == 0 and raw.x.dtype == raw.y.dtype == torch.uint8
    assert torch.equal(raw.x, a) and torch.equal(raw.y, b)
    cfg = folder_cfg(tmp_path, test_fraction=0.25)
    splits = data.split(raw, cfg)
    parts = [splits.owner, splits.attacker, splits.test]
    assert sum(map(pair_fingerprints, parts), Counter()) == pair_fingerprints(data.Split(a, b))


@pytest.mark.parametrize(("size", "channels"), [(32, 1), (64, 3)])
def test_pairs_folder_resizes_and_sets_channels(tmp_path: Path, size: int, channels: int) -> None:
    write_pairs(tmp_path, 3, 20, 24)
    raw = load(folder_cfg(tmp_path, image_size=size, channels=channels))
    assert raw.x.shape == raw.y.shape == (3, channels, size, size)


def test_pairs_folder_train_val_layout(tmp_path: Path) -> None:
    a, b = write_pairs(tmp_path / "train", 6, 32, 32)
    ta, tb = write_pairs(tmp_path / "val", 2, 32, 32, seed=1)
    raw = load(folder_cfg(tmp_path))
    assert torch.equal(raw.x, a) and torch.equal(raw.y, b)
    assert torch.equal(raw.test_x, ta) and torch.equal(raw.test_y, tb)


def test_pairs_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        data.check_dataset(DatasetCfg(name="pairs_folder"))
    assert info.value.field == "dataset.root"
    missing = folder_cfg(tmp_path / "nowhere")
    for attempt in (data.check_dataset, load):
        with pytest.raises(ConfigError, match="does not exist") as info:
            attempt(missing)
        assert info.value.value == str(tmp_path / "nowhere")
    data.check_dataset(photo_cfg())  # photo_pairs needs no root


def test_pairs_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no images") as info:
        load(folder_cfg(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_pairs_folder_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot read") as info:
        load(folder_cfg(tmp_path))
    assert "broken.png" in str(info.value)
