"""Input reconstruction (after arXiv 1911.10291; WRT's `input_reconstruction.py`): the attacker
trains a small autoencoder on its own images and puts it in front of the model, so every query
is replaced by its reconstruction. What the autoencoder cannot represent - patterns absent
from natural images, such as a trigger's - is lost on the way. The weights are untouched; the
autoencoder is the trainable part of the transform (`transform_modules`), stored with them.

Architecture (WRT's `CifarAutoencoder`): conv C -> `width` (5 x 5, stride 2) + BatchNorm +
ReLU, nearest upsampling back to the input's size, conv `width` -> C (5 x 5), sigmoid.

Training: WRT loads a pretrained autoencoder and leaves its training unimplemented
(`train_autoencoder` raises NotImplementedError). Here it is trained on the attacker split only:
MSE between the reconstruction and the image, Adam at `lr` (WRT's autoencoder optimiser: Adam,
lr 0.01) with a cosine schedule, `epochs` passes in batches of `train.batch_size`; a seeded
`holdout` share of the attacker images is kept out of training and the mean reconstruction
PSNR on it is reported (`reconstruction_psnr`). The deployment runs the autoencoder in eval
mode (BatchNorm on its running statistics) whatever mode the model is in.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import InputAttack, Metric, register
from harness.image_metrics import psnr
from harness.training import as_float, predict_images, train_loop

PSNR = Metric(
    "reconstruction_psnr",
    "mean PSNR (dB) of the autoencoder's reconstructions of held-out attacker images",
    higher_is_better=None,
)
TRAIN_MSE = Metric(
    "reconstruction_train_mse",
    "the autoencoder's mean training MSE per image over all its epochs",
    higher_is_better=None,
)


class InputReconstructionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(128, ge=1, le=4096, description="hidden channels (WRT: 128)")
    epochs: int = Field(10, ge=1, description="autoencoder training epochs (WRT: not trained)")
    lr: float = Field(0.01, gt=0, description="Adam lr (WRT's autoencoder optimiser: 0.01)")
    holdout: float = Field(
        0.1, gt=0, lt=1, description="share of the attacker images kept out for the PSNR"
    )


class Autoencoder(nn.Module):
    """WRT's CIFAR autoencoder for `channels`-channel images of any size."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.encode = nn.Conv2d(channels, width, 5, stride=2, padding=2)
        self.norm = nn.BatchNorm2d(width)
        self.decode = nn.Conv2d(width, channels, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.encode(x)))
        h = F.interpolate(h, size=x.shape[-2:], mode="nearest")
        return torch.sigmoid(self.decode(h))


@register("input_reconstruction")
class InputReconstruction(InputAttack):
    Params = InputReconstructionParams
    metrics = (PSNR, TRAIN_MSE)

    @classmethod
    def tiny_params(cls) -> dict:
        return {"width": 8, "epochs": 1}

    def transform_modules(self, spec):
        return Autoencoder(spec.in_chans, self.params.width)

    def transform(self, x, modules):
        modules.eval()
        return modules(x)

    def fit(self, modules, model, ctx):
        p, x = self.params, ctx.data.attacker.x
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.seed))
        n_held = min(len(x) - 1, max(1, round(p.holdout * len(x))))
        held, train = x[order[:n_held]], x[order[n_held:]]
        opt = torch.optim.Adam(modules.parameters(), lr=p.lr)

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(modules(batch).float(), batch)

        stats = train_loop(
            loss, opt, n=len(train), batch_size=ctx.train.batch_size, epochs=p.epochs,
            generator=torch.Generator().manual_seed(ctx.seed),
            batch=lambda idx: as_float(train[idx], ctx.device), device=ctx.device,
            amp=ctx.train.amp, modules=[modules],
        )  # fmt: skip
        values = psnr(predict_images(modules, held, ctx.device), as_float(held))
        return {PSNR.name: values[values.isfinite()].mean().item(), TRAIN_MSE.name: stats["loss"]}
