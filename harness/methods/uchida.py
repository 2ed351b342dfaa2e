"""White-box weight watermark of Uchida et al. (ICMR 2017), as WRT's `wm_uchida`.

The owner draws a secret projection X ~ N(0, 1) of shape (T, M) and T random bits b. Embedding
fine-tunes the victim on the owner's split with CE + lambda * sum_t BCE(sigmoid(X w)_t, b_t),
where w (M values) is one conv layer's kernel averaged over its output channels. Verification
reads the suspect's same layer: b_hat = 1[X w >= 0], scored by bit accuracy against b, and
detected when it clears WRT's null-model threshold (a one-sided Gaussian at `p_value` over
victims of other seeds that never carried the mark, sigma floored by a chance-level
binomial's); the exact binomial p-value against chance (0.5) is reported beside it.

Decisions taken where WRT's code is specific to its WRN: the layer is a module path
(`layer`); by default the middle one, in module order, of the network's convolutions whose
kernel average has at least T values (WRT's parameter 8 of a WRN-28 is such a middle conv with
864 values). WRT's defaults: T = 100 bits, lambda = 0.1; its early stopping on bit accuracy
(every 200 batches, patience 5) is replaced by a fixed number of epochs on the train config's
cosine schedule. A suspect without that layer (a distilled student of another arch) reads as
chance (0.5) with `layer_found` 0. X and b derive from the owner's seed and live only in the
embed artifact.

`align: true` (a verify-only parameter: the same marked and attacked models serve both
settings) matches the suspect's hidden channels to the marked model's first
(`harness.alignment`, the neuron-alignment defence), undoing permuted, rescaled or added
neurons before the layer is read.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.alignment import ALIGN_METRICS, aligned_suspect
from harness.decision import bit_score, null_model_metrics, null_threshold
from harness.errors import ConfigError
from harness.methods.base import Embedded, Method, Metric, VictimRef, WatermarkScore, register
from harness.training import fit
from model_zoo import ModelSpec, create_model


class UchidaParams(BaseModel):
    n_bits: int = Field(100, ge=1, le=4096, description="signature length T")
    lambda_: float = Field(0.1, ge=0, alias="lambda", description="weight of the BCE term")
    layer: str | None = Field(
        None, description="module path of the marked conv (default: the middle eligible one)"
    )
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr)")
    n_null: int = Field(3, ge=2, le=50, description="null models for the threshold")
    p_value: float = Field(0.05, gt=0, lt=0.5)
    align: bool = Field(
        False, description="match the suspect's neurons to the marked model's before reading"
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


def eligible_convs(model: nn.Module, n_bits: int) -> list[tuple[str, nn.Conv2d]]:
    """Convolutions whose output-averaged kernel has at least `n_bits` values, in order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.weight[0].numel() >= n_bits
    ]


def pick_layer(model: nn.Module, p: UchidaParams) -> tuple[str, nn.Conv2d]:
    if p.layer is not None:
        module = dict(model.named_modules()).get(p.layer)
        if not isinstance(module, nn.Conv2d):
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ConfigError("not a Conv2d of this network", field="layer", value=p.layer,
                              allowed=convs)  # fmt: skip
        if module.weight[0].numel() < p.n_bits:
            raise ConfigError(
                f"its kernel average has {module.weight[0].numel()} values, fewer than n_bits",
                field="layer",
                value=p.layer,
            )
        return p.layer, module
    convs = eligible_convs(model, p.n_bits)
    if not convs:
        raise ConfigError(
            "no convolution of this network has a kernel average of n_bits values",
            field="n_bits",
            value=p.n_bits,
        )
    return convs[len(convs) // 2]


def kernel_mean(conv: nn.Conv2d) -> torch.Tensor:
    """w: the layer's kernel averaged over its output channels, flattened (M values)."""
    return conv.weight.mean(0).flatten()


def bit_accuracy(model: nn.Module, key: dict) -> float | None:
    """Share of the signature's bits the model's layer carries (None: no such layer)."""
    module = dict(model.named_modules()).get(key["layer"])
    if not isinstance(module, nn.Conv2d) or module.weight[0].numel() != key["X"].shape[1]:
        return None
    with torch.no_grad():
        w = kernel_mean(module).detach().float().cpu()
        bits = (key["X"] @ w >= 0).float()
    return (bits == key["b"]).float().mean().item()


@register("uchida")
class Uchida(Method):
    Params = UchidaParams
    wm_metric = "bit_acc"
    version = "2"  # 2: X and b derive from the store's owner secret, not the seed
    metrics = (
        *null_model_metrics("bit accuracy"),
        Metric("layer_found", "1 if the suspect has the marked layer (else read as chance)"),
        *ALIGN_METRICS,
    )
    verify_params = ("align",)  # one marked model serves align: false and true

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_bits": 64, "lambda": 1.0, "epochs": 3, "n_null": 2}

    def check_arch(self, arch: str, dataset) -> None:
        spec = ModelSpec(arch, max(2, dataset.num_classes), dataset.channels, dataset.image_size)
        try:
            pick_layer(create_model(spec), self.params)
        except ConfigError as e:
            raise ConfigError(f"arch {arch!r}: {e.message}", field=e.field, value=e.value,
                              allowed=e.allowed) from None  # fmt: skip

    def needs(self):
        """Null models: plain victims of the next `n_null` seeds (shared with those cells)."""
        return tuple(VictimRef(f"null{i}", seed_offset=1 + i) for i in range(self.params.n_null))

    def embed(self, victim, ctx) -> Embedded:
        p = self.params
        layer, conv = pick_layer(victim, p)
        g = torch.Generator().manual_seed(ctx.owner_seed)
        x_proj = torch.randn(p.n_bits, conv.weight[0].numel(), generator=g)
        bits = torch.randint(0, 2, (p.n_bits,), generator=g).float()
        x_dev, b_dev = x_proj.to(ctx.device), bits.to(ctx.device)

        def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            proj = (x_dev @ kernel_mean(conv).float()).float()
            reg = F.binary_cross_entropy_with_logits(proj, b_dev, reduction="sum")
            return F.cross_entropy(logits, y) + p.lambda_ * reg

        d = ctx.data.owner
        fit(victim, d.x, d.y, ctx.train, ctx.device, ctx.seed, loss_fn=loss, epochs=p.epochs,
            lr=p.lr)  # fmt: skip
        key = {"X": x_proj, "b": bits, "layer": layer}
        nulls = [bit_accuracy(ctx.inputs[f"null{i}"].model(), key) for i in range(p.n_null)]
        key.update(null_threshold([n or 0.5 for n in nulls], 0.5, p.n_bits, p.p_value))
        return Embedded(victim, key)

    def verify(self, model, key, ctx) -> WatermarkScore:
        model, aligned = aligned_suspect(model, ctx, self.params.align)
        return bit_score(bit_accuracy(model, key), len(key["b"]), key, **aligned)
