"""Per-image metrics of output watermarking: NC, centred NC, PSNR, SSIM and the success rate.

Every function takes two (N, ...) batches of the same shape and returns a float64 tensor of N
values, one per image, so rows and thresholds are computed per image, never on a batch mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.image import structural_similarity_index_measure as _ssim

SSIM_WINDOW = 11


def _pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened float64 rows: sums over a whole 64x64x3 image lose digits in float32."""
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(
            f"expected two (N, ...) batches of the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}: add a batch axis with x[None] for a single image"
        )
    return a.flatten(1).double(), b.flatten(1).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An all-zero row (a ReLU extractor can output one) scores 0, not NaN."""
    norms = a.norm(dim=1) * b.norm(dim=1)
    return (a * b).sum(dim=1) / norms.clamp_min(torch.finfo(torch.float64).tiny)


def nc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The paper's normalised correlation sum(ab) / (||a|| ||b||) per image.

    Pitfall: it does not subtract the mean, so any two bright images agree. An all-white image
    against a logo that is white but for 12 % of its area already scores sqrt(0.88) ~ 0.94,
    next to the 0.95 threshold; report `centred_nc` beside it.
    """
    return _cosine(*_pairs(a, b))


def centred_nc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image: NC after subtracting each image's own mean.

    Immune to the bright-background pitfall of `nc`: a constant image scores 0 against
    anything, and an image against its mirror about its mean scores -1.
    """
    a, b = _pairs(a, b)
    return _cosine(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(range^2 / MSE) per image; identical images give +inf (kept, not capped)."""
    a, b = _pairs(a, b)
    mse = (a - b).pow(2).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Gaussian window 11, sigma 1.5, data range 1), averaged over the map's
    interior only, as scikit-image (gaussian_weights=True, use_sample_covariance=False) and
    Wang et al. do. torchmetrics' own mean also counts the 5-pixel border it reflect-pads,
    which reads ~0.03 lower on a noisy 64x64 image (less on larger images).
    """
    _pairs(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} (its window), "
            f"got {tuple(a.shape[-2:])}"
        )
    _, full = _ssim(
        a.double(),
        b.double(),
        data_range=1.0,
        kernel_size=SSIM_WINDOW,
        sigma=1.5,
        reduction="none",
        return_full_image=True,
    )
    m = SSIM_WINDOW // 2
    return full[..., m:-m, m:-m].mean(dim=(1, 2, 3))


def success_rate(nc_values: torch.Tensor | Sequence[float], threshold: float = 0.95) -> float:
    """Share of images whose NC is strictly above `threshold` (the paper's NC > 0.95)."""
    values = torch.as_tensor(nc_values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("success_rate needs at least one NC value, got none")
    return float((values > threshold).double().mean())


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as 8-bit ones on the CPU (what a PNG or a service holds)."""
    return torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
