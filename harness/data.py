"""Datasets as in-memory uint8 tensors with disjoint, seeded owner / attacker / test splits.

Everything is materialised once per process (small data sets dominate this harness's use)
and converted to float per batch, which keeps the training loop free of DataLoader overhead.
"""

from __future__ import annotations

import _codecs
import functools
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.config import DatasetCfg
from harness.errors import ConfigError
from harness.registry import Registry


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W) and int64 labels, or uint8 target images (image-to-image)."""

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

    @property
    def task(self) -> str:
        return "image2image" if self.num_classes == 0 else "classification"


@dataclass(frozen=True)
class RawData:
    """A loader's output: a pool to split, and optionally the data set's own test split.

    num_classes == 0 marks an image-to-image task: x is domain A (input), y domain B (target).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None


DATASETS: Registry = Registry("dataset")


KNOWN_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}  # known before loading


def known_classes(cfg) -> int | None:
    """The label space of data set config `cfg` where it is known before loading (None: a
    folder data set, whose classes are its subfolders)."""
    return KNOWN_CLASSES.get(cfg.name, cfg.num_classes if cfg.name == "synthetic" else None)


def to_uint8(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
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
    from sklearn.datasets import load_digits as sk_digits  # lazy: start-up time

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return RawData(
        to_uint8(x, cfg.image_size, cfg.channels), torch.from_numpy(bunch.target).long(), 10
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
    return RawData(to_uint8(x, cfg.image_size, cfg.channels), y.long(), cfg.num_classes)


DOWNLOADABLE = ("cifar10", "cifar100")  # torchvision can fetch these; folders it cannot
ROOT_DATASETS = ("cifar10", "cifar100", "imagefolder", "pairs_folder")  # read from dataset.root
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def _require_root(cfg) -> Path:
    if cfg.root is None:
        raise ConfigError(
            f"dataset {cfg.name!r} needs a root folder", field="dataset.root", value=None
        )
    root = Path(cfg.root).expanduser()
    if not root.exists() and not (cfg.download and cfg.name in DOWNLOADABLE):
        downloadable = cfg.name in DOWNLOADABLE
        fetch = " (set dataset.download: true to fetch it there)" if downloadable else ""
        raise ConfigError(
            f"dataset root does not exist{fetch}",
            field="dataset.root",
            value=str(root),
        )
    if root.exists() and not root.is_dir():
        archive = root.name.lower().endswith(ARCHIVE_SUFFIXES)
        extract = ": extract the archive and point dataset.root at a folder" if archive else ""
        raise ConfigError(
            f"dataset root is not a folder{extract}", field="dataset.root", value=str(root)
        )
    return root


# --- CIFAR: the python-pickle release, read here (torchvision only downloads) ------------------


@dataclass(frozen=True)
class CifarFormat:
    """Where the official python release of one CIFAR variant keeps its pickled batches."""

    title: str
    folder: str  # the folder the archive unpacks to, inside dataset.root
    archive: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: bytes
    names_key: bytes  # in the meta file: one name per class
    listing: str  # the files, for messages
    torchvision_class: str  # the class whose url / filename / md5 the download uses

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


CIFAR_FORMATS = {
    "cifar10": CifarFormat(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
        b"labels", b"label_names", "data_batch_1..5, test_batch, batches.meta", "CIFAR10",
    ),
    "cifar100": CifarFormat(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        ("train",), "test", "meta",
        b"fine_labels", b"fine_label_names", "train, test, meta", "CIFAR100",
    ),
}  # fmt: skip
CIFAR_SIDE = 32


def _cifar_problem(fmt: CifarFormat, root: Path) -> str | None:
    """What the CIFAR reader would miss under root (None: every file is there, non-empty)."""
    folder = root / fmt.folder
    if not folder.is_dir():
        return (
            f"no {fmt.title} data in the root: expected the folder {fmt.folder}/ "
            f"holding {fmt.listing}"
        )
    missing = [name for name in fmt.files if not (folder / name).is_file()]
    empty = [n for n in fmt.files if n not in missing and (folder / n).stat().st_size == 0]
    if not missing and not empty:
        return None
    found = (("missing", missing), ("empty", empty))
    parts = [f"{what} {', '.join(names)}" for what, names in found if names]
    return (
        f"{fmt.title} files incomplete in {fmt.folder}/: {'; '.join(parts)} "
        f"(expected {fmt.listing})"
    )


def _check_cifar(fmt: CifarFormat, root: Path) -> None:
    problem = _cifar_problem(fmt, root)
    if problem is None:
        return
    hint = None
    if root.name == fmt.folder or (root / fmt.test).is_file():
        problem += "; the batches lie in the root itself: point dataset.root at its parent folder"
        hint = str(root.parent)
    elif (root / fmt.archive).is_file():
        problem += f"; found {fmt.archive}: extract it there or set dataset.download: true"
    else:
        problem += "; or set dataset.download: true to fetch it"
    raise ConfigError(problem, field="dataset.root", value=str(root), hint=hint)


@functools.cache
def _pickle_globals() -> dict[tuple[str, str], object]:
    """The only callables a CIFAR batch pickle may name: numpy array / scalar rebuilding and
    the bytes codec of protocol-2 pickles from Python 3, under numpy 1 and 2 module names."""
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    table: dict[tuple[str, str], object] = {
        ("_codecs", "encode"): _codecs.encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.multiarray", "scalar")] = scalar
        table[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return table


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts of arrays, lists and bytes; a pickle naming any other callable is
    refused rather than run (a data folder is no place for code)."""

    def find_class(self, module: str, name: str) -> object:
        found = _pickle_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return found


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as err:  # any failure to read a user's file is a data error
        raise ConfigError(
            f"cannot read CIFAR pickle ({type(err).__name__}: {err})",
            field="dataset.root",
            value=str(path),
        ) from err
    if not isinstance(obj, dict):
        raise ConfigError(
            f"not a CIFAR pickle: expected a dict, found {type(obj).__name__}",
            field="dataset.root",
            value=str(path),
        )
    return obj


def _entry(batch: dict, key: bytes):
    """batch[key]; str keys (a pickle written by Python 3 code) are accepted too."""
    return batch[key] if key in batch else batch.get(key.decode())


def _read_meta(path: Path, fmt: CifarFormat) -> int:
    names = _entry(_unpickle(path), fmt.names_key)
    if names is None or len(names) < 2:
        raise ConfigError(
            f"the {fmt.title} meta file needs {fmt.names_key!r}: one name per class",
            field="dataset.root",
            value=str(path),
        )
    return len(names)


def _read_batch(path: Path, fmt: CifarFormat, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch as uint8 (N, 3, 32, 32) images (rows are R, G, B planes) and int64 labels."""
    batch = _unpickle(path)
    data, labels = _entry(batch, b"data"), _entry(batch, fmt.labels_key)
    pixels = 3 * CIFAR_SIDE * CIFAR_SIDE
    if data is None or labels is None:
        raise ConfigError(
            f"not a {fmt.title} batch: needs the keys b'data' and {fmt.labels_key!r}",
            field="dataset.root",
            value=str(path),
        )
    x, y = np.asarray(data), np.asarray(labels)
    if x.dtype != np.uint8 or x.shape[1:] != (pixels,) or y.shape != x.shape[:1]:
        raise ConfigError(
            f"malformed {fmt.title} batch: b'data' must be uint8 (N, {pixels}) with N labels "
            f"(got {x.dtype} {x.shape} and {y.size} labels)",
            field="dataset.root",
            value=str(path),
        )
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"{fmt.title} labels must be whole numbers in 0..{num_classes - 1} "
            "(one per class name in the meta file)",
            field="dataset.root",
            value=str(path),
        )
    x = np.array(x, dtype=np.uint8).reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)  # a writable copy
    return x, y.astype(np.int64)


def _download_cifar(fmt: CifarFormat, root: Path) -> None:
    """Fetch and unpack the official archive into root (torchvision checks the archive's md5)."""
    import torchvision.datasets as tv_datasets  # lazy: start-up time
    from torchvision.datasets.utils import download_and_extract_archive  # lazy: start-up time

    cls = getattr(tv_datasets, fmt.torchvision_class)
    download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)


def _load_cifar(fmt: CifarFormat, cfg) -> RawData:
    root = _require_root(cfg)
    if cfg.download and _cifar_problem(fmt, root) is not None:
        _download_cifar(fmt, root)
    _check_root(_check_cifar, fmt, root)
    folder = root / fmt.folder
    num_classes = _read_meta(folder / fmt.meta, fmt)

    def read(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:  # converted per batch: float copies of one file at a time
            x, y = _read_batch(folder / name, fmt, num_classes)
            xs.append(to_uint8(torch.from_numpy(x).float() / 255.0, cfg.image_size, cfg.channels))
            ys.append(torch.from_numpy(y))
        return torch.cat(xs), torch.cat(ys)

    (x, y), (tx, ty) = read(fmt.train), read((fmt.test,))
    return RawData(x, y, num_classes, tx, ty)


@DATASETS.register("cifar10")
def load_cifar10(cfg) -> RawData:
    """CIFAR-10's python release under root/cifar-10-batches-py (download: true fetches it)."""
    return _load_cifar(CIFAR_FORMATS["cifar10"], cfg)


@DATASETS.register("cifar100")
def load_cifar100(cfg) -> RawData:
    """CIFAR-100's python release under root/cifar-100-python, fine labels (100 classes)."""
    return _load_cifar(CIFAR_FORMATS["cifar100"], cfg)


# --- ImageFolder: root/class/image, optionally root/train + root/val -----------------------------

CLASS_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_class_image(path: str) -> bool:
    """The files an ImageFolder class reads (torchvision's default extensions)."""
    return path.lower().endswith(CLASS_IMAGE_SUFFIXES)


def _train_val(root: Path) -> list[Path]:
    """[root/train, root/val] when both exist (the split layout), else [root]."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return [root / "train", root / "val"]
    return [root]


def has_class_image(folder: Path) -> bool:
    """Whether any image lies in folder or below (stops at the first one found)."""
    return any(
        any(map(is_class_image, files)) for _, _, files in os.walk(folder, followlinks=True)
    )


def _class_folders(folder: Path) -> list[str]:
    """The sorted class names of one ImageFolder split, each checked to hold an image."""
    entries = list(os.scandir(folder))
    classes = sorted(e.name for e in entries if e.is_dir())
    expected = f"one sub-folder per class, each holding images ({', '.join(CLASS_IMAGE_SUFFIXES)})"
    if not classes:
        loose = any(e.is_file() and is_class_image(e.name) for e in entries)
        found = "no class sub-folders"
        if loose:
            found = "images lie directly in the folder, not in class sub-folders"
        raise ConfigError(
            f"{found}: an ImageFolder needs {expected}", field="dataset.root", value=str(folder)
        )
    empty = [name for name in classes if not has_class_image(folder / name)]
    if empty:
        shown = ", ".join(empty[:10]) + (f" ... ({len(empty)} in all)" if len(empty) > 10 else "")
        raise ConfigError(
            f"class sub-folders without images: {shown}; an ImageFolder needs {expected}",
            field="dataset.root",
            value=str(folder),
        )
    return classes


def _check_imagefolder(root: Path) -> None:
    classes = [_class_folders(folder) for folder in _train_val(root)]
    if len(classes) == 2 and classes[0] != classes[1]:
        train, val = set(classes[0]), set(classes[1])
        raise ConfigError(
            "train/ and val/ hold different class sub-folders (labels number the sorted class "
            f"names, so both need the same): only in train: {sorted(train - val) or 'none'}; "
            f"only in val: {sorted(val - train) or 'none'}",
            field="dataset.root",
            value=str(root),
        )


@DATASETS.register("imagefolder")
def load_imagefolder(cfg) -> RawData:
    """A torchvision ImageFolder (root/class/*.jpg); `root/train` and `root/val` if both exist."""
    from torchvision import transforms  # lazy: start-up time
    from torchvision.datasets import ImageFolder  # lazy: start-up time

    root = _require_root(cfg)
    _check_root(_check_imagefolder, root)
    tf = transforms.Compose(
        [transforms.Resize((cfg.image_size, cfg.image_size)), transforms.PILToTensor()]
    )

    def tensors(path):
        ds = ImageFolder(str(path), transform=tf, is_valid_file=is_class_image)
        xs, ys = zip(*[ds[i] for i in range(len(ds))], strict=True)
        x = torch.stack(xs).float() / 255.0
        return to_uint8(x, cfg.image_size, cfg.channels), torch.tensor(ys).long(), len(ds.classes)

    folders = _train_val(root)
    if len(folders) == 2:
        (x, y, n), (tx, ty, _) = tensors(folders[0]), tensors(folders[1])
        return RawData(x, y, n, tx, ty)
    x, y, n = tensors(root)
    return RawData(x, y, n)


def _check_root(check, *args) -> None:
    """Run a root check; a folder that cannot be listed is a config error, not a crash."""
    try:
        check(*args)
    except OSError as err:
        raise ConfigError(
            f"cannot read the dataset root ({err.strerror or err})",
            field="dataset.root",
            value=str(err.filename or args[-1]),
        ) from err


# --- image-to-image pairs (output watermarking): x = domain A (degraded), y = domain B ----------

# Real photographs shipped inside the scikit-image wheel (no download). `cat` is left out:
# skimage.data.cat() is the same photograph as chelsea().
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "horse", "page",
    "clock", "text", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo",
    "brick", "grass", "gravel",
)  # fmt: skip
NOISE_SIGMA = 0.1
BLUR_SIGMA_PER_32PX = 1.0  # scales with image_size so the blur covers the same scene share
PATCH_MAX_SCALE = 2.0**1.5  # patches cover 1x to ~2.8x image_size of the source, then resize
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """A skimage / sklearn photo as uint8 (3, H, W): masks to 0/255, grey tripled, no alpha."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].transpose(2, 0, 1))


@functools.lru_cache(maxsize=1)
def photo_sources() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 (3, H, W) array) for every offline photo this install has, loaded once.

    A photo the installed scikit-image lacks (or would have to download) is skipped, so the
    data set degrades gracefully across versions instead of reaching for the network.
    """
    import skimage.data  # lazy: start-up time
    from sklearn.datasets import load_sample_images  # lazy: start-up time

    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append((name, _as_rgb(np.asarray(getattr(skimage.data, name)()))))
        except (AttributeError, OSError, ValueError, ImportError):
            continue
    bunch = load_sample_images()
    for path, image in zip(bunch.filenames, bunch.images, strict=True):
        photos.append((Path(path).stem, _as_rgb(image)))
    return tuple(photos)


def random_patch(photo: np.ndarray, size: int, g: torch.Generator) -> torch.Tensor:
    """A seeded square crop at a random scale, resized (antialiased) to float (3, size, size).

    The crop is copied in numpy: thousands of tiny torch copies stall on thread wake-ups.
    """
    h, w = photo.shape[1:]
    scale = PATCH_MAX_SCALE ** torch.rand((), generator=g).item()
    crop = max(1, min(round(size * scale), h, w))
    top = int(torch.randint(h - crop + 1, (), generator=g))
    left = int(torch.randint(w - crop + 1, (), generator=g))
    patch = photo[None, :, top : top + crop, left : left + crop].astype(np.float32) / 255
    patch = torch.from_numpy(patch)
    if crop != size:
        patch = F.interpolate(
            patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return patch[0].clamp(0, 1)


def photo_patches(n: int, size: int, seed: int) -> torch.Tensor:
    """n float (n, 3, size, size) patches spread evenly (in seeded order) over all photos.

    Even spreading, rather than drawing a photo per patch, keeps any split from being dominated
    by one scene (a denoiser trained on moon craters only would be a poor benchmark).
    """
    g = torch.Generator().manual_seed(seed)
    photos = [photo for _, photo in photo_sources()]
    which = (torch.arange(n) % len(photos))[torch.randperm(n, generator=g)]
    return torch.stack([random_patch(photos[k], size, g) for k in which.tolist()])


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel with reflect padding (no dark borders)."""
    radius = max(1, min(math.ceil(3 * sigma), x.shape[-1] - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def _splat_max(points: torch.Tensor, alpha: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear max-splat of (n, K, M, 2) sub-pixel points (y, x) into (n, S*S) opacities.

    Max (not sum) keeps densely sampled lines at their streak's alpha, and the bilinear weights
    give ~1 px antialiased lines at any angle, at a cost linear in the number of points.
    """
    n = points.shape[0]
    base = (points - 0.5).floor()
    frac = points - 0.5 - base
    out = torch.zeros(n, size * size)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = base[..., 0] + dy, base[..., 1] + dx
        wy = frac[..., 0] if dy else 1 - frac[..., 0]
        wx = frac[..., 1] if dx else 1 - frac[..., 1]
        inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        idx = y.clamp(0, size - 1).long() * size + x.clamp(0, size - 1).long()
        val = alpha[..., None] * wy * wx * inside
        out.scatter_reduce_(1, idx.flatten(1), val.flatten(1), reduce="amax")
    return out


def _rain_mask(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Seeded rain streaks as a (n, 1, S, S) opacity map in [0, 1].

    Each image gets S/4..S/2 thin streaks of length 0.1..0.3 S and opacity 0.4..0.8, all
    slanted by one per-image angle within +-30 degrees of vertical (rain falls one way).
    """
    k_max = max(2, size // 2)
    count = torch.randint(max(1, size // 4), k_max + 1, (n, 1), generator=g)
    angle = (torch.rand(n, 1, generator=g) - 0.5) * (math.pi / 3)
    angle = angle + (torch.rand(n, k_max, generator=g) - 0.5) * 0.1
    length = size * (0.1 + 0.2 * torch.rand(n, k_max, generator=g))
    start = torch.rand(n, k_max, 2, generator=g) * size
    step = length[..., None] * torch.stack((angle.cos(), angle.sin()), -1)
    alpha = (0.4 + 0.4 * torch.rand(n, k_max, generator=g)) * (torch.arange(k_max) < count)
    t = torch.linspace(0, 1, 2 * math.ceil(0.3 * size) + 2)  # samples <= 0.5 px apart
    points = start[..., None, :] + t[:, None] * step[..., None, :]
    return _splat_max(points, alpha, size).view(n, 1, size, size)


def degrade(clean: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Domain A from float clean images B in [0, 1]; seeded, so pairs are reproducible."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return clean + NOISE_SIGMA * torch.randn(clean.shape, generator=g)
    if kind == "blur":
        return _gaussian_blur(clean, sigma=BLUR_SIGMA_PER_32PX * max(1.0, clean.shape[-1] / 32))
    if kind == "rain":
        mask = _rain_mask(len(clean), clean.shape[-1], g)
        return 1 - (1 - clean) * (1 - mask)  # screen blend: streaks brighten, never darken
    raise ConfigError(
        "unknown degradation",
        field="dataset.degradation",
        value=kind,
        allowed=["noise", "rain", "blur"],
    )


@DATASETS.register("photo_pairs")
def load_photo_pairs(cfg) -> RawData:
    """Patches of the real photos shipped with scikit-image / scikit-learn: B clean, A degraded."""
    clean = photo_patches(cfg.samples, cfg.image_size, cfg.split_seed)
    if cfg.channels == 1:
        clean = clean.mean(1, keepdim=True)
    degraded = degrade(clean, cfg.degradation, cfg.split_seed + 1)
    size, channels = cfg.image_size, cfg.channels
    return RawData(to_uint8(degraded, size, channels), to_uint8(clean, size, channels), 0)


def _read_pair(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One side-by-side [A | B] file (pix2pix layout) as two float (3, size, size) halves."""
    from PIL import Image, UnidentifiedImageError  # lazy: start-up time

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError("cannot read image", field="dataset.root", value=str(path)) from err
    w, h = image.size
    if w < 2:
        raise ConfigError("too narrow to split into A | B", field="dataset.root", value=str(path))
    half = w // 2
    a, b = (
        image.crop(box).resize((size, size), Image.Resampling.BILINEAR)
        for box in ((0, 0, half, h), (half, 0, 2 * half, h))
    )
    return tuple(torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255.0 for p in (a, b))


def _pair_files(folder: Path, root: Path) -> list[Path]:
    """The [A | B] images directly in `folder`, sorted by name; none is a config error."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        note = ""
        halves = [name for name in ("train", "val") if (root / name).is_dir()]
        if folder == root and len(halves) == 1:
            note = f" (found only {halves[0]}/: the split layout needs both train/ and val/)"
        elif any(p.is_dir() for p in folder.iterdir()):
            note = " (sub-folders are not searched)"
        raise ConfigError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in the pairs folder: expected "
            f"side-by-side A|B images directly in it{note}",
            field="dataset.root",
            value=str(folder),
        )
    return files


def _check_pairs(root: Path) -> None:
    for folder in _train_val(root):
        _pair_files(folder, root)


def _pairs_in(folder: Path, root: Path, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """All [A | B] images directly in `folder` (sorted by name) as uint8 (A, B) tensors."""
    a, b = zip(*(_read_pair(p, cfg.image_size) for p in _pair_files(folder, root)), strict=True)
    size, channels = cfg.image_size, cfg.channels
    return to_uint8(torch.stack(a), size, channels), to_uint8(torch.stack(b), size, channels)


@DATASETS.register("pairs_folder")
def load_pairs_folder(cfg) -> RawData:
    """A folder of side-by-side A|B images; `root/train` and `root/val` if both exist."""
    root = _require_root(cfg)
    _check_root(_check_pairs, root)
    folders = _train_val(root)
    if len(folders) == 2:
        (x, y), (tx, ty) = (_pairs_in(f, root, cfg) for f in folders)
        return RawData(x, y, 0, tx, ty)
    x, y = _pairs_in(root, root, cfg)
    return RawData(x, y, 0)


IMAGE_PAIR_DATASETS = ("photo_pairs", "pairs_folder")  # image-to-image: x and y are images


def task_of(name: str) -> str:
    """The task a data set poses, known from its name alone (before anything is loaded)."""
    return "image2image" if name in IMAGE_PAIR_DATASETS else "classification"


def check_dataset(cfg) -> None:
    """Fail early (before any task) on an unknown name, a missing root, or a root without data
    in its loader's format. Cheap: lists folders and stats files, decodes no image."""
    DATASETS.get(cfg.name)
    if cfg.name not in ROOT_DATASETS:
        return
    root = _require_root(cfg)
    if cfg.name in CIFAR_FORMATS:
        if not cfg.download:  # with download, the loader fetches whatever is missing
            _check_root(_check_cifar, CIFAR_FORMATS[cfg.name], root)
    elif cfg.name == "imagefolder":
        _check_root(_check_imagefolder, root)
    elif cfg.name == "pairs_folder":
        _check_root(_check_pairs, root)


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
    cfg = DatasetCfg.model_validate_json(cfg_json)
    return split(DATASETS.get(cfg.name)(cfg), cfg)


def load_splits(cfg) -> Splits:
    """Owner / attacker / test splits of the scenario's data set, cached per process."""
    return _load_cached(cfg.model_dump_json())
