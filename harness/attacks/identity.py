"""No change: the control column every grid needs."""

from __future__ import annotations

from harness.attacks.base import Attack, Attacked, register


@register("identity")
class Identity(Attack):
    tasks = ("classification", "image2image")

    def apply(self, model, ctx):
        return Attacked(model)
