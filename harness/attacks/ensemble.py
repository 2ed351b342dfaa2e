"""Ensemble extraction (WRT's `wrt/attacks/removal/ensemble.py`, config `ensemble.yaml`):
the attacker split (or `query_budget` images of it) is cut into `k` disjoint parts (WRT:
three thirds); on each a fresh student (`student_arch`, default the victim's) learns the
deployment's answers, asked through the served API (`ctx.query`) with `distill`'s recipe;
the attacked model is the members' average: it answers log(mean of their softmax outputs),
whose softmax is that mean. Each part must hold at least one image per class.

The store keeps one state dict and a spec with the `ensemble` wrapper (registered here):
`model_zoo.create_model` rebuilds the k members from the spec (`wrapper_params`: {"k": k})
before the weights are loaded.

Departures from WRT:
- aggregation: WRT does not code one; the members' softmax outputs are averaged;
- labels: soft answers with distill's T^2 KL + CE(argmax) at T = 1, or `hard_labels` (WRT:
  the predicted labels with label smoothing 0.2, which distill's recipe does not offer);
- epochs: WRT trains 60 epochs, as long as its victims; here the default is the scenario's
  `train.epochs`, with the scenario's optimiser and cosine schedule;
- data: the attacker split (WRT's config names all of CIFAR-10's training set).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.retrain import RetrainParams, on_split, student_recipe
from harness.data import ROOT_DATASETS, Split, load_splits
from harness.errors import CellFailed, ConfigError
from model_zoo import WRAPPERS, ModelSpec, create_model


class EnsembleParams(RetrainParams):  # each member is retrained: retrain's defaults
    k: int = Field(3, ge=2, le=100, description="members, each on a disjoint 1/k (WRT: 3)")


class Ensemble(nn.Module):
    """Members answering together: log of the mean of their softmax outputs."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()  # no -inf for CE / KL


def ensemble_wrapper(model: nn.Module, spec: ModelSpec, k: int) -> nn.Module:
    """The `ensemble` ModelSpec wrapper: `model` (built from `spec.arch`) and k - 1 more
    members of the same plain spec, for the stored state dict to fill."""
    member = spec.replace(wrapper=None, wrapper_params=None)
    return Ensemble([model, *(create_model(member) for _ in range(k - 1))])


WRAPPERS.register("ensemble")(ensemble_wrapper)


@register("ensemble")
class EnsembleAttack(Attack):
    Params = EnsembleParams
    queries_api = True
    version = "1"
    metrics = (Metric("k", "members averaged, each trained on a disjoint 1/k", None),)

    @classmethod
    def tiny_params(cls) -> dict:
        return {"k": 2, "epochs": 1, "student_arch": "lenet"}

    def check_data(self, dataset) -> None:
        if dataset.name in ROOT_DATASETS:
            return  # its size is known once loaded: `apply` checks it then
        splits = load_splits(dataset)  # shipped or generated: cheap, and cached
        n = len(splits.attacker.take(self.params.query_budget))
        if problem := self.too_few(n, splits.num_classes):
            raise ConfigError(problem, field="k", value=self.params.k,
                              allowed=f"2 to {max(2, n // splits.num_classes)}")  # fmt: skip

    def too_few(self, n: int, num_classes: int) -> str | None:
        """Why n attacker images cannot feed k members (None: they can): a member should be
        able to see every class at least once."""
        k = self.params.k
        if n // k >= num_classes:
            return None
        return (
            f"k={k} members would learn from {n // k} attacker images each (of {n} queried); "
            f"each needs at least one per class ({num_classes})"
        )

    def apply(self, model, ctx):
        p = self.params
        split = ctx.data.attacker.take(p.query_budget, seed=ctx.seed)
        if problem := self.too_few(len(split), ctx.data.num_classes):
            raise CellFailed(problem)
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(ctx.seed))
        recipe = student_recipe(p, epochs=p.epochs or ctx.train.epochs)
        members, spec = [], None
        for i, part in enumerate(order.tensor_split(p.k)):
            # each member: its own part, asked through the served API, its own batch order
            part_ctx = on_split(ctx, Split(split.x[part], split.y[part]), seed=ctx.seed + i)
            out = recipe.apply(model, part_ctx)
            members.append(out.model)
            spec = out.spec
        spec = spec.replace(wrapper="ensemble", wrapper_params={"k": p.k})
        return Attacked(Ensemble(members), spec, metrics={"k": float(p.k)})
