"""Retraining (Tramèr et al., USENIX Security 2016, arXiv 1609.02943; WRT's
`wrt/attacks/removal/retraining.py`, configs `retraining.yaml` and
`cross_architecture_retraining.yaml`): a fresh model of any architecture trained from scratch
on the deployment's soft answers (asked through the served API, `ctx.query`) over the
attacker split. Its true labels are never used.

This is `distill` with WRT's retraining defaults, so it is a subclass of it (`Distill.apply`
is the one student recipe of every extraction attack here); `knockoff` and `ensemble` extend
these parameters, and the helpers below let them run the recipe on other queries. The
student's architecture is `arch` (as WRT's cross-architecture retraining names it) or, as in
`distill`, `student_arch`; rows record it as `student_arch`.

Departures from WRT:
- the loss: distill's `T^2 KL(soft) + CE(argmax)` at T = 1 (WRT: cross-entropy on the
  softmax answers alone); the KL term is that cross-entropy less the answers' entropy, a
  constant, so only the extra hard-label term differs;
- epochs: WRT trains 60 epochs on all 50,000 CIFAR-10 images, as long as its victims were
  trained; here the default is the scenario's `train.epochs` (as long as the victim here),
  on the attacker split only (the one split an attack may use);
- optimiser and schedule: the scenario's (`train`, cosine), not SGD 0.1 with MultiStepLR.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import AliasChoices, BaseModel, Field

from harness.attacks.base import register
from harness.attacks.distill import Distill, DistillParams
from harness.context import Context
from harness.data import Split


class RetrainParams(DistillParams):
    student_arch: str | None = Field(
        None,
        validation_alias=AliasChoices("arch", "student_arch"),
        description="`arch` (or `student_arch`): timm / model_zoo name; default: the victim's",
    )
    epochs: int | None = Field(None, ge=1, description="default: train.epochs (WRT: 60)")
    temperature: float = Field(1.0, gt=0, description="soft labels: the answers' softmax")


@register("retrain")
class Retrain(Distill):
    Params = RetrainParams
    version = "1"

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1}


# ------------------------------------------------------------- the recipe on other queries


def on_split(ctx: Context, split: Split, **changes) -> Context:
    """`ctx` with `split` as the attacker's data (and any other field changed): how an attack
    hands a part of its split, or a set of other images, to a recipe that reads the split."""
    return dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, attacker=split), **changes)


class Replay:
    """Answers already bought: stands in for the served API where an attack has asked its
    queries itself (to choose them), so the recipe trains on them without asking twice."""

    def __init__(self, x: torch.Tensor, answers: torch.Tensor) -> None:
        self.x, self.answers = x, answers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.equal(x, self.x):
            raise RuntimeError("a replayed API answers only the queries it was bought for")
        return self.answers


def student_recipe(params: BaseModel, **changes) -> Distill:
    """A `distill` attack with the student fields of `params` (a DistillParams subclass's
    values; `changes` override them): the recipe every extraction attack here trains with."""
    fields = {k: getattr(params, k) for k in DistillParams.model_fields if k != "query_budget"}
    return Distill({**fields, **changes})


def train_on_answers(model, ctx: Context, x: torch.Tensor, answers: torch.Tensor, params, **kw):
    """`student_recipe(params, **kw)` trained on queries `x` the attacker already asked
    (`answers`: the served ones); returns its `Attacked`."""
    split = Split(x, answers.argmax(1))
    return student_recipe(params, **kw).apply(model, on_split(ctx, split, api=Replay(x, answers)))
