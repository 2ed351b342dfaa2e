"""Folder-backed loaders (cifar10, cifar100, imagefolder, pairs_folder) on small files written
here in the real formats, and check_dataset's errors for roots that hold no such data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness import data
from harness.cli import main
from harness.config import DatasetCfg
from harness.errors import ConfigError

pytestmark = pytest.mark.usefixtures("offline")

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
PER_BATCH = 4


def cfg_for(name: str, root: Path, **kw) -> DatasetCfg:
    return DatasetCfg(**{"name": name, "root": str(root), "image_size": 32, "channels": 3, **kw})


def load(name: str, root: Path, **kw) -> data.RawData:
    return data.DATASETS.get(name)(cfg_for(name, root, **kw))


def bad_root(name: str, root: Path, value: Path | None = None, **kw) -> str:
    """check_dataset's error for a root without usable data: on dataset.root, naming the path."""
    with pytest.raises(ConfigError) as info:
        data.check_dataset(cfg_for(name, root, **kw))
    err = info.value
    assert err.field == "dataset.root"
    assert err.value == str(value or root)
    assert str(value or root) in str(err)
    return err.message


# --- writing the real formats ------------------------------------------------------------------


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_batch(n: int, labels_key: bytes, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        labels_key: rng.integers(0, num_classes, n).tolist(),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def as_images(batches: list[dict], key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader must return at 32 px, 3 channels: the rows as (N, 3, 32, 32) planes."""
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([b[key] for b in batches])
    return torch.from_numpy(x), torch.from_numpy(y).long()


def write_cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    train = [cifar_batch(PER_BATCH, b"labels", 10, seed) for seed in range(5)]
    test = cifar_batch(PER_BATCH, b"labels", 10, 99)
    for i, batch in enumerate(train, start=1):
        write_pickle(folder / f"data_batch_{i}", batch)
    write_pickle(folder / "test_batch", test)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return {"train": as_images(train, b"labels"), "test": as_images([test], b"labels")}


def write_cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    train = cifar_batch(6, b"fine_labels", 100, 1)
    test = cifar_batch(4, b"fine_labels", 100, 2)
    for batch in (train, test):
        batch[b"coarse_labels"] = [label // 5 for label in batch[b"fine_labels"]]
    write_pickle(folder / "train", train)
    write_pickle(folder / "test", test)
    write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return {
        "train": as_images([train], b"fine_labels"),
        "test": as_images([test], b"fine_labels"),
    }


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_classes(folder: Path, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes cat, dog with per_class 32x32 RGB PNGs each, in ImageFolder's order (sorted)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            write_png(folder / name / f"{i:03d}.png", image)
            xs.append(torch.from_numpy(image).permute(2, 0, 1))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def write_pairs(folder: Path, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n side-by-side [A | B] PNGs, 64 x 32 (two 32 x 32 halves)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        write_png(folder / f"pair_{i:03d}.png", np.concatenate([a[i], b[i]], axis=1))
    return torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2)


# --- CIFAR -------------------------------------------------------------------------------------


def test_cifar10_round_trip(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    data.check_dataset(cfg_for("cifar10", tmp_path))
    raw = load("cifar10", tmp_path)
    assert raw.x.shape == (5 * PER_BATCH, 3, 32, 32) and raw.test_x.shape == (PER_BATCH, 3, 32, 32)
    assert raw.x.dtype == raw.test_x.dtype == torch.uint8
    assert raw.y.dtype == raw.test_y.dtype == torch.int64
    assert raw.num_classes == 10
    assert torch.equal(raw.x, written["train"][0]) and torch.equal(raw.y, written["train"][1])
    assert torch.equal(raw.test_x, written["test"][0])
    assert torch.equal(raw.test_y, written["test"][1])
    # One pixel by hand: a row is the R plane, then G, then B, each 32 rows of 32.
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][1]
    assert [int(raw.x[PER_BATCH + 1, c, 5, 7]) for c in range(3)] == [
        row[c * 1024 + 5 * 32 + 7] for c in range(3)
    ]


def test_cifar10_resizes_and_sets_channels(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    raw = load("cifar10", tmp_path, image_size=16, channels=1)
    assert raw.x.shape == (5 * PER_BATCH, 1, 16, 16) and raw.x.dtype == torch.uint8
    expected = data.to_uint8(written["train"][0].float() / 255.0, 16, 1)
    assert torch.equal(raw.x, expected)


def test_cifar10_splits_keep_the_test_batch(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    splits = data.load_splits(cfg_for("cifar10", tmp_path))
    assert torch.equal(splits.test.x, written["test"][0])
    assert len(splits.owner) + len(splits.attacker) == 5 * PER_BATCH
    assert splits.num_classes == 10 and splits.task == "classification"


def test_cifar100_round_trip_fine_labels(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    data.check_dataset(cfg_for("cifar100", tmp_path))
    raw = load("cifar100", tmp_path)
    assert raw.num_classes == 100
    assert raw.x.shape == (6, 3, 32, 32) and raw.x.dtype == torch.uint8
    assert torch.equal(raw.x, written["train"][0]) and torch.equal(raw.y, written["train"][1])
    assert torch.equal(raw.test_x, written["test"][0])
    assert torch.equal(raw.test_y, written["test"][1])


def test_cifar_reads_numpy1_module_names(tmp_path: Path) -> None:
    """The official files were pickled under numpy 1 (numpy.core.multiarray._reconstruct)."""
    written = write_cifar10(tmp_path)
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        path.write_bytes(path.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in (tmp_path / "cifar-10-batches-py/test_batch").read_bytes()
    assert torch.equal(load("cifar10", tmp_path).test_x, written["test"][0])


class Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickle_with_code_is_refused_not_run(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    batch = cifar_batch(PER_BATCH, b"labels", 10, 0)
    batch[b"batch_label"] = Payload(str(marker))
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1", batch)
    with pytest.raises(ConfigError, match="refusing to load") as info:
        load("cifar10", tmp_path)
    assert "data_batch_1" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({b"data": np.zeros((PER_BATCH, 100), np.uint8)}, "malformed"),
        ({b"data": np.zeros((PER_BATCH, 3072), np.float32)}, "malformed"),
        ({b"labels": [0, 1, 2]}, "malformed"),
        ({b"labels": [0, 1, 2, 10]}, "0..9"),
    ],
)
def test_cifar_malformed_batch(tmp_path: Path, change: dict, match: str) -> None:
    write_cifar10(tmp_path)
    batch = {**cifar_batch(PER_BATCH, b"labels", 10, 0), **change}
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(ConfigError, match=match) as info:
        load("cifar10", tmp_path)
    assert info.value.value == str(tmp_path / "cifar-10-batches-py" / "test_batch")


def test_cifar_download_fetches_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets import utils as tv_utils

    calls = []
    written = {}

    def fake_download(url: str, download_root: str, filename: str, md5: str) -> None:
        calls.append((url, download_root, filename, md5))
        written.update(write_cifar10(Path(download_root)))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    root = tmp_path / "new"
    data.check_dataset(cfg_for("cifar10", root, download=True))  # not there yet: fine
    raw = load("cifar10", root, download=True)
    assert calls == [(CIFAR10.url, str(root), CIFAR10.filename, CIFAR10.tgz_md5)]
    assert torch.equal(raw.x, written["train"][0])
    load("cifar10", root, download=True)  # everything there now: no second fetch
    assert len(calls) == 1


# --- ImageFolder -------------------------------------------------------------------------------


def test_imagefolder_flat(tmp_path: Path) -> None:
    x, y = write_classes(tmp_path, 3)
    data.check_dataset(cfg_for("imagefolder", tmp_path))
    raw = load("imagefolder", tmp_path)
    assert raw.x.shape == (6, 3, 32, 32) and raw.x.dtype == torch.uint8
    assert raw.num_classes == 2 and raw.test_x is None
    assert torch.equal(raw.x, x) and torch.equal(raw.y, y)


def test_imagefolder_train_val(tmp_path: Path) -> None:
    x, y = write_classes(tmp_path / "train", 3)
    tx, ty = write_classes(tmp_path / "val", 1, seed=1)
    data.check_dataset(cfg_for("imagefolder", tmp_path))
    raw = load("imagefolder", tmp_path)
    assert raw.num_classes == 2
    assert torch.equal(raw.x, x) and torch.equal(raw.y, y)
    assert torch.equal(raw.test_x, tx) and torch.equal(raw.test_y, ty)


def test_imagefolder_grey_and_resized(tmp_path: Path) -> None:
    write_classes(tmp_path, 3)
    raw = load("imagefolder", tmp_path, image_size=16, channels=1)
    assert raw.x.shape == (6, 1, 16, 16) and raw.x.dtype == torch.uint8


# --- pairs_folder ------------------------------------------------------------------------------


def test_pairs_folder_flat(tmp_path: Path) -> None:
    a, b = write_pairs(tmp_path, 3)
    data.check_dataset(cfg_for("pairs_folder", tmp_path))
    raw = load("pairs_folder", tmp_path)
    assert raw.num_classes == 0 and raw.x.dtype == raw.y.dtype == torch.uint8
    assert torch.equal(raw.x, a) and torch.equal(raw.y, b)


def test_pairs_folder_train_val(tmp_path: Path) -> None:
    a, b = write_pairs(tmp_path / "train", 3)
    ta, tb = write_pairs(tmp_path / "val", 2, seed=1)
    data.check_dataset(cfg_for("pairs_folder", tmp_path))
    raw = load("pairs_folder", tmp_path)
    assert torch.equal(raw.x, a) and torch.equal(raw.y, b)
    assert torch.equal(raw.test_x, ta) and torch.equal(raw.test_y, tb)


# --- roots without data: check_dataset fails early, naming the path and what is missing ----------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "no CIFAR-10 data in the root: expected the folder cifar-10-batches-py/"),
        ("cifar100", "no CIFAR-100 data in the root: expected the folder cifar-100-python/"),
        ("imagefolder", "no class sub-folders: an ImageFolder needs one sub-folder per class"),
        ("pairs_folder", "no images (.png"),
    ],
)
def test_empty_root(tmp_path: Path, name: str, expected: str) -> None:
    message = bad_root(name, tmp_path)
    assert expected in message
    with pytest.raises(ConfigError):  # the loader itself refuses the same way
        load(name, tmp_path)


def test_root_is_a_file(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    assert "not a folder: extract the archive" in bad_root("cifar10", archive)


def test_cifar10_missing_and_empty_files(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    (folder / "batches.meta").write_bytes(b"")
    message = bad_root("cifar10", tmp_path)
    assert "missing data_batch_3, test_batch" in message
    assert "empty batches.meta" in message
    assert "data_batch_1..5, test_batch, batches.meta" in message


def test_cifar100_missing_meta(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    assert "missing meta (expected train, test, meta)" in bad_root("cifar100", tmp_path)


def test_cifar_root_one_level_too_deep(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    inner = tmp_path / "cifar-10-batches-py"
    with pytest.raises(ConfigError, match="point dataset.root at its parent") as info:
        data.check_dataset(cfg_for("cifar10", inner))
    assert info.value.hint == str(tmp_path)


def test_cifar_archive_not_extracted(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    assert "found cifar-10-python.tar.gz: extract it" in bad_root("cifar10", tmp_path)


def test_cifar_download_allows_an_empty_root(tmp_path: Path) -> None:
    data.check_dataset(cfg_for("cifar10", tmp_path, download=True))
    data.check_dataset(cfg_for("cifar100", tmp_path, download=True))


def test_imagefolder_images_without_class_folders(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    assert "images lie directly in the folder" in bad_root("imagefolder", tmp_path)


def test_imagefolder_class_without_images(tmp_path: Path) -> None:
    write_classes(tmp_path, 3)
    for png in (tmp_path / "dog").iterdir():
        png.unlink()
    (tmp_path / "dog" / "notes.txt").write_text("no images")
    assert "class sub-folders without images: dog" in bad_root("imagefolder", tmp_path)


def test_imagefolder_checks_both_train_and_val(tmp_path: Path) -> None:
    write_classes(tmp_path / "train", 3)
    (tmp_path / "val").mkdir()
    message = bad_root("imagefolder", tmp_path, value=tmp_path / "val")
    assert "no class sub-folders" in message
    write_classes(tmp_path / "val", 1)
    for png in (tmp_path / "val" / "cat").iterdir():
        png.unlink()
    message = bad_root("imagefolder", tmp_path, value=tmp_path / "val")
    assert "class sub-folders without images: cat" in message


def test_imagefolder_train_val_classes_differ(tmp_path: Path) -> None:
    write_classes(tmp_path / "train", 2)
    write_classes(tmp_path / "val", 1)
    write_png(tmp_path / "val" / "emu" / "0.png", np.zeros((8, 8, 3), np.uint8))
    message = bad_root("imagefolder", tmp_path)
    assert "only in train: none; only in val: ['emu']" in message


def test_pairs_folder_val_without_pairs(tmp_path: Path) -> None:
    write_pairs(tmp_path / "train", 2)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "readme.txt").write_text("none yet")
    assert "no images" in bad_root("pairs_folder", tmp_path, value=tmp_path / "val")


def test_pairs_folder_train_without_val(tmp_path: Path) -> None:
    write_pairs(tmp_path / "train", 2)
    message = bad_root("pairs_folder", tmp_path)
    assert "found only train/: the split layout needs both train/ and val/" in message


# --- through the CLI ---------------------------------------------------------------------------


def smoke_scenario_with(tmp_path: Path, dataset: dict) -> Path:
    scenario = yaml.safe_load((SCENARIOS / "smoke.yaml").read_text())
    scenario["dataset"] = dataset
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def test_cli_validate_empty_cifar_root_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    dataset = {"name": "cifar10", "root": str(root), "image_size": 32, "channels": 3}
    path = smoke_scenario_with(tmp_path, dataset)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert f"{path}: dataset.root: no CIFAR-10 data" in err
    assert "cifar-10-batches-py/" in err and str(root) in err
    assert "Traceback" not in err


def test_cli_validate_written_cifar_root_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_cifar10(tmp_path / "cifar")
    dataset = {"name": "cifar10", "root": str(tmp_path / "cifar"), "image_size": 32}
    path = smoke_scenario_with(tmp_path, dataset)
    assert main(["validate", str(path)]) == 0
    assert ": ok" in capsys.readouterr().out
