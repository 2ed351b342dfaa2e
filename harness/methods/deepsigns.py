"""DeepSigns white-box activation watermark (Rouhani, Chen, Koushanfar, ASPLOS 2019), as WRT's
`wm_deepsignwb` (Lukas et al., IEEE S&P 2022).

The mark lives in the distribution of one intermediate activation. The owner picks
`n_classes_marked` classes, one Gaussian each, and per class c a key set X_key[c] of up to
`key_images` owner images of c; a projection A ~ N(0, 1) of shape (features, `n_bits`) and a
signature b in {0, 1}^(classes x n_bits). Each Gaussian's centre mu_c starts at the victim's mean
activation over X_key[c]. Embedding fine-tunes the victim on the owner split with plain CE steps
and, after every `wm_every` of them, one watermark step on the key images of
`gaussians_per_step` randomly drawn Gaussians with

    gamma0 * CE + gamma1 * sum_i ||a_i - mu_c(i)||^2 + gamma2 * sum_k BCE(sigmoid(mu_k A), b_k)
    + gamma3 * sum_k |1 - ||mu_k||^2|

(sums over key images i and Gaussians k, BCE a mean over bits: the activations of a class's keys
pulled to its centre, the centres pushed to the signature). The centres are tensors outside the
network's optimiser, stepped after each watermark step. Verification reads the suspect's mean
activation m_c over X_key[c] (eval mode): bits = 1[sigmoid(m_c A) > 0.5], scored by bit accuracy
(1 - BER) over all classes x n_bits bits and detected when it clears WRT's null-model threshold
(a one-sided Gaussian at `p_value` over victims of other seeds, sigma floored by a chance-level
binomial's); the exact binomial p-value against 0.5 is reported beside it, and
`centre_bit_acc` (the bits the trained centres themselves carry) tells an embedding whose
centres reached the signature but whose activations did not follow.

Decisions (say so in any comparison with WRT):
- Layer: `layer` is the module path whose output, flattened per image, is the activation.
  Default: for a timm network, the deepest of its feature stages (`feature_info`) before the
  last whose output has at least n_classes_marked x n_bits values (fewer cannot carry every
  signature; if none has, the widest stage): ResNet `layer3`, ConvNeXt `stages.2`,
  MobileNetV3-small at 32 px `blocks.1` (`blocks.3` has 96 values). That is the middle-deep
  block WRT's choice corresponds to (activation 17 of its WRN: a conv2 of the last stage,
  24,576 values). A stage output is the stage's residual stream, which the function-preserving
  attacks (permute, rescale, dummy_neurons) rewrite as one (`harness.equivalence`). Networks
  without `feature_info` (lenet): the activation function after the Conv2d two thirds of the
  way down, in module order.
- Gaussians: `n_classes_marked` defaults to 1, the only setting WRT's code says was validated
  ("has only been validated to work for a value of '1'"); 10 (one per digit) reaches only
  ~0.58 bit accuracy on resnet10t / digits in 6 epochs (centres 0.89). The marked classes are
  drawn from the owner seed (WRT: the first classes).
- Centres: Adam (lr `mu_lr` x the RMS of the initial centres, so one value fits any layer
  width and activation scale), the gradient zeroed after each step. WRT steps them by hand,
  mu -= 0.01 * grad, and never zeroes the gradient (a quirk: its centres move by the running
  sum of every gradient so far); that plain step oscillates or diverges once features / bits
  is large (the BCE on mu A saturates, its gradient a fixed push) and crawls when small.
- Defaults tuned for a short fixed schedule (digits, 6 epochs, ~90 CE steps), where WRT's
  values hardly move the centres (resnet10t: bit accuracy 0.59, centres 0.59): gamma =
  (1, 0.03, 10, 0) (WRT: 1, 0.001, 0.3, 0), `wm_every` 2 (WRT's default; its CIFAR config 10),
  lr train.lr (WRT: train.lr / 10; at / 10 resnet10t / digits reads 0.68-0.78, at train.lr
  0.99-1.0 with no accuracy cost), and a gradient-norm clip of 5 on every step (the centre
  loss is a sum over images and features: unclipped, it diverges on unnormalised layers).
- A watermark step covers all its `gaussians_per_step` Gaussians at once (terms summed; WRT
  takes one optimiser step per Gaussian), each with min(batch_size, keys) key images appended
  to an ordinary owner batch, in train mode, so that BatchNorm normalises a representative
  batch (WRT: train mode on single-class batches, whose batch statistics erase the class
  mean; eval mode instead diverged here). WRT's `separate_means` term (pushing activations
  off the other centres) is not used; it is zero for one Gaussian.
- A fixed number of epochs (default train.epochs) on the train config's cosine schedule,
  instead of WRT's early stopping on bit accuracy.
- Fewer owner images of a marked class than `key_images` (digits has ~95 per class in the
  owner split): every marked class uses as many as the scarcest one has (WRT: up to 64-128).
- A suspect without the layer, or whose activation there has another width (a distilled
  student of another arch, a widened layer), reads as chance (0.5) with `layer_found` 0.
X_key, A and b derive from the owner's seed and live only in the embed artifact (with the
trained centres, for inspection).

`align: true` (a verify-only parameter, as Uchida's) matches the suspect's hidden channels to
the marked model's before the activation is read (`harness.alignment`), undoing permuted,
rescaled or added neurons.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.alignment import ALIGN_METRICS, aligned_suspect
from harness.data import known_classes
from harness.decision import bit_score, null_model_metrics, null_threshold
from harness.errors import CellFailed, ConfigError
from harness.methods.base import Embedded, Method, Metric, VictimRef, WatermarkScore, register
from harness.registry import close_match
from harness.training import as_float, random_shift, train_loop
from model_zoo import ModelSpec, create_model


class DeepSignsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: str | None = Field(
        None, description="module path whose output is the marked activation (default: the "
        "deepest timm feature stage before the last with at least as many values as bits)"
    )  # fmt: skip
    n_classes_marked: int = Field(1, ge=1, description="Gaussians, one per class (WRT: 1 valid)")
    n_bits: int = Field(100, ge=1, le=4096, description="signature bits per Gaussian (WRT: 100)")
    key_images: int = Field(128, ge=2, description="owner images per marked class (at most)")
    gamma0: float = Field(1.0, ge=0, description="weight of CE on the key images (WRT: 1)")
    gamma1: float = Field(0.03, ge=0, description="weight of the centre loss (WRT: 0.001)")
    gamma2: float = Field(10.0, ge=0, description="weight of the signature BCE (WRT: 0.3)")
    gamma3: float = Field(0.0, ge=0, description="weight of |1 - ||mu||^2| (WRT: 0)")
    mu_lr: float = Field(0.1, gt=0, description="Adam step of the centres, as a share of "
                         "their initial RMS (WRT: SGD, 0.01)")  # fmt: skip
    wm_every: int = Field(2, ge=1, description="a watermark step after every N CE steps "
                          "(WRT: 10 in its configs, 2 by default)")  # fmt: skip
    gaussians_per_step: int = Field(3, ge=1, description="Gaussians per watermark step (WRT: 3)")
    clip: float | None = Field(5.0, gt=0, description="gradient-norm clip of every step "
                               "(the centre loss is a sum; WRT: none)")  # fmt: skip
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr; WRT: "
                             "train.lr / 10)")  # fmt: skip
    n_null: int = Field(3, ge=2, le=50, description="null models for the threshold")
    p_value: float = Field(0.05, gt=0, lt=0.5)
    align: bool = Field(
        False, description="match the suspect's neurons to the marked model's before reading"
    )


# ----------------------------------------------------------------------------- the layer


def feature_stages(model: nn.Module) -> list[str]:
    """timm's feature stages (`feature_info`) that are modules of `model`, in order."""
    modules = dict(model.named_modules())
    return [f["module"] for f in getattr(model, "feature_info", None) or ()
            if f.get("module") in modules]  # fmt: skip


def default_layer(model: nn.Module, n_bits: int, example: torch.Tensor) -> str:
    """The deepest timm feature stage before the last whose output has at least `n_bits`
    values (fewer cannot carry every signature; none has: the widest stage), else - a network
    without feature stages - the activation function after the Conv2d two thirds down in
    module order (the conv itself if none follows)."""
    stages = feature_stages(model)
    if len(stages) >= 2:
        widths = layer_widths(model, stages, example)
        wide = [s for s in stages[:-1] if (widths[s] or 0) >= n_bits]
        return wide[-1] if wide else max(stages, key=lambda s: widths[s] or 0)
    named = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError("this network has no feature stage or Conv2d to default to; name "
                          "one", field="layer", value=None)  # fmt: skip
    at = convs[(2 * len(convs)) // 3]
    acts = [n for n, m in named[at + 1 :] if type(m).__module__ == nn.ReLU.__module__]
    return acts[0] if acts else named[at][0]


def candidate_layers(model: nn.Module) -> list[str]:
    """What the refusal lists: the feature stages and the top-level blocks, then the convs."""
    top = [n for n, _ in model.named_children()]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return list(dict.fromkeys([*feature_stages(model), *top, *convs]))


def pick_layer(model: nn.Module, p: DeepSignsParams, example: torch.Tensor) -> str:
    """The marked module's path: `layer` if the network has it, else `default_layer` for all
    the bits (n_classes_marked x n_bits); a ConfigError on field `layer` otherwise."""
    if p.layer is None:
        return default_layer(model, p.n_classes_marked * p.n_bits, example)
    if not p.layer or p.layer not in dict(model.named_modules()):
        names = [n for n, _ in model.named_modules() if n]
        raise ConfigError(
            "not a module of this network (any path of model.named_modules())",
            field="layer", value=p.layer, allowed=candidate_layers(model),
            hint=close_match(p.layer, names),
        )  # fmt: skip
    return p.layer


class Capture:
    """A forward hook on `layer` keeping its output, flattened per image, while `on`."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.module = dict(model.named_modules()).get(layer)
        self.on, self.out = False, []
        self.handle = None if self.module is None else self.module.register_forward_hook(
            self._hook
        )  # fmt: skip

    def _hook(self, _module, _inputs, out) -> None:
        if self.on and isinstance(out, torch.Tensor):
            self.out.append(out.flatten(1))

    def take(self) -> torch.Tensor | None:
        """The first output captured since the last take (a module called twice: its first)."""
        out, self.out = (self.out[0] if self.out else None), []
        return out

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def layer_widths(
    model: nn.Module, layers: list[str], example: torch.Tensor
) -> dict[str, int | None]:
    """Values per image of each layer's output on `example`, in eval mode (None: the module
    returns no tensor, or does not run)."""
    caps = [Capture(model, name) for name in layers]
    was_training = model.training
    try:
        model.eval()
        for cap in caps:
            cap.on = True
        with torch.no_grad():
            model(example.to(next(model.parameters()).device))
        outs = [cap.take() for cap in caps]
    finally:
        for cap in caps:
            cap.remove()
        model.train(was_training)
    return {
        name: None if out is None else out.shape[1] for name, out in zip(layers, outs, strict=True)
    }


@torch.no_grad()
def mean_activations(
    model: nn.Module, layer: str, x_key: torch.Tensor, batch_size: int = 256
) -> torch.Tensor | None:
    """m: (classes, features), the mean over each class's key images (x_key: (classes, K, C,
    H, W)) of `layer`'s flattened output in eval mode, in fp32 on the CPU (None: no such
    layer, or it returns no tensor)."""
    cap = Capture(model, layer)
    if cap.module is None:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    means = []
    try:
        cap.on = True
        for images in x_key:
            total = None
            for i in range(0, len(images), batch_size):
                model(as_float(images[i : i + batch_size], device))
                out = cap.take()
                if out is None:
                    return None
                part = out.float().sum(0).cpu()
                total = part if total is None else total + part
            means.append(total / len(images))
    finally:
        cap.remove()
        model.train(was_training)
    return torch.stack(means)


def extract_bits(means: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The signature an activation carries: 1[sigmoid(m A) > 0.5] per class (= 1[m A > 0]),
    means (classes, features) x A (features, bits) -> (classes, bits) in {0., 1.}."""
    return (torch.sigmoid(means.float() @ a.float()) > 0.5).float()


def bit_accuracy(model: nn.Module, key: dict) -> float | None:
    """1 - BER of the signature read from `model` (None: no such layer or another width)."""
    means = mean_activations(model, key["layer"], key["x_key"])
    if means is None or means.shape[1] != key["A"].shape[0]:
        return None
    return (extract_bits(means, key["A"]) == key["b"]).float().mean().item()


# ----------------------------------------------------------------------------- the method


@register("deepsigns")
class DeepSigns(Method):
    Params = DeepSignsParams
    wm_metric = "bit_acc"
    version = "1"
    metrics = (
        *null_model_metrics("bit accuracy"),
        Metric(
            "layer_found",
            "1 if the suspect has the marked layer at its width (else read as chance)",
        ),  # fmt: skip
        Metric(
            "centre_bit_acc",
            "bit accuracy of the trained centres mu themselves (what the "
            "embedding reached; the activations must follow them)",
            None,
        ),  # fmt: skip
        *ALIGN_METRICS,
    )
    verify_params = ("align",)  # one marked model serves align: false and true

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_bits": 64, "key_images": 32, "wm_every": 1, "epochs": 6, "n_null": 2}

    def check_data(self, dataset) -> None:
        classes = known_classes(dataset)
        if classes is not None and self.params.n_classes_marked > classes:
            raise ConfigError("more Gaussians than the data set has classes",
                              field="n_classes_marked", value=self.params.n_classes_marked,
                              allowed=f"1 … {classes}")  # fmt: skip

    def check_arch(self, arch: str, dataset) -> None:
        spec = ModelSpec(arch, max(2, dataset.num_classes), dataset.channels, dataset.image_size)
        model = create_model(spec)
        example = torch.rand(2, dataset.channels, dataset.image_size, dataset.image_size)
        try:
            layer = pick_layer(model, self.params, example)
            width = layer_widths(model, [layer], example)[layer]
            if width is None:
                raise ConfigError("this module returns no tensor in the forward pass (unused, "
                                  "or a tuple)", field="layer", value=layer,
                                  allowed=candidate_layers(model))  # fmt: skip
            if width < self.params.n_bits:  # a centre of `width` values cannot carry them all
                raise ConfigError(f"more bits than layer {layer!r} holds ({width} values)",
                                  field="n_bits", value=self.params.n_bits,
                                  allowed=f"1 … {width}, or a wider layer")  # fmt: skip
        except ConfigError as e:
            raise ConfigError(f"arch {arch!r}: {e.message}", field=e.field, value=e.value,
                              allowed=e.allowed, hint=e.hint) from None  # fmt: skip

    def needs(self):
        """Null models: plain victims of the next `n_null` seeds (shared with those cells)."""
        return tuple(VictimRef(f"null{i}", seed_offset=1 + i) for i in range(self.params.n_null))

    def embed(self, victim, ctx) -> Embedded:
        p, owner, cfg = self.params, ctx.data.owner, ctx.train
        layer = pick_layer(victim, p, as_float(owner.x[:2]))
        g = torch.Generator().manual_seed(ctx.owner_seed)
        if p.n_classes_marked > ctx.data.num_classes:
            raise CellFailed(f"deepsigns: n_classes_marked {p.n_classes_marked} > "
                             f"{ctx.data.num_classes} classes")  # fmt: skip
        classes = torch.randperm(ctx.data.num_classes, generator=g)[: p.n_classes_marked]
        pools = [owner.x[owner.y == c] for c in classes.tolist()]
        n_keys = min(p.key_images, *(len(x) for x in pools))
        if n_keys < 2:
            raise CellFailed(f"deepsigns: a marked class has {n_keys} owner images (need 2)")
        x_key = torch.stack([x[torch.randperm(len(x), generator=g)[:n_keys]] for x in pools])
        mu0 = mean_activations(victim, layer, x_key)
        if mu0 is None:
            raise CellFailed(f"deepsigns: layer {layer!r} returns no tensor")
        a = torch.randn(mu0.shape[1], p.n_bits, generator=g)
        b = torch.randint(0, 2, (p.n_classes_marked, p.n_bits), generator=g).float()

        dev = ctx.device
        mu = mu0.to(dev).requires_grad_(True)
        a_dev, b_dev, cls_dev = a.to(dev), b.to(dev), classes.to(dev)
        # Adam on the centres, its step a share of their initial RMS: one mu_lr at any width
        mu_opt = torch.optim.Adam([mu], lr=p.mu_lr * mu0.pow(2).mean().sqrt().item())
        epochs = p.epochs if p.epochs is not None else cfg.epochs
        lr = p.lr if p.lr is not None else cfg.lr
        params = list(victim.parameters())
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)  # fmt: skip
        else:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(ctx.seed)
        per_epoch = -(-len(owner) // cfg.batch_size)
        perms = [torch.randperm(len(owner), generator=gen) for _ in range(epochs)]
        n_ce = epochs * per_epoch
        cycle = p.wm_every + 1  # wm_every CE steps, then one watermark step
        steps = n_ce + n_ce // p.wm_every
        per_key = min(cfg.batch_size, n_keys)
        cap = Capture(victim, layer)

        def batch(step: int):
            if (step + 1) % cycle == 0:
                ks = torch.randperm(len(classes), generator=gen)[: p.gaussians_per_step]
                picks = [torch.randperm(n_keys, generator=gen)[:per_key] for _ in ks]
                x = torch.cat([x_key[k][i] for k, i in zip(ks.tolist(), picks, strict=True)])
                which = ks.repeat_interleave(per_key).to(dev)
                idx = torch.randint(len(owner), (cfg.batch_size,), generator=gen)
                xo = as_float(owner.x[idx], dev)
                xo = random_shift(xo, gen) if cfg.augment else xo
                return "wm", as_float(x, dev), which, xo, owner.y[idx].to(dev)
            i = step - step // cycle
            idx = perms[i // per_epoch][(i % per_epoch) * cfg.batch_size :][: cfg.batch_size]
            x = as_float(owner.x[idx], dev)
            return "ce", (random_shift(x, gen) if cfg.augment else x), owner.y[idx].to(dev)

        def loss(bt) -> dict[str, torch.Tensor]:
            kind, x, y = bt[:3]
            if kind == "ce":
                return {"ce": F.cross_entropy(victim(x).float(), y)}
            # the key images ride on an ordinary owner batch in train mode, so that BatchNorm
            # sees a representative batch (not a single class); the extra CE is ordinary training
            n = len(x)
            cap.on = True
            try:
                logits = victim(torch.cat([x, bt[3]])).float()
                act = cap.take()[:n]
            finally:
                cap.on = False
            terms = {"ce": F.cross_entropy(logits[n:], bt[4])}
            logits = logits[:n]
            terms["ce_wm"] = p.gamma0 * F.cross_entropy(logits, cls_dev[y])
            with torch.autocast(torch.device(dev).type, enabled=False):
                act = act.float()
                terms["centre"] = p.gamma1 * (act - mu[y]).pow(2).sum()
                ks = y.unique()
                proj = mu[ks] @ a_dev
                bce = F.binary_cross_entropy_with_logits(proj, b_dev[ks], reduction="none")
                terms["signature"] = p.gamma2 * bce.mean(1).sum()
                if p.gamma3 > 0:
                    terms["norm"] = p.gamma3 * (1 - mu[ks].pow(2).sum(1)).abs().sum()
            return terms

        def update_centres() -> None:
            if mu.grad is not None:
                mu_opt.step()
                mu.grad = None  # WRT never zeroes it (its centres move by the running sum)

        try:
            train_loop(loss, opt, steps=steps, batch=batch, device=dev, amp=cfg.amp,
                       modules=[victim], after_step=update_centres, clip=p.clip)  # fmt: skip
        finally:
            cap.remove()
        centres = mu.detach().float().cpu()
        key = {"layer": layer, "A": a, "b": b, "classes": classes, "x_key": x_key, "mu": centres,
               "centre_bit_acc": (extract_bits(centres, a) == b).float().mean().item()}  # fmt: skip
        nulls = [bit_accuracy(ctx.inputs[f"null{i}"].model(), key) for i in range(p.n_null)]
        nulls = [0.5 if n is None else n for n in nulls]
        key.update(null_threshold(nulls, 0.5, b.numel(), p.p_value))
        return Embedded(victim, key)

    def verify(self, model, key, ctx) -> WatermarkScore:
        model, aligned = aligned_suspect(model, ctx, self.params.align)
        return bit_score(bit_accuracy(model, key), key["b"].numel(), key,
                         centre_bit_acc=key["centre_bit_acc"], **aligned)  # fmt: skip
