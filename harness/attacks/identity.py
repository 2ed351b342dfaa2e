"""No change: the control column every grid needs."""

from __future__ import annotations

from harness.attacks import Attack, register


@register("identity")
class Identity(Attack):
    tasks = ("classification", "image2image")

    def apply(self, model, ctx):
        return model, ctx.spec
