"""Exact channel rewrites: which hidden channels of a network can be permuted, rescaled or
widened without changing what it computes. General code that any plug-in may use (the
function-preserving attacks do).

How it reads a network: torch.fx traces it (timm's notrace modules and functions stay opaque,
as in `timm.models._features_fx`; so does any module that is neither torch's nor timm's, e.g.
passport layers) and shapes are propagated on an example input. The output of every
channel-mixing layer - a Conv2d with groups=1 or a Linear: a *producer* - opens a channel
space. The space follows that tensor through operations that act on each channel on its own and
are understood here: BatchNorm (torch's, timm's BatchNormAct2d), depthwise convs, elementwise
activations, pooling, spatial means, flatten, dimension permutes, dropout, arithmetic with a
constant. It ends where channel-mixing layers read it (its *consumers*, whose input columns are
the space's channels; a Linear after a flatten reads `inner` columns per channel). Two spaces
that meet elementwise are joined into one, whose producers then move together: a residual add
or subtraction (``block(x) + shortcut(x)``: the stream of a ResNet stage - its stem or
downsample conv and every block's last conv - is one space, read by every block's first conv
and by what follows the stage) and a gate multiplication (squeeze-excite:
``x * gate(conv(mean(x)))``).

Conservative: anything else that touches a space leaves the whole space alone - a concat,
LayerNorm / GroupNorm (they mix channels, so ConvNeXt's residual stream stays as it is), a
grouped conv, a slice, a module called twice or shared, a parameter read as a tensor, an opaque
module, the network's output. A network fx cannot trace has no chains.

A `Chain` is a valid space: its producers' output channels, the channel-wise layers on the way
and its consumers' input channels, listed as `Slot`s (one channel-indexed tensor each). Every
rewrite is exact in eval mode (BatchNorm on running statistics, dropout off): a permutation
through any elementwise activation, a positive per-channel rescaling only through positively
homogeneous ones (ReLU, LeakyReLU, pooling, means; `Chain.homogeneous`), duplicated channels
whose outgoing weights cancel through anything.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import timm.layers
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import _fx as timm_fx
from timm.layers.norm_act import BatchNormAct2d
from torch.fx.passes.shape_prop import ShapeProp

from harness.errors import ConfigError
from harness.training import as_float
from model_zoo import ModelSpec, create_model
from model_zoo.widen import resize_module, widths_of

# ----------------------------------------------------------------------------- what is known

CONVS = (nn.Conv2d,)
LINEARS = (nn.Linear, timm.layers.Linear)  # timm's only adds a TorchScript cast
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, BatchNormAct2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# elementwise modules -> positively homogeneous (f(t x) = t f(x) for t > 0)?
ACT_MODULES: dict[type, bool] = {
    nn.Identity: True, nn.ReLU: True, nn.LeakyReLU: True,
    nn.Dropout: True, nn.Dropout1d: True, nn.Dropout2d: True,  # the identity in eval mode
    nn.ReLU6: False, nn.Hardtanh: False, nn.Hardswish: False, nn.Hardsigmoid: False,
    nn.Sigmoid: False, nn.Tanh: False, nn.GELU: False, nn.SiLU: False, nn.Mish: False,
    nn.ELU: False, nn.SELU: False, nn.CELU: False, nn.Softplus: False,
}  # fmt: skip
ACT_FUNCTIONS: dict[Any, bool] = {
    F.relu: True, torch.relu: True, F.relu_: True, torch.relu_: True, F.leaky_relu: True,
    F.dropout: True, F.dropout1d: True, F.dropout2d: True,
    F.relu6: False, F.hardtanh: False, F.hardswish: False, F.hardsigmoid: False,
    torch.sigmoid: False, F.sigmoid: False, torch.tanh: False, F.tanh: False, F.gelu: False,
    F.silu: False, F.mish: False, F.elu: False, F.selu: False, F.celu: False, F.softplus: False,
}  # fmt: skip
ACT_METHODS: dict[str, bool] = {
    "relu": True, "relu_": True, "contiguous": True, "clone": True, "float": True, "to": True,
    "sigmoid": False, "sigmoid_": False, "tanh": False, "tanh_": False,
}  # fmt: skip
POOL_FUNCTIONS = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
ARITH = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
}  # fmt: skip
ARITH_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
                 "mul_": "mul", "div": "div", "div_": "div"}  # fmt: skip


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Slot:
    """One channel-indexed tensor of a chain: ``<path>.<name>``, indexed along `dim`, each
    channel owning `inner` consecutive entries there (a Linear that reads a flattened map).
    `power`: the power of a per-channel factor t the tensor takes when the chain's signal is
    scaled by t (producers' weights and biases 1, a norm's shift and mean 1, its scale and
    variance 0, consumers' input weights -1)."""

    path: str
    name: str
    dim: int
    inner: int
    role: Literal["out", "through", "in"]
    power: int


@dataclass
class Chain:
    """A hidden channel space that can be rewritten exactly (see the module docstring)."""

    channels: int
    producers: tuple[str, ...]
    through: tuple[str, ...]  # channel-wise layers: norms, depthwise convs
    consumers: tuple[tuple[str, int], ...]  # (path, inner)
    homogeneous: bool  # a positive per-channel scaling passes through (rescale)
    gated: bool = False  # joined by a gate multiplication (squeeze-excite)
    not_homogeneous: str | None = None  # the first op that is not, for messages
    residual: bool = False  # joined by a residual add (a stream through several blocks)

    def slots(self, model: nn.Module) -> list[Slot]:
        out: list[Slot] = []
        for path in self.producers:
            m = model.get_submodule(path)
            out.append(Slot(path, "weight", 0, 1, "out", 1))
            if m.bias is not None:
                out.append(Slot(path, "bias", 0, 1, "out", 1))
        for path in self.through:
            m = model.get_submodule(path)
            powers = (
                {"weight": 0, "bias": 1}
                if isinstance(m, CONVS)
                else {"weight": 0, "bias": 1, "running_mean": 1, "running_var": 0}
            )
            for name, power in powers.items():
                if getattr(m, name, None) is not None:
                    out.append(Slot(path, name, 0, 1, "through", power))
        for path, inner in self.consumers:
            out.append(Slot(path, "weight", 1, inner, "in", -1))
        return out

    def modules(self) -> list[str]:
        return [*self.producers, *self.through, *(p for p, _ in self.consumers)]


@dataclass
class Analysis:
    chains: list[Chain]
    left_alone: list[str] = field(default_factory=list)  # why other spaces were, deduplicated
    error: str | None = None  # the network could not be traced

    def usable(self, rescale: bool = False) -> list[Chain]:
        return [c for c in self.chains if c.homogeneous or not rescale]

    def why_not(self, rescale: bool = False) -> str:
        """Why no chain is usable, in a few words."""
        if self.error:
            return f"torch.fx cannot trace it ({self.error})"
        reasons = list(self.left_alone)
        if rescale:
            reasons = [
                f"{c.not_homogeneous} is not positively homogeneous"
                for c in self.chains
                if c.not_homogeneous
            ] + reasons
        seen = list(dict.fromkeys(reasons))
        return "; ".join(seen[:4]) if seen else "it has no conv/linear feeding another"


# ----------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps the layers classified here, timm's notrace modules and
    any module that is neither torch's nor timm's as opaque calls."""

    def __init__(self) -> None:
        fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=fns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        t = type(m)
        if t in (*CONVS, *LINEARS, *NORMS, *POOLS, nn.Flatten, nn.PReLU) or t in ACT_MODULES:
            return True
        if timm_fx.is_notrace_module(t):
            return True
        if not t.__module__.startswith(("torch.", "timm.")):
            return True  # opaque: a project's own layer (passports, ...)
        return super().is_leaf_module(m, qualname)


class _Reject(Exception):
    pass


class _Space:
    def __init__(self, sid: int, channels: int) -> None:
        self.sid, self.parent, self.channels = sid, sid, channels
        self.producers: list[str] = []
        self.through: list[str] = []
        self.consumers: list[tuple[str, int]] = []
        self.homogeneous, self.blocker, self.gated, self.residual = True, None, False, False
        self.invalid: str | None = None

    def not_homogeneous(self, what: str) -> None:
        if self.homogeneous:
            self.homogeneous, self.blocker = False, what


Tag = tuple[int, int, int]  # (space id, channel dim, inner)


class _Analyzer:
    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.modules = dict(model.named_modules())
        self.spaces: list[_Space] = []
        self.tags: dict[fx.Node, Tag] = {}

    # union-find
    def find(self, sid: int) -> _Space:
        s = self.spaces[sid]
        while s.parent != s.sid:
            s = self.spaces[s.parent]
        return s

    def merge(self, a: int, b: int, how: Literal["gated", "residual"]) -> _Space:
        sa, sb = self.find(a), self.find(b)
        if sa is not sb:
            sb.parent = sa.sid
            sa.producers += sb.producers
            sa.through += sb.through
            sa.consumers += sb.consumers
            if not sb.homogeneous:
                sa.not_homogeneous(sb.blocker or "a gate")
            sa.invalid = sa.invalid or sb.invalid
            sa.gated, sa.residual = sa.gated or sb.gated, sa.residual or sb.residual
        setattr(sa, how, True)
        return sa

    def reject(self, tags: list[Tag], why: str) -> None:
        for t in tags:
            s = self.find(t[0])
            s.invalid = s.invalid or why

    # shapes
    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise _Reject(f"{node.name}: no tensor shape")
        return tuple(meta.shape)

    def new_space(self, node: fx.Node, path: str, channels: int) -> None:
        s = _Space(len(self.spaces), channels)
        s.producers.append(path)
        self.spaces.append(s)
        shape = self.shape(node)
        dim = 1 if isinstance(self.modules[path], CONVS) else len(shape) - 1
        self.tags[node] = (s.sid, dim, 1)

    def check(self, node: fx.Node, tag: Tag) -> Tag:
        """`tag` for `node`'s output, after checking the channel dim holds the space."""
        shape = self.shape(node)
        sid, dim, inner = tag
        if not 0 <= dim < len(shape) or shape[dim] != self.find(sid).channels * inner:
            raise _Reject(f"{node.name}: channel dim {dim} of shape {shape} lost")
        return tag

    # the pass
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            inputs = [a for a in node.all_input_nodes if a in self.tags]
            tags = [self.tags[a] for a in inputs]
            try:
                out = self.step(node, inputs, tags)
            except _Reject as e:
                self.reject(tags, str(e))
                out = None
            if out is not None and node not in self.tags:
                try:
                    self.tags[node] = self.check(node, out)
                except _Reject as e:
                    self.reject([out], str(e))

    def step(self, node: fx.Node, inputs: list[fx.Node], tags: list[Tag]) -> Tag | None:
        if node.op == "output":
            if tags:
                raise _Reject("reaches the network's output")
            return None
        if node.op == "call_module":
            return self.call_module(node, inputs, tags)
        if not tags:
            return None
        if node.op == "call_function":
            return self.call_function(node, inputs, tags)
        if node.op == "call_method":
            return self.call_method(node, inputs, tags)
        raise _Reject(f"{node.op} {node.target}")

    def only(self, node: fx.Node, inputs: list[fx.Node], tags: list[Tag]) -> Tag:
        """The single tagged tensor argument of `node` (the first), with no other tensor."""
        if len(inputs) != 1 or len(node.all_input_nodes) != 1 or node.args[:1] != (inputs[0],):
            raise _Reject(f"{node.name}: mixes the channels with another tensor")
        return tags[0]

    def call_module(self, node: fx.Node, inputs: list[fx.Node], tags: list[Tag]) -> Tag | None:
        path = str(node.target)
        m = self.modules[path]
        t = type(m)
        if t in CONVS and m.groups == m.in_channels == m.out_channels and m.groups > 1:
            if not tags:
                return None  # a depthwise conv mixes no channels: no space of its own
            sid, dim, inner = self.only(node, inputs, tags)
            if dim != 1 or inner != 1:
                raise _Reject(f"{path}: not on the channel dim")
            self.find(sid).through.append(path)
            return sid, dim, inner
        if t in CONVS or t in LINEARS:
            if t in CONVS and m.groups != 1:  # its outputs are tied to groups of inputs
                self.reject(tags, f"{path}: a grouped conv")
                return None
            if tags:
                try:
                    sid, dim, inner = self.only(node, inputs, tags)
                    ndim = len(self.shape(inputs[0]))
                    if t in CONVS and (dim != 1 or inner != 1):
                        raise _Reject(f"{path}: reads another dim than the channels")
                    if t in LINEARS and dim != ndim - 1:
                        raise _Reject(f"{path}: reads another dim than the channels")
                    self.find(sid).consumers.append((path, inner))
                except _Reject as e:
                    self.reject(tags, str(e))
            channels = m.out_channels if t in CONVS else m.out_features
            self.new_space(node, path, channels)
            return None
        if not tags:
            return None
        sid, dim, inner = self.only(node, inputs, tags)
        space = self.find(sid)
        ndim = len(self.shape(inputs[0]))
        if t in NORMS:
            if dim != 1 or inner != 1:
                raise _Reject(f"{path}: a norm off the channel dim")
            if t is BatchNormAct2d:
                for part in (m.act, m.drop):
                    if type(part) not in ACT_MODULES:
                        raise _Reject(f"{path}: unknown {type(part).__name__} inside")
                    if not ACT_MODULES[type(part)]:
                        space.not_homogeneous(type(part).__name__)
            if not (m.affine and m.track_running_stats and m.running_mean is not None):
                space.not_homogeneous(f"{path} (a BatchNorm without affine or running stats)")
            space.through.append(path)
            return sid, dim, inner
        if t in ACT_MODULES:
            if not ACT_MODULES[t]:
                space.not_homogeneous(t.__name__)
            return sid, dim, inner
        if t is nn.PReLU and m.num_parameters == 1:
            return sid, dim, inner  # one slope: positively homogeneous
        if t in POOLS:
            if dim != 1 or inner != 1 or ndim != 4 or getattr(m, "return_indices", False):
                raise _Reject(f"{path}: pooling off the channel dim")
            return sid, dim, inner
        if t is nn.Flatten:
            return self.flatten(inputs[0], (sid, dim, inner), m.start_dim, m.end_dim)
        raise _Reject(f"{path}: {t.__name__} (not known to act on each channel alone)")

    def flatten(self, x: fx.Node, tag: Tag, start: int, end: int) -> Tag:
        shape = self.shape(x)
        start, end = start % len(shape), end % len(shape)
        sid, dim, inner = tag
        if dim < start:
            return tag
        if dim > end:
            return sid, dim - (end - start), inner
        if any(shape[d] != 1 for d in range(start, dim)):
            raise _Reject(f"{x.name}: flattened with the channels inside")
        for d in range(dim + 1, end + 1):
            inner *= shape[d]
        return sid, start, inner

    def arith(self, node: fx.Node, op: str, inputs: list[fx.Node], tags: list[Tag]) -> Tag:
        if node.kwargs.keys() - {"other"}:
            raise _Reject(f"{node.name}: {op} with {sorted(node.kwargs)}")
        a, b = (*node.args, node.kwargs.get("other"))[:2]
        if len(tags) == 2 and op in ("mul", "add", "sub"):
            (s1, d1, i1), (s2, d2, i2) = tags
            n1, n2 = self.shape(inputs[0]), self.shape(inputs[1])
            if (len(n1), d1, i1) != (len(n2), d2, i2) or self.find(s1).channels != self.find(
                s2
            ).channels:
                raise _Reject(f"{node.name}: {op} of unaligned channels")
            if op == "mul":
                space = self.merge(s1, s2, "gated")  # a gate: x * gate(x)
                space.not_homogeneous("a gate product")
            else:  # a residual: linear, so one permutation or scaling passes through
                space = self.merge(s1, s2, "residual")
            return space.sid, d1, i1
        if len(tags) != 1 or len(node.all_input_nodes) != 1:
            raise _Reject(f"{node.name}: {op} with an untraced tensor (a constant or scale)")
        other = b if isinstance(a, fx.Node) else a
        if not isinstance(other, (int, float)) or isinstance(other, bool):
            raise _Reject(f"{node.name}: {op} with {type(other).__name__}")
        sid = tags[0][0]
        numerator = isinstance(a, fx.Node)
        if not (op == "mul" or (op == "div" and numerator) or other == 0):
            self.find(sid).not_homogeneous(f"{op} of a constant")
        return tags[0]

    def reduce(self, node: fx.Node, x: fx.Node, tag: Tag) -> Tag:
        sid, dim, inner = tag
        ndim = len(self.shape(x))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or inner != 1:
            raise _Reject(f"{node.name}: a reduction over the channels")
        dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]
        if dim in dims:
            raise _Reject(f"{node.name}: a reduction over the channels")
        return sid, dim if keep else dim - sum(d < dim for d in dims), inner

    def reshape(self, node: fx.Node, x: fx.Node, tag: Tag) -> Tag:
        before, after = self.shape(x), self.shape(node)
        if before == after:
            return tag
        # only a flatten of everything from the channel dim on is understood
        sid, dim, _ = tag
        if after[:dim] == before[:dim] and len(after) == dim + 1:
            return self.flatten(x, tag, dim, -1)
        raise _Reject(f"{node.name}: reshaped {before} -> {after}")

    def metadata(self, node: fx.Node, tag: Tag) -> None:
        """x.shape / x.size(d): harmless if it never reads the channel count."""
        dim = tag[1]
        if node.target == "size" and node.op == "call_method":
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(d, int) and d % len(self.shape(node.args[0])) != dim:
                return None
            raise _Reject(f"{node.name}: reads the channel count")
        ndim = len(self.shape(node.args[0]))
        for user in node.users:
            idx = user.args[1] if user.target is operator.getitem else None
            if not isinstance(idx, int) or idx % ndim == dim:
                raise _Reject(f"{node.name}: reads the channel count")
        return None

    def call_function(self, node: fx.Node, inputs: list[fx.Node], tags: list[Tag]) -> Tag | None:
        fn = node.target
        if fn is getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
            return self.metadata(node, tags[0]) if node.args[1] == "shape" else None
        if fn in ARITH:
            return self.arith(node, ARITH[fn], inputs, tags)
        known = (*ACT_FUNCTIONS, *POOL_FUNCTIONS, *REDUCE_FUNCTIONS, torch.flatten,
                 torch.reshape, torch.permute)  # fmt: skip
        if fn not in known:
            raise _Reject(f"{node.name}: {getattr(fn, '__name__', fn)} is not channel-wise")
        tag = self.only(node, inputs, tags)
        if fn in ACT_FUNCTIONS:
            if not ACT_FUNCTIONS[fn]:
                self.find(tag[0]).not_homogeneous(getattr(fn, "__name__", str(fn)))
            return tag
        if fn in POOL_FUNCTIONS:
            if tag[1:] != (1, 1) or len(self.shape(inputs[0])) != 4:
                raise _Reject(f"{node.name}: pooling off the channel dim")
            return tag
        if fn in REDUCE_FUNCTIONS:
            return self.reduce(node, inputs[0], tag)
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(inputs[0], tag, start, end)
        if fn is torch.reshape:
            return self.reshape(node, inputs[0], tag)
        if fn is torch.permute:
            return self.permute(node.args[1], tag)
        raise _Reject(f"{node.name}: {getattr(fn, '__name__', fn)} is not channel-wise")

    def permute(self, dims, tag: Tag) -> Tag:
        dims = list(dims[0] if len(dims) == 1 and not isinstance(dims[0], int) else dims)
        sid, dim, inner = tag
        dims = [d % len(dims) for d in dims]
        return sid, dims.index(dim), inner

    def call_method(self, node: fx.Node, inputs: list[fx.Node], tags: list[Tag]) -> Tag | None:
        name = node.target
        if name in ("size", "dim"):
            return self.metadata(node, tags[0]) if name == "size" else None
        if name in ARITH_METHODS:
            return self.arith(node, ARITH_METHODS[name], inputs, tags)
        known = (*ACT_METHODS, "mean", "sum", "amax", "flatten", "view", "reshape", "permute")
        if name not in known:
            raise _Reject(f"{node.name}: .{name}() is not channel-wise")
        tag = self.only(node, inputs, tags)
        if name in ACT_METHODS:
            if not ACT_METHODS[name]:
                self.find(tag[0]).not_homogeneous(name)
            return tag
        if name in ("mean", "sum", "amax"):
            return self.reduce(node, inputs[0], tag)
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(inputs[0], tag, start, end)
        if name in ("view", "reshape"):
            return self.reshape(node, inputs[0], tag)
        if name == "permute":
            return self.permute(node.args[1:], tag)
        raise _Reject(f"{node.name}: .{name}() is not channel-wise")

    # after the pass
    def shared(self) -> dict[str, str]:
        """Modules that cannot be rewritten alone: called twice, reachable by two paths, with a
        parameter another module holds or one the graph reads as a tensor, or whose weights a
        hook or parametrization recomputes (the trace does not see hooks)."""
        out: dict[str, str] = {}
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        out.update({p: "called more than once" for p, n in calls.items() if n > 1})
        paths: dict[int, list[str]] = {}
        for path, m in self.model.named_modules(remove_duplicate=False):
            paths.setdefault(id(m), []).append(path)
        owners: dict[int, set[int]] = {}
        for m in self.model.modules():
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(id(m))
        for path, m in self.modules.items():
            if len(paths[id(m)]) > 1:
                out[path] = "shared by several paths"
            if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "parametrizations"):
                out[path] = "hooked or parametrized (pruning masks, weight norm)"
            if any(len(owners[id(p)]) > 1 for p in m.parameters(recurse=False)):
                out[path] = "shares a parameter"
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                prefix = str(node.target).rpartition(".")[0]
                out.setdefault(prefix, "a parameter read as a tensor")
        return out

    def result(self) -> Analysis:
        shared = self.shared()
        position = {path: i for i, path in enumerate(self.modules)}
        chains, why = [], []
        for s in self.spaces:
            if s.parent != s.sid:
                continue
            members = [*s.producers, *s.through, *(p for p, _ in s.consumers)]
            bad = s.invalid or next((f"{p}: {shared[p]}" for p in members if p in shared), None)
            if bad is None and not s.consumers:
                bad = f"{s.producers[0]}: no conv/linear reads it"
            if bad is None:
                bad = self.sizes(s)
            if bad is not None:
                why.append(bad.split(": ", 1)[-1])
                continue
            chains.append(Chain(  # producers in module order: the first is the most upstream
                s.channels, tuple(sorted(s.producers, key=position.__getitem__)),
                tuple(s.through), tuple(s.consumers), s.homogeneous, s.gated, s.blocker,
                s.residual,
            ))  # fmt: skip
        return Analysis(chains, list(dict.fromkeys(why)))

    def sizes(self, s: _Space) -> str | None:
        for path in s.producers:
            m = self.modules[path]
            if (m.out_channels if isinstance(m, CONVS) else m.out_features) != s.channels:
                return f"{path}: producers of different widths"
        for path in s.through:
            m = self.modules[path]
            n = m.out_channels if isinstance(m, CONVS) else m.num_features
            if n != s.channels:
                return f"{path}: a channel-wise layer of another width"
        for path, inner in s.consumers:
            m = self.modules[path]
            n = m.in_channels if isinstance(m, CONVS) else m.in_features
            if n != s.channels * inner:
                return f"{path}: a consumer of another width"
        return None


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def analyze(model: nn.Module, example: torch.Tensor) -> Analysis:
    """The hidden channel chains of `model` (traced, shapes from `example`, in eval mode)."""
    with _eval(model), torch.no_grad():
        try:
            graph = _Tracer().trace(model)
            gm = fx.GraphModule(model, graph)
            ShapeProp(gm).propagate(example)
        except Exception as e:  # noqa: BLE001 - any tracing failure: no chains
            return Analysis([], error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    analyzer = _Analyzer(model, gm)
    analyzer.run()
    return analyzer.result()


def example_input(spec, device: str | torch.device = "cpu", batch: int = 2) -> torch.Tensor:
    """A random batch shaped like `spec`'s inputs (shapes only matter)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=g)
    return x.to(device)


def chains(model: nn.Module, example: torch.Tensor, rescale: bool = False) -> list[Chain]:
    """The chains of `model` a permutation / widening (or, `rescale`, a scaling) keeps exact."""
    return analyze(model, example).usable(rescale)


def select(found: list[Chain], layers: str | list[str]) -> list[Chain]:
    """The chains `layers` ("all", or module paths of producers) picks."""
    if layers == "all":
        return found
    wanted = set(layers)
    return [c for c in found if wanted & set(c.producers)]


@functools.lru_cache(maxsize=32)
def arch_analysis(arch: str, num_classes: int, in_chans: int, img_size: int) -> Analysis:
    """`analyze` of a freshly built `arch` (for validation in the driver; cached)."""
    spec = ModelSpec(arch, num_classes, in_chans, img_size)
    return analyze(create_model(spec), example_input(spec))


def check_arch_chains(
    arch: str, dataset, layers: str | list[str], rescale: bool, verb: str, allowed: str
) -> None:
    """Refuse (ConfigError on the `layers` parameter) an arch none of whose chains - or, for a
    list of `layers`, not every listed producer's - can be `verb` exactly. Builds the network
    (never trains it)."""
    found = arch_analysis(
        arch, max(2, dataset.num_classes or 10), dataset.channels, dataset.image_size
    )
    usable = found.usable(rescale)
    if not usable:
        raise ConfigError(
            f"arch {arch!r}: no hidden channel chain can be {verb} exactly "
            f"({found.why_not(rescale)})",
            field="layers",
            value=arch,
            allowed=allowed,
        )
    if layers != "all":
        producers = sorted({p for c in usable for p in c.producers})
        for path in layers:
            if path not in producers:
                raise ConfigError(
                    f"arch {arch!r}: not the producer of a chain that can be {verb} exactly",
                    field="layers",
                    value=path,
                    allowed=producers,
                )


# ----------------------------------------------------------------------------- rewrites


def expand(index: torch.Tensor, inner: int) -> torch.Tensor:
    """Channel indices -> the entries they own when each owns `inner` consecutive ones."""
    if inner == 1:
        return index
    return (index[:, None] * inner + torch.arange(inner, device=index.device)).reshape(-1)


def _tensor(model: nn.Module, slot: Slot) -> torch.Tensor:
    return getattr(model.get_submodule(slot.path), slot.name)


@torch.no_grad()
def permute_chain(model: nn.Module, chain: Chain, perm: torch.Tensor) -> None:
    """Reorder the chain's channels: new channel i is old channel perm[i], everywhere."""
    for slot in chain.slots(model):
        t = _tensor(model, slot)
        t.data = t.data.index_select(slot.dim, expand(perm.to(t.device), slot.inner)).contiguous()


@torch.no_grad()
def scale_chain(model: nn.Module, chain: Chain, factors: torch.Tensor) -> None:
    """Multiply the chain's signal by positive per-channel `factors` and compensate in its
    consumers (exact only for a `homogeneous` chain, in eval mode)."""
    if not chain.homogeneous:
        raise ValueError("a chain through a non-homogeneous op cannot be rescaled exactly")
    if (factors <= 0).any():
        raise ValueError("rescaling factors must be positive")
    for slot in chain.slots(model):
        if slot.power == 0:
            continue
        t = _tensor(model, slot)
        f = expand_values(factors.to(t.device, t.dtype), slot.inner) ** slot.power
        shape = [1] * t.dim()
        shape[slot.dim] = -1
        t.data = t.data * f.reshape(shape)


@torch.no_grad()
def widen_chain(
    model: nn.Module, chain: Chain, source: torch.Tensor, gain: torch.Tensor
) -> list[str]:
    """Add 2k channels to the chain: copies a and b of each old channel source[i] (incoming
    weights, norm statistics and depthwise filters duplicated), whose outgoing weights are
    gain[i] times the source's and minus that, so that they cancel exactly. The new
    channels come last. Returns the paths of the resized modules (`model_zoo.widen`)."""
    new: dict[tuple[str, str], torch.Tensor] = {}
    for slot in chain.slots(model):
        t = _tensor(model, slot).data
        idx = expand(torch.cat([source, source]).to(t.device), slot.inner)
        added = t.index_select(slot.dim, idx)
        if slot.role == "in":
            w = torch.cat([gain, -gain]).to(t.device, t.dtype)
            shape = [1] * t.dim()
            shape[slot.dim] = -1
            added = added * expand_values(w, slot.inner).reshape(shape)
        new[(slot.path, slot.name)] = torch.cat([t, added], slot.dim)
    k2 = 2 * len(source)
    for path in dict.fromkeys(chain.modules()):
        m = model.get_submodule(path)
        kept = {n: t.detach().clone() for n, t in (*m.named_parameters(recurse=False),
                                                  *m.named_buffers(recurse=False))}  # fmt: skip
        w = widths_of(m)
        if path in chain.producers:
            w["out"] += k2
        if path in chain.through:
            depthwise = isinstance(m, CONVS)
            w = {"in": w["in"] + k2, "out": w["out"] + k2,
                 "groups": w["groups"] + k2 if depthwise else 1}  # fmt: skip
        for p, inner in chain.consumers:
            if p == path:
                w["in"] += k2 * inner
        resize_module(m, **w)
        for name, old in kept.items():  # what this chain does not index keeps its values
            value = new.get((path, name), old)
            getattr(m, name).data.copy_(value)
    return list(dict.fromkeys(chain.modules()))


def expand_values(values: torch.Tensor, inner: int) -> torch.Tensor:
    """Per-channel values -> per entry when each channel owns `inner` consecutive entries."""
    return values.repeat_interleave(inner) if inner > 1 else values


# ----------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def full_precision():
    """Plain fp32 matmuls and convs (no TF32) while measuring an exact rewrite."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.no_grad()
def exact_logits(model: nn.Module, x: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """`model`'s outputs on `x` in eval mode and full fp32 (no autocast, no TF32): unlike
    `harness.training.predict_logits`, whose bf16 autocast on a GPU alone moves logits by
    far more than an exact rewrite does."""
    out = []
    with _eval(model), full_precision():
        for i in range(0, len(x), batch_size):
            out.append(model(as_float(x[i : i + batch_size], device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def max_logit_deviation(
    before: nn.Module | torch.Tensor, after: nn.Module | torch.Tensor, x: torch.Tensor, device
) -> float:
    """Largest |logit difference| between two models (or their `exact_logits`) on `x`."""
    a = before if isinstance(before, torch.Tensor) else exact_logits(before, x, device)
    b = after if isinstance(after, torch.Tensor) else exact_logits(after, x, device)
    return float((a - b).abs().max()) if a.numel() else 0.0
