"""No change: the control column every grid needs."""

from __future__ import annotations

from harness.attacks import Attack, register


@register("identity")
class Identity(Attack):
    def apply(self, model, ctx):
        return model, ctx.spec
