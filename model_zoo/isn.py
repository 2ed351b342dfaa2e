"""Invertible steganographic network (HiNet-style) for Steganographic Passport licences.

The owner hides each user's ID image in the owner passport (`hide`), and the owner's key image
reveals it again from the user passport (`reveal`). Both directions run the same coupling blocks,
one forwards and one backwards, so a licence needs no retraining and no second network.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

CLAMP = 2.0
REVEAL_WEIGHT, STEGO_WEIGHT, LOW_WEIGHT = 5.0, 1.0, 1.0


def dwt(x: Tensor) -> Tensor:
    """Orthonormal Haar DWT: (N, C, H, W) -> (N, 4C, H/2, W/2).

    Sub-bands are band-major ([LL | HL | LH | HH], each C channels), so the low-frequency band
    that the loss keeps close to the cover is simply the first C channels. Orthonormal scaling
    (1/2) keeps the transform energy-preserving and its inverse its transpose.
    """
    _check_even(x)
    n, c, h, w = x.shape
    p00, p01, p10, p11 = F.pixel_unshuffle(x, 2).view(n, c, 4, h // 2, w // 2).unbind(2)
    ll = (p00 + p01 + p10 + p11) / 2
    hl = (-p00 + p01 - p10 + p11) / 2
    lh = (-p00 - p01 + p10 + p11) / 2
    hh = (p00 - p01 - p10 + p11) / 2
    return torch.cat([ll, hl, lh, hh], 1)


def iwt(y: Tensor) -> Tensor:
    """Exact inverse of `dwt`: (N, 4C, h, w) -> (N, C, 2h, 2w)."""
    if y.dim() != 4 or y.shape[1] % 4:
        raise ValueError(f"iwt needs (N, 4C, h, w) sub-bands; got shape {tuple(y.shape)}")
    n, c4, h, w = y.shape
    ll, hl, lh, hh = y.chunk(4, 1)
    p00 = (ll - hl - lh + hh) / 2
    p01 = (ll + hl - lh - hh) / 2
    p10 = (ll - hl + lh - hh) / 2
    p11 = (ll + hl + lh + hh) / 2
    return F.pixel_shuffle(torch.stack([p00, p01, p10, p11], 2).reshape(n, c4, h, w), 2)


def _check_even(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"dwt needs an (N, C, H, W) batch; got shape {tuple(x.shape)}")
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(
            f"dwt needs an even height and width; got {x.shape[-2]}x{x.shape[-1]}. "
            "Crop or pad the image to even sides."
        )


class DenseBlock(nn.Module):
    """Dense conv block for rho, eta and phi.

    The last conv starts at zero, so every coupling block starts as the identity: the stego image
    equals the cover at step 0 and training only has to learn the perturbation (HiNet).
    """

    def __init__(self, in_ch: int, out_ch: int, growth: int = 32, n_convs: int = 5) -> None:
        super().__init__()
        widths = [in_ch + i * growth for i in range(n_convs)]
        self.convs = nn.ModuleList(nn.Conv2d(w, growth, 3, padding=1) for w in widths[:-1])
        self.out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return self.out(torch.cat(feats, 1))


class CouplingBlock(nn.Module):
    """Affine coupling on two equal channel halves; invertible in closed form for any weights."""

    def __init__(self, half: int, clamp: float = CLAMP, growth: int = 32, n_convs: int = 5) -> None:
        super().__init__()
        self.clamp = clamp
        self.phi, self.rho, self.eta = (DenseBlock(half, half, growth, n_convs) for _ in range(3))

    def _scale(self, y1: Tensor) -> Tensor:
        # The sigmoid bounds the log-scale to (-clamp, clamp): the inverse never divides by ~0.
        return torch.exp(2 * self.clamp * (torch.sigmoid(self.rho(y1)) - 0.5))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, 1)
        y1 = x1 + self.phi(x2)
        y2 = x2 * self._scale(y1) + self.eta(y1)
        return torch.cat([y1, y2], 1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y.chunk(2, 1)
        x2 = (y2 - self.eta(y1)) / self._scale(y1)
        x1 = y1 - self.phi(x2)
        return torch.cat([x1, x2], 1)


class ISN(nn.Module):
    """Coupling blocks over DWT(cover) || DWT(secret); `forward`/`inverse` act on sub-bands."""

    def __init__(
        self,
        n_blocks: int = 8,
        channels: int = 3,
        growth: int = 32,
        n_convs: int = 5,
        clamp: float = CLAMP,
    ) -> None:
        super().__init__()
        if n_blocks < 1 or channels < 1 or n_convs < 1:
            raise ValueError(
                "`n_blocks`, `channels` and `n_convs` must be at least 1 but got "
                f"{n_blocks}, {channels}, {n_convs}."
            )
        self.channels = channels
        self.blocks = nn.ModuleList(
            CouplingBlock(4 * channels, clamp, growth, n_convs) for _ in range(n_blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y

    def hide(self, cover: Tensor, secret: Tensor) -> Tensor:
        """The user passport: `secret` (the ID image) hidden in `cover` (the owner passport)."""
        bands = self(self._pair(cover, secret))
        return iwt(bands[:, : 4 * self.channels])

    def reveal(self, stego: Tensor, key: Tensor) -> Tensor:
        """The ID image recovered from a user passport. The key image stands in for the half
        `hide` discarded; the paper's loss alone does not make other keys fail (see `isn_loss`)."""
        bands = self.inverse(self._pair(stego, key))
        return iwt(bands[:, 4 * self.channels :])

    def _pair(self, first: Tensor, second: Tensor) -> Tensor:
        if first.shape != second.shape or first.dim() != 4 or first.shape[1] != self.channels:
            raise ValueError(
                f"ISN needs two (N, {self.channels}, H, W) images of one shape; got "
                f"{tuple(first.shape)} and {tuple(second.shape)}"
            )
        return torch.cat([dwt(first), dwt(second)], 1)


def low_band(x: Tensor) -> Tensor:
    """The LL sub-band: changes there are the most visible, so the loss keeps it on the cover."""
    return dwt(x)[:, : x.shape[1]]


def isn_loss(
    isn: ISN,
    cover: Tensor,
    secret: Tensor,
    key: Tensor,
    *,
    wrong_key: Tensor | None = None,
    neg_weight: float = 0.0,
    neg_margin: float = 0.01,
) -> dict[str, Tensor]:
    """5 * reveal MSE + 1 * stego MSE + 1 * LL-band MSE, plus an optional negative-key term.

    The paper's loss never asks the reveal to fail with a wrong key, so nothing makes the key
    specific. This project's addition, `neg_weight * max(0, neg_margin - MSE(reveal(stego,
    wrong_key), secret))`, pushes a wrong key's reveal at least `neg_margin` (MSE on [0, 1]
    pixels; 0.01 is PSNR 20 dB) away from the ID. `wrong_key` defaults to uniform noise.
    Returns every term (mean-reduced MSEs) and their weighted sum under "total".
    """
    if neg_weight < 0:
        raise ValueError(f"`neg_weight` must be at least 0 but got {neg_weight}.")
    stego = isn.hide(cover, secret)
    parts = {
        "reveal": F.mse_loss(isn.reveal(stego, key), secret),
        "stego": F.mse_loss(stego, cover),
        "low": F.mse_loss(low_band(stego), low_band(cover)),
    }
    total = REVEAL_WEIGHT * parts["reveal"] + STEGO_WEIGHT * parts["stego"]
    total = total + LOW_WEIGHT * parts["low"]
    if neg_weight > 0:
        wrong = torch.rand_like(key) if wrong_key is None else wrong_key
        parts["neg_key"] = F.relu(neg_margin - F.mse_loss(isn.reveal(stego, wrong), secret))
        total = total + neg_weight * parts["neg_key"]
    return {**parts, "total": total}


def load_isn(artifact) -> ISN:
    """The ISN a stored aux artifact holds (its meta's ``isn`` config and its weights), on the
    CPU in eval mode. `artifact` is anything with ``meta`` and ``state()``."""
    cfg = artifact.meta["isn"]
    isn = ISN(cfg["blocks"], cfg["channels"], cfg["growth"])
    isn.load_state_dict(artifact.state())
    return isn.eval()
