"""Entangled Watermark Embedding (Jia et al., USENIX Security 2021; WRT's `wm_jia`).

Keys are owner images of `source_class` with a white square trigger, labelled `target_class`.
Embedding entangles them with the real target class: besides ordinary cross-entropy steps on
the owner split, every `wm_every`-th step is a watermark batch (of `wm_batch` drawn from the
keys plus as many clean target-class images, all labelled the target class, the model in eval
mode) whose loss is CE - `snnl_weight` * (sum over layers of the soft nearest-neighbour loss
between triggered and clean samples) / 20. Maximising the SNNL makes the triggered images'
representations indistinguishable from the target class's, so that removing the watermark
costs task accuracy. Verification is the trigger accuracy against WRT's null-model threshold
and the exact binomial p-value.

SNNL (Frosst et al. 2019), per layer: squared distances d_ij of the flattened activations;
f_ij = exp(-d_ij / t) - [i = j], clamped to [0, 1]; p_ij = f_ij / (1e-7 + sum_k f_ik);
SNNL = mean_i -log(1e-7 + sum_{j: same group} p_ij), t = 100 / (tau + 1e-7) with a trainable
tau per layer initialised to `temperature` (64) and its own lr 0.01, as in WRT.

Decisions taken for timm networks (WRT's code sums over every non-logit activation of its
small CNN): the SNNL layers are the outputs of the last `snnl_layers` (3) top-level blocks
before the classifier (ResNet: layer3, layer4 and the global pool), and each sample's activation is
L2-normalised before the distances, so that one temperature means the same at any width;
the lr is train.lr / 10 (WRT), with a fixed epoch count instead of WRT's early stopping.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.errors import CellFailed
from harness.methods.base import Embedded, register
from harness.methods.trigger_set import TriggerSet
from harness.methods.zhang import check_classes
from harness.training import as_float, train_loop

HEADS = ("fc", "classifier", "head", "last_linear")  # timm's classifier names


class JiaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_keys: int = Field(100, ge=2, le=10_000, description="triggered keys (WRT: 100)")
    source_class: int = Field(4, ge=0, description="class of the triggered images (WRT: 4)")
    target_class: int = Field(6, ge=0, description="their label (WRT: 6)")
    trigger_size: int = Field(5, ge=1, le=32, description="white square side at 32 px (WRT: 5)")
    snnl_weight: float = Field(64.0, ge=0, description="w of CE - w * SNNL / 20 (WRT: 64)")
    temperature: float = Field(64.0, gt=0, description="initial tau per layer (WRT: 64)")
    snnl_layers: int = Field(3, ge=1, le=10, description="top-level blocks whose outputs count")
    wm_every: int = Field(30, ge=1, description="a watermark batch every N steps (WRT: 30)")
    wm_batch: int = Field(128, ge=2, description="watermark batch size (WRT: 128)")
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr / 10)")
    n_null: int = Field(3, ge=2, le=50)
    p_value: float = Field(0.05, gt=0, lt=0.5)


def snnl(h: torch.Tensor, groups: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Soft nearest-neighbour loss of activations `h` (n, ...) between `groups` at `t`."""
    h = F.normalize(h.flatten(1).float(), dim=1)
    d = torch.cdist(h, h).pow(2)
    f = (torch.exp(-d / t) - torch.eye(len(h), device=h.device)).clamp(0, 1)
    p = f / (1e-7 + f.sum(1, keepdim=True))
    same = (groups[:, None] == groups[None, :]).float()
    return -torch.log(1e-7 + (p * same).sum(1)).mean()


def feature_blocks(model: nn.Module, n: int) -> list[nn.Module]:
    """The last `n` top-level children before the classifier (those with parameters or a
    pooling role), whose outputs the SNNL entangles."""
    blocks = [m for name, m in model.named_children() if name not in HEADS
              and not isinstance(m, (nn.Dropout, nn.Flatten, nn.Identity))]  # fmt: skip
    return blocks[-n:]


@register("jia")
class Jia(TriggerSet):
    Params = JiaParams
    version = "1"

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_keys": 10, "source_class": 0, "target_class": 1, "n_null": 2, "epochs": 6,
                "wm_every": 2, "wm_batch": 16, "lr": 0.05, "snnl_weight": 4.0}  # fmt: skip

    def check_data(self, dataset) -> None:
        check_classes(self.params, dataset)

    def embed(self, victim, ctx) -> Embedded:
        p, d, owner = self.params, ctx.data, ctx.data.owner
        g = torch.Generator().manual_seed(ctx.owner_seed)
        source = owner.x[owner.y == p.source_class]
        target = owner.x[owner.y == p.target_class]
        if len(source) < p.n_keys or len(target) < p.n_keys:
            raise CellFailed(
                f"jia: n_keys {p.n_keys} > the owner images of source_class {p.source_class} "
                f"({len(source)}) or target_class {p.target_class} ({len(target)})"
            )
        keys = source[torch.randperm(len(source), generator=g)[: p.n_keys]].clone()
        side, at = max(1, round(p.trigger_size * d.image_size / 32)), round(2 * d.image_size / 32)
        keys[:, :, at : at + side, at : at + side] = 255
        clean = target[torch.randperm(len(target), generator=g)[: p.n_keys]]
        wm_x = torch.cat([keys, clean])
        wm_groups = torch.cat([torch.zeros(p.n_keys), torch.ones(p.n_keys)]).long()

        acts: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: acts.append(out))
                 for b in feature_blocks(victim, p.snnl_layers)]  # fmt: skip
        taus = nn.Parameter(torch.full((len(hooks),), p.temperature, device=ctx.device))
        cfg = ctx.train
        lr = p.lr if p.lr is not None else cfg.lr / 10
        groups = [{"params": victim.parameters()}, {"params": [taus], "lr": 0.01}]
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        epochs = p.epochs if p.epochs is not None else cfg.epochs
        steps = epochs * -(-len(owner) // cfg.batch_size)
        gen = torch.Generator().manual_seed(ctx.seed)
        target_y = torch.tensor(p.target_class, device=ctx.device)

        def batch(step: int):
            if (step + 1) % p.wm_every == 0:
                idx = torch.randperm(len(wm_x), generator=gen)[: p.wm_batch]
                return "wm", as_float(wm_x[idx], ctx.device), wm_groups[idx].to(ctx.device)
            idx = torch.randint(len(owner), (cfg.batch_size,), generator=gen)
            return "task", as_float(owner.x[idx], ctx.device), owner.y[idx].to(ctx.device)

        def loss(b) -> dict[str, torch.Tensor]:
            kind, x, y = b
            acts.clear()
            if kind == "task":
                return {"ce": F.cross_entropy(victim(x).float(), y)}
            victim.eval()  # WRT: watermark batches in eval mode
            logits = victim(x).float()
            victim.train()
            t = 100 / (taus + 1e-7)
            entangle = sum(snnl(a, y, t[i]) for i, a in enumerate(acts))
            ce = F.cross_entropy(logits, target_y.expand(len(x)))
            return {"ce_wm": ce, "snnl": -p.snnl_weight * entangle / 20}

        try:
            train_loop(loss, opt, steps=steps, batch=batch, device=ctx.device, amp=cfg.amp,
                       modules=[victim])  # fmt: skip
        finally:
            for h in hooks:
                h.remove()
        y = torch.full((p.n_keys,), p.target_class, dtype=owner.y.dtype)
        key = {"x": keys, "y": y}
        null_models = [ctx.inputs[f"null{i}"].model() for i in range(p.n_null)]
        key.update(self._calibrate(key, null_models, ctx))
        return Embedded(victim, key)

