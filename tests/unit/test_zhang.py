"""Zhang et al.'s schemes (`content`, `noise`, `unrelated`): their keys as the paper and WRT
define them, and bad parameters refused at validation (exit 2) before any task starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness.cli import main
from harness.methods import METHODS

BASE = {
    "name": "zhang",
    "dataset": {"name": "digits", "image_size": 32, "channels": 1},
    "archs": ["lenet"],
    "attacks": ["identity"],
}


def validate(tmp_path: Path, method: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "methods": [method]}))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "method, field, needle",
    [
        ({"name": "content", "params": {"target_class": 10}}, "target_class", "0 … 9"),
        ({"name": "noise", "params": {"source_class": 12}}, "source_class", "0 … 9"),
        ({"name": "content", "params": {"source_class": 6}}, "source_class", "must differ"),
        ({"name": "noise", "params": {"noise_std": 0}}, "noise_std", "greater than 0"),
        ({"name": "unrelated", "params": {"watermark_root": "/nonexistent/wm"}},
         "watermark_root", "no image files"),
    ],
)  # fmt: skip
def test_bad_parameters_exit_2_naming_the_field(tmp_path, capsys, method, field, needle):
    code, err = validate(tmp_path, method, capsys)
    assert code == 2 and f"methods[0].params.{field}" in err and needle in err, err


def test_an_empty_watermark_folder_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, err = validate(tmp_path, {"name": "unrelated", "params": {"watermark_root": str(empty)}},
                         capsys)  # fmt: skip
    assert code == 2 and "watermark_root" in err


def _ctx(n_per_class: int = 20, size: int = 32, channels: int = 1) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (10 * n_per_class, channels, size, size), generator=g,
                      dtype=torch.uint8)  # fmt: skip
    y = torch.arange(10).repeat_interleave(n_per_class)
    data = SimpleNamespace(owner=SimpleNamespace(x=x, y=y), image_size=size, channels=channels)
    return SimpleNamespace(data=data, owner_seed=1234)


def test_content_keys_are_source_images_with_a_white_box():
    method = METHODS.get("content")({"n_keys": 5, "source_class": 4, "content_size": 8})
    ctx = _ctx()
    keys = method.make_keys(ctx)
    sources = ctx.data.owner.x[ctx.data.owner.y == 4]
    assert keys.shape == (5, 1, 32, 32) and keys.dtype == torch.uint8
    assert (keys[:, :, 2:10, 2:18] == 255).all()  # WRT: rows 2-9, columns 2-17 at 32 px
    outside = keys.clone()
    outside[:, :, 2:10, 2:18] = 0
    # every key is one of the owner's class-4 images outside the box
    for key in outside:
        masked = sources.clone()
        masked[:, :, 2:10, 2:18] = 0
        assert (masked == key).all(dim=(1, 2, 3)).any()


def test_noise_keys_share_one_fixed_pattern():
    method = METHODS.get("noise")({"n_keys": 6, "source_class": 2, "noise_std": 0.05})
    ctx = _ctx()
    keys = method.make_keys(ctx).float() / 255
    g = torch.Generator().manual_seed(ctx.owner_seed)
    chosen = ctx.data.owner.x[ctx.data.owner.y == 2]
    chosen = chosen[torch.randperm(len(chosen), generator=g)[:6]].float() / 255
    diff = keys - chosen
    inside = (keys > 0.01) & (keys < 0.99)  # pixels the clip left alone
    first = diff[0][inside[0]]
    assert 0.04 < first.std() < 0.06  # the pattern's std (little is clipped at 0.05)
    for i in range(1, 6):  # the same pattern wherever neither key was clipped
        both = inside[0] & inside[i]
        assert torch.allclose(diff[0][both], diff[i][both], atol=2 / 255)
    assert torch.equal(method.make_keys(ctx), method.make_keys(ctx))  # from the owner secret


def test_unrelated_keys_come_from_the_folder(tmp_path):
    folder = tmp_path / "wm"
    folder.mkdir()
    for i, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
    method = METHODS.get("unrelated")({"n_keys": 5, "watermark_root": str(folder)})
    keys = method.make_keys(_ctx(channels=3))
    assert keys.shape == (5, 3, 32, 32)
    colours = {tuple(int(v) for v in k[:, 16, 16]) for k in keys}
    assert colours <= {(255, 0, 0), (0, 255, 0), (0, 0, 255)} and len(colours) == 3


def test_unrelated_keys_default_to_the_shipped_photos():
    method = METHODS.get("unrelated")({"n_keys": 4})
    keys = method.make_keys(_ctx(channels=1))
    assert keys.shape == (4, 1, 32, 32) and keys.dtype == torch.uint8
    assert float(keys.float().std()) > 5  # real photo patches, not a constant
    assert len({bytes(np.asarray(k)) for k in keys}) == 4


def test_too_few_source_images_fail_the_cell_with_the_count():
    from harness.errors import CellFailed

    method = METHODS.get("content")({"n_keys": 50, "source_class": 4})
    with pytest.raises(CellFailed, match="n_keys 50 > the 20 owner images of source_class 4"):
        method.make_keys(_ctx(n_per_class=20))
