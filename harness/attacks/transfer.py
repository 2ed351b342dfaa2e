"""Transfer learning (WRT's own attack, `wrt/attacks/removal/transfer_learning.py`, configs
`transfer_learning.yaml`, `transfer_transfer_learning.yaml`), adapted: the marked model is
carried to a different label space and back, all layers training throughout.

Phase 1: its classifier head is replaced (`reset_classifier`, as timm, lenet and the
model_zoo heads have it) by a fresh head for `proxy_classes` classes and the whole model is
trained `proxy_epochs` on the attacker split relabelled `y mod proxy_classes` (a coarser
grouping of the task's classes: with 10 classes and 2 proxies, even vs odd). Phase 2: a fresh
head for the original classes, and `epochs` of training on the attacker split with its ground
truth (WRT: ground truth). The architecture and spec are the marked model's, so the stored
model rebuilds with `create_model(spec)`.

Departures from WRT: WRT starts from an ImageNet- (or Open Images-) pretrained ResNet-34, a
different network, upsamples inputs to 224 px and trains a new 512 -> 10 head (SGD, lr 0.001,
5 epochs); here the marked model itself is the one transferred (the harness loads no
pretrained weights), its proxy task is a relabelling of the attacker's images, and the
default lr is 0.01 (lr 0.001 barely trains a fresh head in digits-scale epochs) with the
scenario's optimiser and cosine schedule.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, register
from harness.attacks.fine_tune import train_on_attacker_data
from harness.attacks.retrain import on_split
from harness.data import Split, known_classes
from harness.errors import CellFailed, ConfigError


class TransferParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    proxy_classes: int = Field(
        2, ge=2, description="phase 1 label space: the attacker's labels mod proxy_classes"
    )
    proxy_epochs: int = Field(5, ge=1, description="phase 1: training on the proxy labels")
    epochs: int = Field(5, ge=1, description="phase 2: back on the task's labels (WRT: 5)")
    lr: float = Field(0.01, gt=0, description="both phases (WRT: 0.001 from a pretrained net)")


@register("transfer")
class Transfer(Attack):
    Params = TransferParams
    version = "1"

    @classmethod
    def tiny_params(cls) -> dict:
        return {"proxy_epochs": 1, "epochs": 1}

    def check_data(self, dataset) -> None:
        classes = known_classes(dataset)
        if classes is not None and (problem := self.same_space(classes)):
            raise ConfigError(problem, field="proxy_classes", value=self.params.proxy_classes,
                              allowed=f"2 to {classes - 1}")  # fmt: skip

    def same_space(self, classes: int) -> str | None:
        """Why the proxy labels would not be another label space (None: they are)."""
        if self.params.proxy_classes < classes:
            return None
        return f"proxy_classes must be fewer than the task's {classes} classes (a coarser space)"

    def apply(self, model, ctx):
        p = self.params
        if problem := self.same_space(ctx.data.num_classes):
            raise CellFailed(problem)
        split = ctx.data.attacker
        proxy = on_split(ctx, Split(split.x, split.y % p.proxy_classes))
        for classes, phase_ctx, epochs in (
            (p.proxy_classes, proxy, p.proxy_epochs),
            (ctx.data.num_classes, ctx, p.epochs),
        ):
            model.reset_classifier(classes)
            model.to(ctx.device)
            train_on_attacker_data(model, phase_ctx, 1.0, epochs, p.lr)
        return Attacked(model)
