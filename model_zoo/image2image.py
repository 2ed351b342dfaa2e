"""Image-to-image networks of output watermarking (AAAI 2020 / TPAMI 2021), written from the paper.

The owner's side: the barrier H is a pix2pix-style `UNet` fed concat(B, delta), the extractor R is
`Extractor`, the adversary D is `PatchDiscriminator`. The attacker's surrogate families (same-size
image out) are `CNet`, `ResNetGenerator` (9 or 16 blocks), `UNet` and `TimmUNet` (a U-Net decoder
on any timm CNN encoder); `create_image2image` builds them by name for a grid axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.errors import ConfigError, UnknownNameError
from harness.registry import close_match


def init_normal(module: nn.Module, std: float = 0.02) -> nn.Module:
    """The paper's init: conv weights N(0, std), norm scales N(1, std), every bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return module


def conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """3x3 same-size conv, BatchNorm, ReLU: the unit of CNet and of the timm U-Net decoder."""
    conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def check_multiple(x: torch.Tensor, multiple: int, net: str) -> None:
    """Stride-2 nets only restore the input size (and align their skips) on multiples."""
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{net} needs height and width that are multiples of {multiple}, got {h}x{w}: "
            f"resize or crop the input to a multiple of {multiple}"
        )


# ---------------------------------------------------------------------------- U-Net (H, surrogate)


def unet_min_size(depth: int) -> int:
    """Each of the `depth` 4x4 stride-2 convs halves the side; the innermost one reaches 1x1."""
    return 2**depth


def _unet_width(base: int, level: int) -> int:
    return base * min(2**level, 8)


def _unet_down(cin: int, cout: int, level: int, depth: int) -> nn.Sequential:
    """Outermost: bare conv; innermost (1x1 map): no norm; between: LeakyReLU, conv, BN."""
    layers: list[nn.Module] = [] if level == 0 else [nn.LeakyReLU(0.2)]
    norm = 0 < level < depth - 1
    layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm))
    return nn.Sequential(*layers, *([nn.BatchNorm2d(cout)] if norm else []))


def _unet_up(cin: int, cout: int, level: int) -> nn.Sequential:
    """ReLU, 4x4 stride-2 transposed conv, then BN; the outermost ends in a sigmoid instead."""
    outer = level == 0
    up = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=outer)
    return nn.Sequential(nn.ReLU(), up, nn.Sigmoid() if outer else nn.BatchNorm2d(cout))


class UNet(nn.Module):
    """pix2pix U-Net; depth 5 is the paper code's (inputs >= 32x32, multiples of 32)."""

    def __init__(self, in_ch: int, out_ch: int, base: int = 64, depth: int = 5) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"`depth` must be at least 1 but got {depth}.")
        self.depth = depth
        widths = [_unet_width(base, i) for i in range(depth)]
        self.downs = nn.ModuleList(
            _unet_down(([in_ch] + widths)[i], widths[i], i, depth) for i in range(depth)
        )
        self.ups = nn.ModuleList(
            _unet_up(widths[i] * (1 if i == depth - 1 else 2), ([out_ch] + widths)[i], i)
            for i in range(depth)
        )
        init_normal(self)

    def check_input(self, x: torch.Tensor) -> None:
        size = unet_min_size(self.depth)
        if min(x.shape[-2:]) < size:
            raise ValueError(
                f"UNet of depth {self.depth} needs inputs of at least {size}x{size} "
                f"(unet_min_size({self.depth})), got {tuple(x.shape[-2:])}: "
                "use a smaller depth or a larger input"
            )
        check_multiple(x, size, f"UNet of depth {self.depth}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        for level in reversed(range(self.depth)):
            x = self.ups[level](x)
            if level:
                x = torch.cat([x, skips[level - 1]], dim=1)
        return x


# ------------------------------------------------------------------------------- Extractor R


def _conv_in_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2)
    return nn.Sequential(conv, nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True))


class DilatedResBlock(nn.Module):
    """Two dilated 3x3 convs with InstanceNorm and an identity shortcut: wide context, same size."""

    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation),
            nn.InstanceNorm2d(ch, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation),
            nn.InstanceNorm2d(ch, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


EXTRACTOR_DILATIONS = (2, 2, 2, 2, 4, 4, 4, 4, 1)


class Extractor(nn.Module):
    """R: 3 convs (the last stride 2), 9 dilated residual blocks, resize-conv back, ReLU out.

    Upsampling resizes to the input's exact size, so any input of at least 2x2 comes back whole.
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, base: int = 64) -> None:
        super().__init__()
        self.head = nn.Sequential(
            _conv_in_relu(in_ch, base), _conv_in_relu(base, base), _conv_in_relu(base, base, 4, 2)
        )
        self.blocks = nn.Sequential(*(DilatedResBlock(base, d) for d in EXTRACTOR_DILATIONS))
        self.up = _conv_in_relu(base, base)
        self.tail = nn.Sequential(
            _conv_in_relu(base, base), nn.Conv2d(base, out_ch, 1), nn.ReLU(inplace=True)
        )
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.head(x))
        h = self.up(F.interpolate(h, size=x.shape[-2:], mode="nearest"))
        return self.tail(h)


# --------------------------------------------------------------------------- Discriminator D


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4 stride-2 blocks and a 4x4 stride-1 conv to one logit per patch (no sigmoid).

    Outputs (N, 1, 1, 1) at 32x32 and (N, 1, 3, 3) at 64x64; 32x32 is the smallest input.
    """

    def __init__(self, in_ch: int, base: int = 64) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(4)]
        ins = [in_ch] + widths[:-1]
        pairs = enumerate(zip(ins, widths, strict=True))
        blocks = [self._block(c, w, norm=i > 0) for i, (c, w) in pairs]
        self.net = nn.Sequential(*blocks, nn.Conv2d(widths[-1], 1, 4, padding=1))
        init_normal(self)

    @staticmethod
    def _block(cin: int, cout: int, norm: bool) -> nn.Sequential:
        conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm)
        bn = [nn.BatchNorm2d(cout)] if norm else []
        return nn.Sequential(conv, *bn, nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------- Surrogate families


class CNet(nn.Module):
    """Plain CNN: `n_layers` 3x3 convs without down-sampling, all but the last conv-BN-ReLU."""

    def __init__(self, in_ch: int, out_ch: int, base: int = 64, n_layers: int = 8) -> None:
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"`n_layers` must be at least 2 but got {n_layers}.")
        hidden = [conv_bn_relu(in_ch if i == 0 else base, base) for i in range(n_layers - 1)]
        self.net = nn.Sequential(*hidden, nn.Conv2d(base, out_ch, 3, padding=1), nn.Sigmoid())
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResBlock(nn.Module):
    """CycleGAN residual block: reflection-padded 3x3 conv, BN, ReLU, again, identity shortcut."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=False), nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=False), nn.BatchNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _down(cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResNetGenerator(nn.Module):
    """CycleGAN-style ResNet generator that learns the residual: out = clamp(x + net(x), 0, 1).

    Two stride-2 stages, so inputs must be multiples of 4; in_ch must equal out_ch.
    """

    def __init__(self, in_ch: int, out_ch: int, base: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        if in_ch != out_ch:
            raise ValueError(
                f"ResNetGenerator adds its output to its input, so in_ch ({in_ch}) must equal "
                f"out_ch ({out_ch}): use 'unet', 'cnet' or 'timm_unet:<name>' to change channels"
            )
        stem = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_ch, base, 7, bias=False), nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
        )
        body = [ResBlock(4 * base) for _ in range(n_blocks)]
        out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(base, out_ch, 7))
        self.net = nn.Sequential(
            stem, _down(base, 2 * base), _down(2 * base, 4 * base), *body,
            _up(4 * base, 2 * base), _up(2 * base, base), out,
        )
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple(x, 4, "ResNetGenerator")
        return (x + self.net(x)).clamp(0.0, 1.0)


class TimmUNet(nn.Module):
    """U-Net decoder on a timm CNN encoder (`features_only`, never pretrained), sigmoid out.

    Each decoder stage resizes to its skip's size, so any encoder reduction schedule and any
    input size the encoder accepts comes back at the input size; the input itself is the last
    skip, which gives the full-resolution detail an image-to-image task needs.
    """

    def __init__(self, encoder_name: str, in_ch: int = 3, out_ch: int = 3, base: int = 32) -> None:
        super().__init__()
        check_timm_name(encoder_name)
        self.encoder = timm.create_model(
            encoder_name, pretrained=False, features_only=True, in_chans=in_ch
        )
        chans = self.encoder.feature_info.channels()
        widths = [base * 2**i for i in range(len(chans) - 1)]
        ins = [w + c for w, c in zip(widths[1:] + chans[-1:], chans[:-1], strict=True)]
        self.decoder = nn.ModuleList(self._stage(i, w) for i, w in zip(ins, widths, strict=True))
        self.head = nn.Sequential(
            conv_bn_relu((widths or chans)[0] + in_ch, base), nn.Conv2d(base, out_ch, 1),
            nn.Sigmoid(),
        )
        init_normal(self.decoder)
        init_normal(self.head)

    @staticmethod
    def _stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        h = feats[-1]
        for stage, skip in zip(reversed(self.decoder), reversed(feats[:-1]), strict=True):
            h = stage(torch.cat([_resize(h, skip), skip], dim=1))
        return self.head(torch.cat([_resize(h, x), x], dim=1))


def _resize(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(h, size=like.shape[-2:], mode="bilinear", align_corners=False)


def check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        raise UnknownNameError(
            "unknown timm encoder for 'timm_unet:<timm name>'",
            value=name,
            hint=close_match(name, timm.list_models()),
            allowed="any CNN in timm.list_models() that supports features_only",
        )


# ------------------------------------------------------------------------------------ factory

IMAGE2IMAGE: dict[str, Callable[..., nn.Module]] = {
    "cnet": CNet,
    "resnet9": functools.partial(ResNetGenerator, n_blocks=9),
    "resnet16": functools.partial(ResNetGenerator, n_blocks=16),
    "unet": UNet,
}
TIMM_PREFIX = "timm_unet:"


WIDTH_SEP = "@"  # "unet@16": the family at base width 16 (paper widths: 64; timm_unet: 32)


def list_image2image() -> list[str]:
    return sorted(IMAGE2IMAGE) + [f"{TIMM_PREFIX}<timm name>", f"<any of these>{WIDTH_SEP}<width>"]


def _parse(name: str) -> tuple[str, dict]:
    family, sep, width = name.partition(WIDTH_SEP)
    if not sep:
        return family, {}
    if not width.isdigit() or not 1 <= int(width) <= 1024:
        raise UnknownNameError(
            f"the base width after {WIDTH_SEP!r} must be an integer in 1..1024",
            value=name,
            allowed=list_image2image(),
        )
    return family, {"base": int(width)}


def check_image2image(name: str) -> None:
    """Fail early on an unknown family, timm encoder or width (no network is built)."""
    family, _ = _parse(name)
    if family.startswith(TIMM_PREFIX):
        return check_timm_name(family.removeprefix(TIMM_PREFIX))
    if family not in IMAGE2IMAGE:
        raise UnknownNameError(
            "unknown image-to-image network",
            value=name,
            hint=close_match(family, sorted(IMAGE2IMAGE)),
            allowed=list_image2image(),
        )


@functools.lru_cache(maxsize=64)  # a grid names the same network many times
def check_image_size(name: str, size: int, channels: int = 3) -> None:
    """Fail early where a network cannot take `size` x `size` images (a U-Net's depth, a
    stride schedule): one eval-mode forward of a blank image, before any task starts."""
    net = create_image2image(name, channels, channels).eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, channels, size, size))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"{name!r} cannot take {size}x{size} images ({e}); change dataset.image_size or "
            "the network",
            value=name,
        ) from None


def create_image2image(name: str, in_ch: int, out_ch: int, **kw) -> nn.Module:
    """A freshly initialised network by name ("unet", "resnet9@16", "timm_unet:resnet18");
    `kw` goes to its constructor."""
    check_image2image(name)
    family, width = _parse(name)
    if family.startswith(TIMM_PREFIX):
        return TimmUNet(family.removeprefix(TIMM_PREFIX), in_ch, out_ch, **{**width, **kw})
    return IMAGE2IMAGE[family](in_ch, out_ch, **{**width, **kw})


# ------------------------------------------------------------------------ the marked model


class Barrier(nn.Module):
    """M followed by the barrier H: a(A) -> H(concat(M(A), delta)), the model the owner serves.

    The watermark image `delta` is a buffer (it is in the served network's weights anyway); the
    extractor R that recovers it is the owner's secret and lives apart from this module.
    """

    def __init__(self, base: nn.Module, channels: int, size: int, width: int, depth: int) -> None:
        super().__init__()
        self.base = base
        self.barrier = UNet(2 * channels, channels, base=width, depth=depth)
        self.register_buffer("delta", torch.zeros(1, channels, size, size))

    def hide(self, b: torch.Tensor) -> torch.Tensor:
        """H alone: watermark processed images `b` (what is trained against M's outputs)."""
        return self.barrier(torch.cat([b, self.delta.expand(len(b), -1, -1, -1)], dim=1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.hide(self.base(a).clamp(0, 1))


def barrier_wrapper(model: nn.Module, spec, width: int = 64, depth: int = 5) -> Barrier:
    return Barrier(model, spec.in_chans, spec.img_size, width, depth)
