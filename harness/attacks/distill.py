"""Surrogate distillation / model extraction: a fresh student of any architecture trained on
the marked model's answers over the attacker split (whose true labels it never uses), asked
through the owner's served API (`ctx.query`: what a method like DAWN alters, it sees)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.attacks.base import Attack, Attacked, register
from harness.training import fit, kd_loss
from model_zoo import check_arch


class DistillParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student_arch: str | None = Field(
        None, description="timm / model_zoo name; default: the victim's"
    )
    epochs: int = Field(5, ge=1)
    lr: float | None = Field(None, gt=0, description="default: train.lr")
    temperature: float = Field(4.0, gt=0)
    hard_labels: bool = False
    query_budget: int | None = Field(None, ge=1, description="max attacker images queried")

    @field_validator("student_arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        if v is not None:
            check_arch(v)  # a ConfigError (a ValueError) keeps its hint through pydantic
        return v


@register("distill")
class Distill(Attack):
    Params = DistillParams
    queries_api = True
    version = "2"  # 1 ignored `epochs`

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1, "student_arch": "lenet"}

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker.take(p.query_budget, seed=ctx.seed)
        teacher_logits = ctx.query(model, data.x)  # the deployment's answers, as served
        # a plain student: a method's wrapper (passport layers, a barrier) is not copied
        spec = ctx.spec.replace(
            arch=p.student_arch or ctx.spec.arch, wrapper=None, wrapper_params=None
        )
        student = ctx.create_model(spec)
        if p.hard_labels:
            targets, loss = teacher_logits.argmax(1), F.cross_entropy
        else:
            targets, loss = teacher_logits, kd_loss(p.temperature)
        fit(
            student,
            data.x,
            targets,
            ctx.train,
            ctx.device,
            ctx.seed,
            epochs=p.epochs,
            lr=p.lr,
            loss_fn=loss,
        )
        return Attacked(student, spec)
