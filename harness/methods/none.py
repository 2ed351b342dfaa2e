"""The control: no watermark, nothing to verify."""

from __future__ import annotations

from harness.methods.base import Embedded, Method, WatermarkScore, register


@register("none")
class NoWatermark(Method):
    tasks = ("classification", "image2image")

    def embed(self, victim, ctx) -> Embedded:
        return Embedded(victim)

    def verify(self, model, key, ctx) -> WatermarkScore:
        return WatermarkScore(score=None, detected=False)
