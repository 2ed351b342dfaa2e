"""Input noising (Zantedeschi et al., arXiv 1707.06728; WRT's `input_noising.py`): the
deployment adds Gaussian noise N(0, sigma^2) to every pixel of every query and clips the
result to [0, 1], which drowns low-amplitude trigger patterns. The weights are untouched
(an `InputAttack`).

As in WRT the noise is drawn afresh for every query (asking twice gives two answers). Here it
comes from a stream seeded by `seed` (`FreshDraws`): a rebuilt deployment replays the same
sequence of draws, so a cell's row is reproducible, while no two queries of a run share noise.
WRT draws from numpy's global generator; its sigma (0.01; variants 0.03, 0.05, 0.1) is kept.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import InputAttack, register


class InputNoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigma: float = Field(
        0.01, ge=0, le=1, description="noise std on [0, 1] images (WRT: 0.01; 0.03, 0.05, 0.1)"
    )
    seed: int = Field(0, ge=0, description="seeds the stream of per-query draws")


class FreshDraws:
    """A transform's random stream: one `torch.Generator` per device, seeded with `seed` on
    first use and advancing with every batch drawn from it - fresh draws for each query, the
    same sequence in every rebuild of the deployment."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def __call__(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if str(device) not in self._generators:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[str(device)] = gen
        return self._generators[str(device)]


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """`x` plus N(0, sigma^2) per pixel, clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma * noise).clamp_(0, 1)


@register("input_noise")
class InputNoise(InputAttack):
    Params = InputNoiseParams

    def __init__(self, params: dict | None = None) -> None:
        super().__init__(params)
        self.draws = FreshDraws(self.params.seed)

    def transform(self, x, modules):
        return add_noise(x, self.params.sigma, self.draws(x.device))
