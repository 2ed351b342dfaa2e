"""The CUDA path of the training loop (bf16 autocast, channels_last); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from harness.config import TrainCfg
from harness.data import Split
from harness.training import accuracy, fit, prepare
from model_zoo import ModelSpec, create_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_amp_training_on_cuda_learns_and_stays_finite():
    torch.manual_seed(0)
    y = torch.arange(512) % 4
    x = (y.view(-1, 1, 1, 1).float() / 3 * 255).expand(-1, 3, 32, 32).to(torch.uint8).contiguous()
    model = prepare(create_model(ModelSpec("resnet10t", 4, 3, 32)), "cuda")
    stats = fit(model, x, y, TrainCfg(epochs=3, batch_size=64, lr=0.05), "cuda", 0)
    assert next(model.parameters()).is_cuda
    assert stats["loss"] == stats["loss"]  # finite, not NaN
    assert accuracy(model, Split(x, y), "cuda") > 0.9
