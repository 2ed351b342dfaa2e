"""Surrogate distillation of an image-to-image model: the attacker queries the served model with
its own inputs A and trains a network of its choosing on (A, outputs) - the attack output
watermarking is built to survive (a trigger-less analogue of `distill`).

`outputs: unmarked` trains on the protected model's outputs *before* the watermark barrier:
the control cell whose detection rate is the method's false-positive rate on surrogates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.attacks.base import Attack, Attacked, register
from harness.errors import ConfigError
from harness.image_training import GAN_MIN_SIZE, quantised_outputs, train_image_model
from model_zoo.image2image import (
    Barrier,
    check_image2image,
    check_image_size,
    create_image2image,
)


class SurrogateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str = Field("unet", description="image2image network: cnet, resnet9, resnet16, unet, "
                      "timm_unet:<timm name>; '@<width>' sets the base width")  # fmt: skip
    loss: Literal["l1", "l2", "perceptual", "l1+gan", "l2+gan", "perceptual+gan"] = "l2"
    epochs: int = Field(20, ge=1)
    lr: float = Field(2e-4, gt=0)
    gan_weight: float = Field(0.01, gt=0, description="weight of the adversarial term (+gan)")
    query_budget: int | None = Field(None, ge=1, description="max attacker images queried")
    outputs: Literal["marked", "unmarked"] = Field(
        "marked", description="unmarked: train on M's outputs before the barrier (control)"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        check_image2image(v)
        return v


@register("surrogate")
class Surrogate(Attack):
    Params = SurrogateParams
    tasks = ("image2image",)

    @classmethod
    def tiny_params(cls) -> dict:
        return {"arch": "cnet@8", "epochs": 1}

    def check_data(self, dataset) -> None:
        try:
            check_image_size(self.params.arch, dataset.image_size, dataset.channels)
        except ConfigError as e:
            raise e.with_location(None, "arch") from None
        if self.params.loss.endswith("+gan") and dataset.image_size < GAN_MIN_SIZE:
            raise ConfigError(
                f"a +gan loss trains a PatchGAN, which needs images of at least {GAN_MIN_SIZE} "
                f"px (dataset.image_size is {dataset.image_size})",
                field="loss",
                value=self.params.loss,
                allowed=["l1", "l2", "perceptual"],
            )

    def apply(self, model, ctx):
        p = self.params
        teacher = model.base if p.outputs == "unmarked" and isinstance(model, Barrier) else model
        data = ctx.data.attacker.take(p.query_budget, seed=ctx.seed)
        targets = quantised_outputs(teacher, data.x, ctx.device)
        channels = data.x.shape[1]
        student = create_image2image(p.arch, channels, channels).to(ctx.device)
        train_image_model(
            student, data.x, targets, loss=p.loss, epochs=p.epochs, lr=p.lr,
            batch_size=ctx.train.batch_size, device=ctx.device, seed=ctx.seed,
            gan_weight=p.gan_weight, amp=ctx.train.amp,
        )  # fmt: skip
        return Attacked(student, ctx.spec.replace(arch=p.arch, wrapper=None, wrapper_params=None))
