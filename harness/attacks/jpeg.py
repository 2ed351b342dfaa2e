"""JPEG compression of every query (Dziugaite et al., arXiv 1608.00853; WRT's
`jpeg_compression`): the deployment encodes each input image as a JPEG of `quality` and decodes
it before the model sees it, which wipes out high-frequency patterns a trigger may rely on. The
weights are untouched (an `InputAttack`).

WRT encodes with PIL at quality 95 (its variants 65 and 45); here torchvision's libjpeg
encoder (`torchvision.io.encode_jpeg`) at the same quality scale, on the 8-bit image the query
rounds to. Greyscale images are encoded as one channel.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision.io import decode_jpeg, encode_jpeg

from harness.attacks.base import InputAttack, register


class JpegParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality (WRT: 95; 65, 45)")


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image of `x` (float in [0, 1], N x C x H x W) through a JPEG round trip."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
    images = x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    encoded = encode_jpeg(list(images), quality=quality)
    decoded = decode_jpeg(encoded)
    return torch.stack(decoded).to(x.device, torch.float32).div_(255)


@register("jpeg")
class Jpeg(InputAttack):
    Params = JpegParams

    def transform(self, x, modules):
        return jpeg(x, self.params.quality)
