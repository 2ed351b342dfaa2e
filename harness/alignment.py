"""Neuron alignment, the defence against function-preserving attacks on white-box marks (after
Li et al., 2021): before a white-box method reads its mark, the suspect's hidden channels are
matched to the owner's marked model, so that a permutation, a positive rescaling or added
channels that cancel (the attacks `harness.equivalence` makes exact) are undone.

For every hidden channel chain both networks have (`harness.equivalence`, keyed by its
producers' module paths), the producers' outputs on the owner's probe images give one vector
per channel. Channels of the suspect whose vectors coincide (a copy and its duplicates, which
is what cancelling pairs of dummy neurons are) are merged: one representative keeps the
incoming weights and norm statistics, the consumers read the sum of their columns - exact, as
the copies compute the same signal. The merged channels are then matched one-to-one to the
owner's by the Hungarian method on their correlation (scipy's linear_sum_assignment; a
correlation is blind to positive scale), reordered, and, on chains a positive scaling passes
through, scaled back by the least-squares ratio of the two signals. A chain whose widths or
matching cannot be made to agree is left as it is, and counted.

General code for any white-box method (``align: true`` in its params, a verify-only parameter);
it needs the owner's marked model (``ctx.marked``) and a few of the owner's images.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from harness.equivalence import Chain, analyze, expand, scale_chain
from harness.plugin import Metric
from harness.training import as_float
from model_zoo.widen import resize_module, widths_of

PROBE = 128  # owner images whose signals match the suspect's neurons to the owner's
MERGE_CORR = 0.99999  # vectors this correlated and this close in norm are one channel
MERGE_NORM = 1e-3


@torch.no_grad()
def producer_signals(
    model: nn.Module, paths: list[str], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each producer's output on `x` as (channels, samples x positions), in fp32 on the CPU."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for path in paths:

        def keep(module, inputs, output, path=path):
            out[path] = output.detach().float().transpose(0, 1).reshape(output.shape[1], -1).cpu()

        hooks.append(model.get_submodule(path).register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def duplicate_groups(signals: torch.Tensor) -> list[list[int]]:
    """Channels whose signals coincide (correlation and norm), as groups in first-seen order."""
    n = len(signals)
    centred = signals - signals.mean(1, keepdim=True)
    norms = centred.norm(dim=1)
    unit = centred / norms.clamp_min(1e-12)[:, None]
    corr = unit @ unit.T
    raw = signals.norm(dim=1)
    close = (corr > MERGE_CORR) & (
        (raw[:, None] - raw[None, :]).abs() <= MERGE_NORM * raw.clamp_min(1e-12)[:, None]
    )
    close &= (norms[:, None] > 1e-8) & (norms[None, :] > 1e-8)  # a constant channel is itself
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(close, 1)).tolist():
        parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every row of `a` with every row of `b`."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@torch.no_grad()
def regroup_chain(model: nn.Module, chain: Chain, groups: list[list[int]]) -> None:
    """Make channel i of the chain the merge of `groups[i]`: the first member's incoming
    weights, norm statistics and depthwise filters; the consumers read the sum of the members'
    columns. Layers are resized when the count changes."""
    new = {}
    for slot in chain.slots(model):
        t = getattr(model.get_submodule(slot.path), slot.name).data
        if slot.role == "in":
            parts = [
                t.index_select(slot.dim, expand(torch.tensor(g, device=t.device), slot.inner))
                .unflatten(slot.dim, (len(g), slot.inner))
                .sum(slot.dim)
                for g in groups
            ]
            value = torch.cat(parts, slot.dim)
        else:
            first = torch.tensor([g[0] for g in groups], device=t.device)
            value = t.index_select(slot.dim, expand(first, slot.inner))
        new[(slot.path, slot.name)] = value.contiguous()
    old_width, width = chain.channels, len(groups)
    if width != old_width:
        for path in dict.fromkeys(chain.modules()):
            m = model.get_submodule(path)
            w = widths_of(m)
            if path in chain.producers:
                w["out"] = width
            if path in chain.through:
                depthwise = isinstance(m, nn.modules.conv._ConvNd)
                w = {"in": width, "out": width, "groups": width if depthwise else 1}
            for p, inner in chain.consumers:
                if p == path:
                    w["in"] += (width - old_width) * inner
            kept = {
                n: t.detach().clone()
                for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))
            }
            resize_module(m, **w)
            for name, old in kept.items():
                getattr(m, name).data.copy_(new.get((path, name), old))
    else:
        for (path, name), value in new.items():
            getattr(model.get_submodule(path), name).data.copy_(value)


@torch.no_grad()
def _row_similarity(reference, suspect, path: str, reps: list[int]) -> torch.Tensor:
    """Cosine similarity of the producer's incoming weights, reference rows x the suspect's
    representative rows: what tells apart channels whose signals on the probe are constant
    (a squeeze-excite's reduction on similar images). Upstream chains are aligned by now, so
    the rows' input order agrees; zeros where the widths still differ."""
    w_r = reference.get_submodule(path).weight.detach().float().cpu().flatten(1)
    w_s = suspect.get_submodule(path).weight.detach().float().cpu().flatten(1)[reps]
    if w_r.shape[1] != w_s.shape[1]:
        return torch.zeros(len(w_r), len(w_s))
    w_r = w_r / w_r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w_s = w_s / w_s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return w_r @ w_s.T


@torch.no_grad()
def _row_norm_ratio(reference, suspect, path: str) -> torch.Tensor:
    """Per channel, the norm of the suspect producer's incoming weights over the owner's
    (the chain is regrouped by now: same order and count)."""
    w_r = reference.get_submodule(path).weight.detach().float().cpu().flatten(1).norm(dim=1)
    w_s = suspect.get_submodule(path).weight.detach().float().cpu().flatten(1).norm(dim=1)
    return w_s / w_r.clamp_min(1e-12)


def align(
    suspect: nn.Module, reference: nn.Module, x: torch.Tensor, device
) -> tuple[nn.Module, dict[str, float]]:
    """A copy of `suspect` whose hidden channels are matched to `reference`'s on the probe
    images `x` (the suspect itself is not changed), and figures: chains aligned, chains left
    as they were, and the mean over channels of the best signal correlation an owner channel
    finds among the suspect's, over channels whose signal varies on the probe (1.0: every
    owner channel is there, however reordered)."""
    suspect = copy.deepcopy(suspect).to(device).eval()
    reference = reference.to(device).eval()
    probe = as_float(x, device)
    ref = {c.producers: c for c in analyze(reference, probe[:2]).chains}
    sus = {c.producers: c for c in analyze(suspect, probe[:2]).chains}
    common = [p for p in ref if p in sus]
    figures = {"aligned_chains": 0.0, "unaligned_chains": float(len(ref) - len(common))}
    if not common:
        figures["match_corr"] = float("nan")
        return suspect, figures
    position = {name: i for i, (name, _) in enumerate(reference.named_modules())}
    common.sort(key=lambda p: position[p[0]])  # upstream first: its producers' rows line up then
    first = [p[0] for p in common]
    r_sig = producer_signals(reference, first, probe)
    s_sig = producer_signals(suspect, first, probe)
    corrs = []
    for producers in common:
        r, s = r_sig[producers[0]], s_sig[producers[0]]
        groups = duplicate_groups(s)
        if len(groups) < len(r) or r.shape[1] != s.shape[1]:
            figures["unaligned_chains"] += 1
            continue
        reps = s[[g[0] for g in groups]]
        c = correlation(r, reps)
        varying = r.std(1) > 1e-6  # constant signals have no correlation to report
        if varying.any():
            corrs.append(float(c.max(1).values[varying].mean()))
        c = c + _row_similarity(reference, suspect, producers[0], [g[0] for g in groups])
        rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
        matched_groups = [
            groups[j] for _, j in sorted(zip(rows.tolist(), cols.tolist(), strict=True))
        ]
        chain = sus[producers]
        regroup_chain(
            suspect, chain, matched_groups
        )  # unmatched groups (extra channels) are dropped
        chain = dataclasses.replace(chain, channels=len(r))
        if chain.homogeneous:
            matched = reps[cols[rows.argsort()]]
            energy = (r * r).sum(1)
            ratio = (matched * r).sum(1) / energy.clamp_min(1e-12)
            silent = energy <= 1e-12 * energy.max().clamp_min(1e-12)  # a zero signal on the probe
            if silent.any():  # then the incoming weights' norms tell the scale
                ratio[silent] = _row_norm_ratio(reference, suspect, producers[0])[silent]
            if (ratio > 0).all():
                scale_chain(suspect, chain, 1.0 / ratio)
        figures["aligned_chains"] += 1
    figures["match_corr"] = sum(corrs) / len(corrs) if corrs else float("nan")
    return suspect, figures


# what a white-box method with `align` reports beside its own figures
ALIGN_METRICS = (
    Metric("aligned_chains", "align: hidden chains matched to the marked model", None,
           optional=True),
    Metric("unaligned_chains", "align: hidden chains left as they were", None, optional=True),
    Metric("match_corr", "align: mean best signal correlation of the owner's channels", None,
           optional=True),
)  # fmt: skip


def aligned_suspect(model: nn.Module, ctx, enabled: bool) -> tuple[nn.Module, dict[str, float]]:
    """For a white-box method's `verify`: the suspect aligned to the marked model when `enabled`
    (its `align` parameter) and the suspect is not the marked model itself (embed's own check
    has no `ctx.marked`), with the figures of `ALIGN_METRICS`; else the suspect as it is."""
    if not enabled or ctx.marked is None:
        return model, {}
    return align(model, ctx.marked.model(), ctx.data.owner.x[:PROBE], ctx.device)
