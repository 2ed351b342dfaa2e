"""Neuron alignment undoes each function-preserving attack exactly: after `align`, the
suspect's weights equal the owner's (within float error) on lenet, resnet10t and
mobilenetv3 - and a fine-tuned copy still aligns to itself."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.alignment import align, duplicate_groups
from harness.equivalence import analyze, permute_chain, scale_chain, widen_chain
from model_zoo import ModelSpec, create_model

ARCHS = ["lenet", "resnet10t", "mobilenetv3_small_050"]


def _owner(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch, 10, 3, 32))
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    return model.eval()


def _attacked(model, kind: str):
    suspect = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for chain in analyze(suspect, torch.rand(2, 3, 32, 32)).chains:
        if kind == "permute":
            permute_chain(suspect, chain, torch.randperm(chain.channels, generator=g))
        elif kind == "rescale" and chain.homogeneous:
            factors = torch.empty(chain.channels).uniform_(-0.7, 0.7, generator=g).exp()
            scale_chain(suspect, chain, factors)
        elif kind == "dummy":
            k = max(1, chain.channels // 10)
            source = torch.randperm(chain.channels, generator=g)[:k]
            widen_chain(suspect, chain, source, torch.rand(k, generator=g) + 0.5)
    return suspect.eval()


def _max_weight_gap(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    gaps = [
        (sa[k].float() - sb[k].float()).abs().max().item()
        for k in sa
        if sa[k].is_floating_point() and sa[k].numel()
    ]
    return max(gaps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["permute", "rescale", "dummy"])
def test_align_recovers_the_owners_weights(arch, kind):
    owner = _owner(arch)
    suspect = _attacked(owner, kind)
    x = torch.rand(64, 3, 32, 32)
    if kind != "rescale":
        assert _max_weight_gap(owner, suspect) > 1e-3 if kind == "permute" else True
    aligned, figures = align(suspect, owner, x, "cpu")
    assert figures["aligned_chains"] > 0 and figures["match_corr"] > 0.999
    assert _max_weight_gap(owner, aligned) < 1e-3, figures
    with torch.no_grad():
        assert torch.allclose(owner(x), aligned(x), atol=1e-4)
    assert suspect is not aligned  # the suspect itself is left as it was


def test_duplicates_are_grouped_and_distinct_channels_are_not():
    torch.manual_seed(0)
    s = torch.randn(5, 200)
    s = torch.cat([s, s[1:2], s[3:4], s[1:2]])
    assert duplicate_groups(s) == [[0], [1, 5, 7], [2], [3, 6], [4]]
    assert duplicate_groups(torch.cat([s[:1], 2 * s[:1]])) == [[0], [1]]  # scaled: not a copy
