"""Collusion by averaging (the attack DeepMarks' anti-collusion codes answer): k licensed
users pool their fingerprinted copies and average the weights.

The marked model (the cell's user) and the first k - 1 other licensed copies the method handed
out (`ctx.marked.copy_names()`, `Embedded.copies`) are averaged entry by entry: every float
tensor of the state dict, BatchNorm running statistics included; integer buffers
(`num_batches_tracked`) are the marked model's. Fewer copies than k - 1 fail the cell. The
evidence names the copies averaged (`{"copies": [...]}`, artifacts only) so that the method
can count the colluders it traces; the row carries `k`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.errors import CellFailed, ConfigError


class ColludeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(2, ge=2, le=512, description="colluders: the marked copy and k - 1 others")


@torch.no_grad()
def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Entry-wise mean of float tensors; anything else is taken from the first state."""
    out = {}
    for name, first in states[0].items():
        if torch.is_floating_point(first):
            out[name] = torch.stack([s[name].to(first.device, torch.float32) for s in states])
            out[name] = out[name].mean(0).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


@register("collude")
class Collude(Attack):
    Params = ColludeParams
    methods = ("deepmarks",)  # only models handed out with licensed copies
    metrics = (Metric("k", "copies averaged (the marked one and k - 1 licensed others)", None),)

    @classmethod
    def tiny_params(cls) -> dict:
        return {"k": 2}

    def check_method(self, method) -> None:
        users = getattr(method.params, "n_users", None)
        if users is not None and self.params.k > users:
            raise ConfigError(
                f"k={self.params.k} colluders need {self.params.k} licensed copies; "
                f"{method.name} hands out n_users={users}",
                field="k",
                value=self.params.k,
                allowed=f"2 to {users} (or raise the method's n_users)",
            )

    def apply(self, model, ctx) -> Attacked:
        k = self.params.k
        names = ctx.marked.copy_names() if ctx.marked is not None else []
        if len(names) < k - 1:
            raise CellFailed(
                f"collude k={k} needs {k - 1} other licensed copies; the marked model comes "
                f"with {len(names)}"
            )
        names = names[: k - 1]
        states = [model.state_dict()] + [ctx.marked.copy(n).state_dict() for n in names]
        model.load_state_dict(average_states(states))
        return Attacked(model, evidence={"copies": names}, metrics={"k": float(k)})
