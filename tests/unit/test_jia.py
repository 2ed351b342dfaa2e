"""Entangled watermarks: the soft nearest-neighbour loss and the layers it entangles."""

from __future__ import annotations

import math

import timm
import torch

from harness.methods.jia import feature_blocks, snnl


def test_snnl_is_low_for_separated_groups_and_near_log2_for_entangled_ones():
    torch.manual_seed(0)
    groups = torch.tensor([0] * 16 + [1] * 16)
    apart = torch.cat([torch.randn(16, 8) * 0.01 + 5, torch.randn(16, 8) * 0.01 - 5])
    mixed = torch.randn(32, 8)
    t = torch.tensor(0.5)
    low, high = snnl(apart, groups, t), snnl(mixed, groups, t)
    assert low < 0.05  # every neighbour is of the same group
    assert abs(high - math.log(2)) < 0.25  # half the neighbours of either group
    h = mixed.clone().requires_grad_(True)
    snnl(h, groups, t).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0  # it trains the features


def test_feature_blocks_are_the_last_blocks_before_the_classifier():
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    blocks = feature_blocks(model, 3)
    assert blocks == [model.layer3, model.layer4, model.global_pool]
