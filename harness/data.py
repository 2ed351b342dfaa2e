"""Datasets as in-memory uint8 tensors with disjoint, seeded owner / attacker / test splits.

Everything is materialised once per process (small data sets dominate this harness's use)
and converted to float per batch, which keeps the training loop free of DataLoader overhead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.registry import Registry


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int | None, seed: int = 0) -> Split:
        """A seeded random subset of at most n examples."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Splits:
    owner: Split
    attacker: Split
    test: Split
    num_classes: int
    channels: int
    image_size: int


@dataclass(frozen=True)
class RawData:
    """A loader's output: a pool to split, and optionally the data set's own test split."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None


DATASETS: Registry = Registry("dataset")


def _to_uint8(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Float images in [0, 1], (N, C, H, W): resize, set channel count, quantise to 8 bits."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        images = (
            images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, channels, -1, -1)
        )
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@DATASETS.register("digits")
def load_digits(cfg) -> RawData:
    """The 1,797 real 8x8 handwritten digits shipped inside scikit-learn."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return RawData(
        _to_uint8(x, cfg.image_size, cfg.channels), torch.from_numpy(bunch.target).long(), 10
    )


@DATASETS.register("synthetic")
def load_synthetic(cfg) -> RawData:
    """Seeded class prototypes plus noise: learnable in a few steps, for unit tests."""
    g = torch.Generator().manual_seed(cfg.split_seed + 12345)
    low = max(2, cfg.image_size // 4)
    protos = torch.rand(cfg.num_classes, cfg.channels, low, low, generator=g)
    protos = F.interpolate(protos, size=(cfg.image_size,) * 2, mode="nearest")
    y = torch.arange(cfg.samples) % cfg.num_classes
    x = protos[y] + 0.15 * torch.randn(
        cfg.samples, cfg.channels, cfg.image_size, cfg.image_size, generator=g
    )
    return RawData(_to_uint8(x, cfg.image_size, cfg.channels), y.long(), cfg.num_classes)


def _require_root(cfg) -> Path:
    if cfg.root is None:
        raise ConfigError(
            f"dataset {cfg.name!r} needs a root folder", field="dataset.root", value=None
        )
    root = Path(cfg.root).expanduser()
    if not root.exists() and not cfg.download:
        raise ConfigError(
            "dataset root does not exist (set dataset.download: true to fetch it there)",
            field="dataset.root",
            value=str(root),
        )
    return root


def _torchvision_pair(cls, cfg) -> RawData:
    root = _require_root(cfg)
    train, test = (cls(str(root), train=t, download=cfg.download) for t in (True, False))

    def tensors(ds):
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
        return _to_uint8(x, cfg.image_size, cfg.channels), torch.tensor(ds.targets).long()

    (x, y), (tx, ty) = tensors(train), tensors(test)
    return RawData(x, y, len(train.classes), tx, ty)


@DATASETS.register("cifar10")
def load_cifar10(cfg) -> RawData:
    from torchvision.datasets import CIFAR10

    return _torchvision_pair(CIFAR10, cfg)


@DATASETS.register("cifar100")
def load_cifar100(cfg) -> RawData:
    from torchvision.datasets import CIFAR100

    return _torchvision_pair(CIFAR100, cfg)


@DATASETS.register("imagefolder")
def load_imagefolder(cfg) -> RawData:
    """A torchvision ImageFolder (root/class/*.jpg); `root/train` and `root/val` if both exist."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = _require_root(cfg)
    tf = transforms.Compose(
        [transforms.Resize((cfg.image_size, cfg.image_size)), transforms.PILToTensor()]
    )

    def tensors(path):
        ds = ImageFolder(str(path), transform=tf)
        xs, ys = zip(*[ds[i] for i in range(len(ds))], strict=True)
        x = torch.stack(xs).float() / 255.0
        return _to_uint8(x, cfg.image_size, cfg.channels), torch.tensor(ys).long(), len(ds.classes)

    if (root / "train").is_dir() and (root / "val").is_dir():
        (x, y, n), (tx, ty, _) = tensors(root / "train"), tensors(root / "val")
        return RawData(x, y, n, tx, ty)
    x, y, n = tensors(root)
    return RawData(x, y, n)


def check_dataset(cfg) -> None:
    """Fail early (before any task) on an unknown name or a missing root."""
    DATASETS.get(cfg.name)
    if cfg.name in ("cifar10", "cifar100", "imagefolder"):
        _require_root(cfg)


def split(raw: RawData, cfg) -> Splits:
    """Disjoint seeded splits; WRT's convention: 2/3 of the training pool to the owner."""
    perm = torch.randperm(len(raw.y), generator=torch.Generator().manual_seed(cfg.split_seed))
    x, y = raw.x[perm], raw.y[perm]
    if raw.test_x is None:
        n_test = int(round(len(y) * cfg.test_fraction))
        test, x, y = Split(x[:n_test], y[:n_test]), x[n_test:], y[n_test:]
    else:
        test = Split(raw.test_x, raw.test_y)
    n_att = int(round(len(y) * cfg.attacker_fraction))
    return Splits(
        owner=Split(x[n_att:], y[n_att:]),
        attacker=Split(x[:n_att], y[:n_att]),
        test=test,
        num_classes=raw.num_classes,
        channels=cfg.channels,
        image_size=cfg.image_size,
    )


@functools.lru_cache(maxsize=4)
def _load_cached(cfg_json: str) -> Splits:
    from harness.config import DatasetCfg

    cfg = DatasetCfg.model_validate_json(cfg_json)
    return split(DATASETS.get(cfg.name)(cfg), cfg)


def load_splits(cfg) -> Splits:
    """Owner / attacker / test splits of the scenario's data set, cached per process."""
    return _load_cached(cfg.model_dump_json())
