"""Training loops of image-to-image models: pixel, perceptual and adversarial (PatchGAN) losses.

Shared by the output-watermarking method (its simulated surrogate) and the `surrogate` attack, so
the owner's simulation and the attacker's training are the same code. Targets are 8-bit images,
as a served model's outputs are: whatever the watermark survives must survive that rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.training import as_float, autocast, predict_images, train_loop
from model_zoo.image2image import PatchDiscriminator

LOSSES = ("l1", "l2", "perceptual", "l1+gan", "l2+gan", "perceptual+gan")
GAN_MIN_SIZE = 32  # PatchDiscriminator's four stride-2 blocks


class PerceptualLoss(nn.Module):
    """MSE between VGG-16 features (relu1_2, relu2_2, relu3_3) of output and target.

    Nothing is downloaded at run time, so the VGG is timm's architecture with a fixed seeded
    random initialisation, not ImageNet weights: random conv features still weigh edges and
    texture above flat pixel error, but this is a stand-in for the paper's pretrained VGG.
    """

    def __init__(self, in_ch: int, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = timm.create_model(
                "vgg16", pretrained=False, features_only=True, out_indices=(0, 1, 2), in_chans=in_ch
            )
        self.features.eval().requires_grad_(False)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pairs = zip(self.features(out), self.features(target), strict=True)
        return sum(F.mse_loss(a, b) for a, b in pairs)


def reconstruction_loss(kind: str, channels: int, device) -> Callable:
    """The pixel part of a surrogate loss name ("l2+gan" -> MSE)."""
    base = kind.removesuffix("+gan")
    if base == "l1":
        return F.l1_loss
    if base == "l2":
        return F.mse_loss
    if base == "perceptual":
        return PerceptualLoss(channels).to(device)
    raise ValueError(f"unknown loss {kind!r}; allowed: {list(LOSSES)}")


def quantised_outputs(model: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    """A model's outputs as the 8-bit images a service returns."""
    return (predict_images(model, x, device) * 255).round().to(torch.uint8)


def adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))  # pix2pix / the paper's code


def lsgan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(logits, torch.full_like(logits, float(real)))


def discriminator_step(disc: nn.Module, opt, real: torch.Tensor, fake: torch.Tensor, device,
                       amp: bool) -> None:  # fmt: skip
    """One LSGAN update of a PatchGAN discriminator: `real` images towards 1, the generator's
    `fake` ones (detached) towards 0; the `after_step` of GAN-trained loops."""
    with autocast(device, amp):
        d_loss = lsgan(disc(real).float(), True) + lsgan(disc(fake.detach()).float(), False)
    opt.zero_grad(set_to_none=True)
    d_loss.backward()
    opt.step()


def train_image_model(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss: str,
    epochs: int,
    lr: float,
    batch_size: int,
    device,
    seed: int,
    gan_weight: float = 0.01,
    disc_width: int = 64,
    amp: bool = True,
) -> dict[str, float]:
    """Train `model` on (x, targets) image pairs with `loss` (see LOSSES); a "+gan" loss adds
    `gan_weight` x LSGAN against a PatchGAN discriminator trained alongside. Adam, beta1 0.5."""
    channels = x.shape[1]
    recon = reconstruction_loss(loss, channels, device)
    disc = PatchDiscriminator(channels, disc_width).to(device) if loss.endswith("+gan") else None
    opt = adam(model.parameters(), lr)
    opt_d = adam(disc.parameters(), lr) if disc is not None else None
    gen = torch.Generator().manual_seed(seed)
    last: dict[str, torch.Tensor] = {}  # the step's target and output, for the discriminator

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return as_float(x[idx], device), as_float(targets[idx], device)

    def loss_fn(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, last["target"] = b
        last["out"] = out = model(xb).float()
        value = recon(out, last["target"])
        if disc is not None:
            value = value + gan_weight * lsgan(disc(out).float(), True)
        return value

    def disc_step() -> None:
        discriminator_step(disc, opt_d, last["target"], last["out"], device, amp)

    return train_loop(
        loss_fn, opt, n=len(x), batch_size=batch_size, epochs=epochs, generator=gen,
        batch=batch, device=device, amp=amp, modules=[model],
        after_step=disc_step if disc is not None else None,
    )  # fmt: skip
