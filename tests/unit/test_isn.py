"""The invertible steganographic network: exact transforms, exact inverses, a loss that trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from model_zoo.isn import ISN, CouplingBlock, DenseBlock, dwt, isn_loss, iwt, low_band

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """Small random weights in the zero-initialised output convs, as after some training: a fresh
    ISN is the identity, which would make every inversion test pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in module.modules():
            if isinstance(block, DenseBlock):
                block.out.weight.copy_(torch.randn(block.out.weight.shape, generator=gen) * 0.02)
    return module


def _small_isn(n_blocks: int = 2) -> ISN:
    return ISN(n_blocks=n_blocks, growth=8, n_convs=3)


def test_dwt_round_trip_is_exact_and_orthonormal():
    x = torch.rand(2, 3, 8, 12)
    y = dwt(x)
    assert y.shape == (2, 12, 4, 6)
    assert torch.allclose(iwt(y), x, atol=1e-6)
    assert torch.allclose(y.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)


def test_dwt_low_band_is_the_scaled_block_mean():
    x = torch.rand(1, 3, 4, 4)
    mean = nn.functional.avg_pool2d(x, 2)
    assert torch.allclose(low_band(x), 2 * mean, atol=1e-6)


def test_dwt_refuses_odd_sizes():
    with pytest.raises(ValueError, match="even height and width; got 7x8"):
        dwt(torch.rand(1, 3, 7, 8))


def test_dense_block_starts_at_zero():
    assert DenseBlock(12, 12, growth=8, n_convs=3)(torch.rand(1, 12, 4, 4)).abs().max() == 0


def test_coupling_block_inverts_its_forward():
    block = _perturbed(CouplingBlock(12, growth=8, n_convs=3))
    x = torch.randn(2, 24, 8, 8)
    y = block(x)
    assert not torch.allclose(y, x, atol=1e-3)
    assert torch.allclose(block.inverse(y), x, atol=1e-4)


def test_isn_inverse_undoes_forward_over_all_blocks():
    isn = _perturbed(ISN(n_blocks=8, growth=8, n_convs=3))
    x = torch.randn(1, 24, 8, 8)
    y = isn(x)
    assert not torch.allclose(y, x, atol=1e-2)
    assert torch.allclose(isn.inverse(y), x, atol=1e-4)


def test_reveal_with_the_forward_auxiliary_half_recovers_the_secret():
    isn = _perturbed(_small_isn())
    cover, secret = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    bands = isn(torch.cat([dwt(cover), dwt(secret)], 1))
    stego, aux = iwt(bands[:, :12]), iwt(bands[:, 12:])
    assert torch.allclose(isn.hide(cover, secret), stego)
    assert not torch.allclose(stego, cover, atol=1e-2)
    assert torch.allclose(isn.reveal(stego, aux), secret, atol=1e-4)


@pytest.mark.parametrize("size", [32, 64])
def test_hide_and_reveal_keep_the_image_shape(size: int):
    isn = _small_isn()
    cover, secret = torch.rand(1, 3, size, size), torch.rand(1, 3, size, size)
    stego = isn.hide(cover, secret)
    assert stego.shape == cover.shape
    assert isn.reveal(stego, torch.rand_like(stego)).shape == secret.shape


def test_hide_refuses_mismatched_images():
    with pytest.raises(ValueError, match="two \\(N, 3, H, W\\) images of one shape"):
        _small_isn().hide(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


def test_loss_decreases_under_adam():
    torch.manual_seed(0)
    isn = _small_isn()
    cover, secret, key = (torch.rand(4, 3, 32, 32) for _ in range(3))
    opt = torch.optim.Adam(isn.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = isn_loss(isn, cover, secret, key)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_negative_key_term_is_a_hinge_on_the_wrong_key_reveal():
    isn = _small_isn()
    cover, secret, key = (torch.rand(1, 3, 16, 16) for _ in range(3))
    plain = isn_loss(isn, cover, secret, key)
    assert set(plain) == {"reveal", "stego", "low", "total"}
    # A fresh ISN is the identity, so a key equal to the secret reveals it perfectly.
    parts = isn_loss(isn, cover, secret, key, wrong_key=secret, neg_weight=2.0)
    assert parts["neg_key"].item() == pytest.approx(0.01)
    assert parts["total"].item() == pytest.approx(plain["total"].item() + 0.02, abs=1e-6)
    far = isn_loss(isn, cover, secret, key, wrong_key=1 - secret, neg_weight=2.0)
    assert far["neg_key"].item() == 0
