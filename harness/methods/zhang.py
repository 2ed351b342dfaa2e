"""Zhang et al.'s black-box watermarks (AsiaCCS 2018): `content`, `noise` and `unrelated`.

The owner picks images, marks them and relabels them all to one target class, then fine-tunes
its model on its own data plus those keys; verification is the model's accuracy on the keys
(that they land in the target class), against WRT's null-model threshold (a one-sided Gaussian
over victims of other seeds that never saw the keys, the binomial spread of a chance-level
model as its floor) and the exact binomial p-value against chance. The three schemes differ
only in their keys:

- `content`: owner-split images of `source_class` with a visible white box stamped on them
  (WRT: rows 2-9, columns 2-17 of a 32 px image on every channel, i.e. a box `content_size`
  high and twice as wide, 2 px from the corner; scaled here with the image size);
- `noise`: owner-split images of `source_class` plus one fixed Gaussian pattern (std
  `noise_std` in [0, 1] pixel units, drawn once from the owner secret; the paper's
  "meaningless noise"), clipped;
- `unrelated`: images from another domain: patches of the photos shipped with scikit-image
  and scikit-learn (offline), or the images of a `watermark_root` folder.

Decisions taken where the paper and WRT's code differ (say so in any comparison):
- every key is labelled `target_class`, as in the paper. WRT's `wm_unrelated` draws uniform
  random labels instead, and uses Omniglot, which is not shipped here;
- the embedding set is WRT's: the keys plus the owner's clean `source_class` images (with
  their own label), both repeated `boost` times, appended to the owner split, and fine-tuned
  for `epochs`. WRT's early stopping on the key loss is replaced by a fixed epoch count;
- key images come from the owner split, never from the attacker or test split, and the key
  choice, the noise pattern and the photo crops derive from the store's owner secret.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.data import IMAGE_SUFFIXES, known_classes, photo_patches
from harness.errors import CellFailed, ConfigError
from harness.methods.base import Embedded, register
from harness.methods.trigger_set import TriggerSet
from harness.training import fit


def check_classes(params: BaseModel, dataset) -> None:
    """`target_class` (and `source_class`, where a scheme has one) inside the data set's label
    space (where it is known before loading) and different from each other."""
    classes = known_classes(dataset)
    for name in ("target_class", "source_class"):
        value = getattr(params, name, None)
        if value is not None and classes is not None and value >= classes:
            raise ConfigError(
                f"{name} is not a class of this data set",
                field=name, value=value, allowed=f"0 … {classes - 1}",
            )  # fmt: skip
    if getattr(params, "source_class", None) == params.target_class:
        raise ConfigError(
            "source_class and target_class must differ (the keys must change class)",
            field="source_class", value=params.source_class,
        )  # fmt: skip


class ZhangParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_keys: int = Field(100, ge=1, le=10_000, description="key images (WRT: 100)")
    target_class: int = Field(6, ge=0, description="the label every key gets (WRT: 6)")
    boost: int = Field(10, ge=1, le=1000, description="times the key set is repeated (WRT: 10)")
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr)")
    n_null: int = Field(3, ge=2, le=50)
    p_value: float = Field(0.05, gt=0, lt=0.5)


class SourceParams(ZhangParams):
    source_class: int = Field(4, ge=0, description="class whose images are marked (WRT: 4)")


class ContentParams(SourceParams):
    content_size: int = Field(8, ge=1, le=64, description="box height at 32 px (WRT: 8)")


class NoiseParams(SourceParams):
    noise_std: float = Field(0.4, gt=0, le=2.0, description="pattern std in [0, 1] units")


class UnrelatedParams(ZhangParams):
    watermark_root: str | None = Field(
        None, description="folder of unrelated images (default: the shipped photos)"
    )


class _Zhang(TriggerSet):
    """The shared embedding and checks; subclasses make the keys (uint8, (n, C, H, W))."""

    Params = ZhangParams
    version = "1"

    @classmethod
    def tiny_params(cls) -> dict:
        tiny = {"n_keys": 10, "n_null": 2, "epochs": 4, "boost": 5, "target_class": 1}
        return {**tiny, "source_class": 0} if "source_class" in cls.Params.model_fields else tiny

    def check_data(self, dataset) -> None:
        check_classes(self.params, dataset)

    def make_keys(self, ctx) -> torch.Tensor:
        raise NotImplementedError

    def _source_images(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """`n_keys` owner images of the source class (chosen with the owner secret) and all of
        them (the clean copies WRT boosts beside the keys)."""
        owner, p = ctx.data.owner, self.params
        pool = owner.x[owner.y == p.source_class]
        if len(pool) < p.n_keys:
            raise CellFailed(
                f"{self.name}: n_keys {p.n_keys} > the {len(pool)} owner images of "
                f"source_class {p.source_class}; lower n_keys"
            )
        g = torch.Generator().manual_seed(ctx.owner_seed)
        return pool[torch.randperm(len(pool), generator=g)[: p.n_keys]], pool

    def embed(self, victim, ctx) -> Embedded:
        null_models = [ctx.inputs[f"null{i}"].model() for i in range(self.params.n_null)]
        p, owner = self.params, ctx.data.owner
        x = self.make_keys(ctx)
        y = torch.full((len(x),), p.target_class, dtype=owner.y.dtype)
        extra_x, extra_y = [x], [y]
        if hasattr(p, "source_class"):  # WRT boosts the clean source-class images too
            clean = owner.x[owner.y == p.source_class]
            extra_x.append(clean)
            extra_y.append(torch.full((len(clean),), p.source_class, dtype=owner.y.dtype))
        boosted_x = torch.cat(extra_x).repeat(p.boost, 1, 1, 1)
        boosted_y = torch.cat(extra_y).repeat(p.boost)
        train_x, train_y = torch.cat([owner.x, boosted_x]), torch.cat([owner.y, boosted_y])
        fit(victim, train_x, train_y, ctx.train, ctx.device, ctx.seed, epochs=p.epochs, lr=p.lr)
        key = {"x": x, "y": y}
        key.update(self._calibrate(key, null_models, ctx))
        return Embedded(victim, key)


@register("content")
class Content(_Zhang):
    """Owner images of `source_class` with a white box stamped on them, labelled target."""

    Params = ContentParams

    def make_keys(self, ctx) -> torch.Tensor:
        keys, _ = self._source_images(ctx)
        size, h = ctx.data.image_size, self.params.content_size
        scale = size / 32
        top = left = max(0, round(2 * scale))
        height, width = max(1, round(h * scale)), max(1, round(2 * h * scale))
        keys = keys.clone()
        keys[:, :, top : top + height, left : left + width] = 255
        return keys


@register("noise")
class Noise(_Zhang):
    """Owner images of `source_class` plus one fixed Gaussian pattern, labelled target."""

    Params = NoiseParams

    def make_keys(self, ctx) -> torch.Tensor:
        keys, _ = self._source_images(ctx)
        g = torch.Generator().manual_seed(ctx.owner_seed + 1)
        pattern = torch.randn(keys.shape[1:], generator=g) * self.params.noise_std
        noisy = keys.float() / 255 + pattern
        return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


@register("unrelated")
class Unrelated(_Zhang):
    """Images from another domain (shipped photos, or a folder), labelled target."""

    Params = UnrelatedParams

    def check_data(self, dataset) -> None:
        super().check_data(dataset)
        root = self.params.watermark_root
        if root is not None and not _folder_images(Path(root).expanduser()):
            raise ConfigError(
                "watermark_root is missing or holds no image files",
                field="watermark_root", value=root, allowed=list(IMAGE_SUFFIXES),
            )  # fmt: skip

    def make_keys(self, ctx) -> torch.Tensor:
        p, d = self.params, ctx.data
        if p.watermark_root is None:
            rgb = photo_patches(p.n_keys, d.image_size, ctx.owner_seed)  # float (n, 3, s, s)
        else:
            rgb = _read_images(_folder_images(Path(p.watermark_root).expanduser()), p.n_keys,
                               d.image_size, ctx.owner_seed)  # fmt: skip
        x = rgb.mean(1, keepdim=True) if d.channels == 1 else rgb
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _folder_images(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(files: list[Path], n: int, size: int, seed: int) -> torch.Tensor:
    """n images of the folder (drawn with the owner secret, repeated if fewer), resized to
    float (n, 3, size, size)."""
    from PIL import Image  # lazy: only with a watermark_root

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=g).tolist()
    chosen = [files[order[i % len(files)]] for i in range(n)]
    out = []
    for f in chosen:
        with Image.open(f) as im:
            rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out)
