"""NC, centred NC, PSNR, SSIM and the success rate against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import structural_similarity

from harness.image_metrics import centred_nc, nc, psnr, ssim, success_rate


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def ramp() -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    return a, a.flip(-1)


def test_nc_by_hand() -> None:
    """sum(ab) = 4 + 6 + 6 + 4 = 20 and ||a|| ||b|| = 30, so NC = 2/3; centred they mirror."""
    a, b = ramp()
    assert nc(a, b).item() == pytest.approx(2 / 3)
    assert centred_nc(a, b).item() == pytest.approx(-1.0)


def test_nc_of_an_image_with_itself_is_one(images: torch.Tensor) -> None:
    assert torch.allclose(nc(images, images), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(nc(images, 3 * images), torch.ones(2, dtype=torch.float64))
    assert nc(images, images).shape == (2,)


def test_centred_nc_of_the_mirror_about_the_mean_is_minus_one(images: torch.Tensor) -> None:
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    mirror = 2 * mean - images
    assert torch.allclose(centred_nc(images, mirror), -torch.ones(2, dtype=torch.float64))
    assert torch.allclose(centred_nc(images, images + 0.3), torch.ones(2, dtype=torch.float64))


def test_white_against_mostly_white_logo_pitfall() -> None:
    """12 % dark area: plain NC = sqrt(0.88) ~ 0.94 though nothing was extracted."""
    logo = torch.ones(1, 3, 50, 50)
    logo[..., :6, :] = 0
    white = torch.ones_like(logo)
    noisy_white = 1 - 0.02 * torch.rand(logo.shape, generator=torch.Generator().manual_seed(0))
    assert nc(white, logo).item() == pytest.approx(math.sqrt(0.88))
    assert nc(noisy_white, logo).item() > 0.9
    assert centred_nc(white, logo).item() == 0.0
    assert abs(centred_nc(noisy_white, logo).item()) < 0.2


def test_all_zero_extraction_scores_zero_not_nan(images: torch.Tensor) -> None:
    zeros = torch.zeros_like(images)
    assert torch.equal(nc(zeros, images), torch.zeros(2, dtype=torch.float64))


def test_psnr_of_a_constant_offset() -> None:
    """MSE 0.01 gives 10 log10(1 / 0.01) = 20 dB; doubling the data range adds 6.02 dB."""
    a = 0.8 * torch.rand(3, 3, 8, 8)
    assert torch.allclose(psnr(a, a + 0.1), torch.full((3,), 20.0, dtype=torch.float64))
    assert psnr(a, a + 0.1, data_range=2.0)[0].item() == pytest.approx(20 + 20 * math.log10(2))
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_of_identical_images_is_one(images: torch.Tensor) -> None:
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64))


def test_ssim_matches_scikit_image() -> None:
    photo = torch.from_numpy(data.astronaut()[:256:4, 128:384:4]).permute(2, 0, 1) / 255
    noise = 0.1 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))
    a, b = photo[None].double(), (photo + noise).clamp(0, 1)[None].double()
    expected = structural_similarity(
        a[0].numpy(),
        b[0].numpy(),
        channel_axis=0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
    )
    assert expected < 0.9
    assert ssim(a, b).item() == pytest.approx(expected, abs=2e-3)


def test_metrics_refuse_mismatched_shapes(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3, 16, 16\) and \(3, 16, 16\)"):
        nc(images, images[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(images[..., :8, :8], images[..., :8, :8])


def test_success_rate_counts_strictly_above_threshold() -> None:
    assert success_rate(torch.tensor([0.96, 0.95, 0.5, 0.99])) == 0.5
    assert success_rate([0.5, 0.7], threshold=0.6) == 0.5
    with pytest.raises(ValueError, match="at least one NC value"):
        success_rate(np.array([]))
