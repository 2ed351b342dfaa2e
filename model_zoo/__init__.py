"""Networks only: `create_model` over timm (never pretrained) plus the project's own nets."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import timm
import torch.nn as nn

from harness.errors import UnknownNameError
from harness.registry import Registry, close_match
from model_zoo.image2image import barrier_wrapper, check_image2image, create_image2image
from model_zoo.passport import passport_wrapper
from model_zoo.widen import widened_wrapper

OWN_MODELS: Registry = Registry("model_zoo network")
# name -> fn(model, spec, **wrapper_params) -> model: structure a method adds to a network
# (passport layers, a watermark barrier), rebuilt here before stored weights are loaded.
WRAPPERS: Registry = Registry("model wrapper")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network before loading its weights."""

    arch: str
    num_classes: int  # 0: an image-to-image network (`arch` names a model_zoo.image2image net)
    in_chans: int
    img_size: int
    wrapper: str | None = None  # a WRAPPERS entry applied after building `arch` (e.g. passports)
    wrapper_params: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> ModelSpec:
        return ModelSpec(**{**self.to_dict(), **changes})


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    return frozenset(timm.list_models())


def list_archs() -> list[str]:
    return sorted(_timm_names() | set(OWN_MODELS.list()))


def check_arch(name: str, image2image: bool = False) -> None:
    if image2image:
        return check_image2image(name)
    if name in OWN_MODELS or name in _timm_names():
        return
    raise UnknownNameError(
        "unknown architecture (any timm model name or a model_zoo network)",
        value=name,
        hint=close_match(name, list_archs()),
        allowed=f"timm.list_models() ({len(_timm_names())} names) or {OWN_MODELS.list()}",
    )


def _fixed_input_size(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def create_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised network; `img_size` goes to timm only where its input is fixed."""
    model = _create_base(spec)
    if spec.wrapper is not None:
        model = WRAPPERS.get(spec.wrapper)(model, spec, **(spec.wrapper_params or {}))
    return model


def _create_base(spec: ModelSpec) -> nn.Module:
    if spec.num_classes == 0:
        return create_image2image(spec.arch, spec.in_chans, spec.in_chans)
    check_arch(spec.arch)
    if spec.arch in OWN_MODELS:
        return OWN_MODELS.get(spec.arch)(spec)
    kwargs = {"img_size": spec.img_size} if _fixed_input_size(spec.arch) else {}
    return timm.create_model(
        spec.arch, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_chans, **kwargs
    )


@OWN_MODELS.register("lenet")
def lenet(spec: ModelSpec) -> nn.Module:
    """LeNet-5-style CNN: the fastest real classifier for CPU tests (any input size >= 8)."""
    return LeNet(spec.in_chans, spec.num_classes)


class LeNet(nn.Module):
    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
        )
        self.num_classes = num_classes
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(64, num_classes)


@OWN_MODELS.register("resnet50_mlp512")
def resnet50_mlp512(spec: ModelSpec) -> nn.Module:
    """timm ResNet-50 with the 2048-512-C head of the discriminative-samples paper."""
    return MLPHead(
        timm.create_model("resnet50", pretrained=False, num_classes=0, in_chans=spec.in_chans),
        hidden=512,
        num_classes=spec.num_classes,
    )


class MLPHead(nn.Module):
    """A pooled-feature backbone with a two-layer head; RT* attacks re-initialise the head."""

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.backbone, self.hidden = backbone, hidden
        self.reset_classifier(num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Sequential(
            nn.Linear(self.backbone.num_features, self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, num_classes),
        )


WRAPPERS.register("barrier")(barrier_wrapper)
WRAPPERS.register("passport")(passport_wrapper)
WRAPPERS.register("widened")(widened_wrapper)  # channels added (the dummy_neurons attack)
