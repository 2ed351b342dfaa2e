"""The `widened` ModelSpec wrapper: conv / linear / BatchNorm layers rebuilt with more channels.

A plug-in that adds channels to a network (the `dummy_neurons` attack) returns a spec with
``wrapper="widened"`` and ``wrapper_params={"widths": {module_path: {"in": n, "out": n,
"groups": g}}, "base": None | {"wrapper": ..., "wrapper_params": ...}}``: the store keeps only a
state dict, and `create_model` rebuilds the network through this wrapper before loading it.
`base` is the wrapper the model had before (passport layers, say), applied first, so that
widening composes with any other wrapper; widening a widened model just updates `widths`.

`resize_module` is the single place that sets a layer's channel counts: the attack uses it on
the live model and this wrapper on the rebuilt one, so both have the same shapes. Parameters
and buffers of a resized layer are fresh zeros (ones for a running variance) of the new shapes:
whoever resizes fills them (the attack) or loads a state dict into them (the store).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd


def widths_of(module: nn.Module) -> dict[str, int]:
    """The channel counts `resize_module` takes, as the layer has them now."""
    if isinstance(module, _ConvNd):
        return {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features, "groups": 1}
    if isinstance(module, _NormBase):
        return {"in": module.num_features, "out": module.num_features, "groups": 1}
    raise TypeError(f"cannot resize a {type(module).__name__} (conv, linear or BatchNorm only)")


def _replace(module: nn.Module, name: str, shape: tuple[int, ...], fill: float) -> None:
    old = getattr(module, name)
    if old is None:
        return
    new = torch.full(shape, fill, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new, persistent=name not in module._non_persistent_buffers_set)


def resize_module(module: nn.Module, *, out: int, groups: int = 1, **kw: int) -> None:
    """Give `module` (a conv, linear or BatchNorm layer) `kw["in"]` input and `out` output
    channels (`groups`: a conv's groups), in place; its tensors become placeholders."""
    n_in = kw["in"]
    if isinstance(module, _ConvNd):
        if n_in % groups or out % groups:
            raise ValueError(f"channels {n_in} -> {out} do not split into {groups} groups")
        module.in_channels, module.out_channels, module.groups = n_in, out, groups
        _replace(module, "weight", (out, n_in // groups, *module.kernel_size), 0.0)
        _replace(module, "bias", (out,), 0.0)
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = n_in, out
        _replace(module, "weight", (out, n_in), 0.0)
        _replace(module, "bias", (out,), 0.0)
    elif isinstance(module, _NormBase):
        if n_in != out:
            raise ValueError(f"a norm layer keeps its channels ({n_in} in, {out} out)")
        module.num_features = out
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):  # fmt: skip
            _replace(module, name, (out,), fill)
    else:
        widths_of(module)  # raises: not a layer this wrapper knows


def widened_wrapper(
    model: nn.Module, spec, widths: dict[str, dict[str, int]], base: dict[str, Any] | None = None
) -> nn.Module:
    """The `widened` ModelSpec wrapper: `base` (another wrapper) first, then every layer of
    `widths` (module path -> {"in", "out", "groups"}) resized to its stored width."""
    if base and base.get("wrapper"):
        from model_zoo import WRAPPERS  # lazy: model_zoo registers this wrapper on import

        model = WRAPPERS.get(base["wrapper"])(model, spec, **(base.get("wrapper_params") or {}))
    for path, w in widths.items():
        resize_module(model.get_submodule(path), **w)
    return model


def widened_spec(spec, widths: dict[str, dict[str, int]]):
    """`spec` with `widths` added (a widened spec's own widths are updated in place of
    nesting; any other wrapper becomes the base)."""
    if spec.wrapper == "widened":
        params = dict(spec.wrapper_params or {})
        merged = {**params.get("widths", {}), **widths}
        return spec.replace(wrapper_params={**params, "widths": merged})
    base = None
    if spec.wrapper:
        base = {"wrapper": spec.wrapper, "wrapper_params": spec.wrapper_params}
    return spec.replace(wrapper="widened", wrapper_params={"widths": widths, "base": base})
