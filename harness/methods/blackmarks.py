"""BlackMarks (Chen et al., arXiv 1904.00344, 2019; WRT's `wm_blackmarks`): a bit string
encoded in the classes a black-box model predicts on targeted adversarial keys.

WRT's recipe, as taken here:
1. Clustering: the victim's mean logit vector of each class (over the owner split), KMeans
   with 2 clusters (scikit-learn) on those vectors: each class c gets a bit f(c).
2. Candidates: up to `candidates` owner images per cluster; each gets one targeted FGSM step
   of `eps` (L-inf, [0, 1] pixel units) toward a random class of the other cluster, and keeps
   its original label.
3. Embedding: the model is fine-tuned on the owner split plus the candidates (repeated
   `boost` times) with their original labels, so that it maps them back into their own
   cluster.
4. Filter: a candidate survives if the marked model assigns it its original class and a copy
   of the victim fine-tuned on the owner split for `filter_epochs` does not (so that
   fine-tuning alone would not explain it).
5. Keys: a random `n_bits` signature from the owner secret; for each bit, a surviving
   candidate of the cluster that encodes it.
Verification decodes each key's predicted class through f and reports the bit accuracy
against the signature (1 - the bit error rate), against WRT's null-model threshold (chance
0.5) and the exact binomial p-value.

Decisions: WRT's extra key loss, the mean |softmax(logits)·f - b| over a key batch, pushes a
candidate's probability into its own cluster; cross-entropy on the candidate's original
class (which lies in that cluster) already does, so the embedding here is plain fine-tuning
on the boosted set (WRT also lowers the lr ten-fold: `lr`, default train.lr / 10). WRT's
early stopping is a fixed epoch count here.
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.decision import binomial_p, null_figures, null_model_metrics, null_threshold
from harness.errors import CellFailed
from harness.methods.base import Embedded, Method, VictimRef, WatermarkScore, register
from harness.methods.frontier_stitching import fgsm
from harness.training import as_float, fit, predict_logits


class BlackMarksParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_bits: int = Field(200, ge=2, le=10_000, description="signature bits = keys (WRT: 200)")
    eps: float = Field(0.1, gt=0, le=1, description="targeted FGSM step (WRT: 0.1)")
    candidates: int = Field(1000, ge=2, description="candidates per cluster (WRT: 1,000)")
    boost: int = Field(10, ge=1, le=1000, description="times the candidates are repeated")
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr / 10)")
    filter_epochs: int = Field(1, ge=1, description="fine-tuning of the filter's victim copy")
    n_null: int = Field(3, ge=2, le=50)
    p_value: float = Field(0.05, gt=0, lt=0.5)


def class_clusters(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, device, seed: int):
    """Bit f(c) of every class: KMeans(2) on the classes' mean logit vectors."""
    from sklearn.cluster import KMeans  # lazy: start-up time

    logits = predict_logits(model, x, device)
    means = torch.stack([
        logits[y == c].mean(0) if (y == c).any() else torch.zeros(logits.shape[1])
        for c in range(num_classes)
    ])  # fmt: skip
    labels = KMeans(2, n_init=10, random_state=seed % 2**31).fit_predict(means.numpy())
    return torch.as_tensor(labels, dtype=torch.long)


def bit_accuracy(model, key: dict, device) -> float:
    decoded = key["f"][predict_logits(model, key["x"], device).argmax(1)]
    return (decoded == key["bits"]).float().mean().item()


@register("blackmarks")
class BlackMarks(Method):
    Params = BlackMarksParams
    wm_metric = "bit_acc"
    version = "1"
    metrics = null_model_metrics("bit accuracy")

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_bits": 16, "eps": 0.3, "candidates": 60, "n_null": 2, "epochs": 4,
                "boost": 5, "lr": 0.05}  # fmt: skip

    def needs(self):
        """Null models: plain victims of the next `n_null` seeds (shared with those cells)."""
        return tuple(VictimRef(f"null{i}", seed_offset=1 + i) for i in range(self.params.n_null))

    def embed(self, victim, ctx) -> Embedded:
        p, d, owner = self.params, ctx.data, ctx.data.owner
        f = class_clusters(victim, owner.x, owner.y, d.num_classes, ctx.device, ctx.owner_seed)
        if len(set(f.tolist())) < 2:
            raise CellFailed("blackmarks: every class fell into one cluster")
        g = torch.Generator().manual_seed(ctx.owner_seed)
        xs, ys = [], []
        for bit in (0, 1):
            mine = torch.nonzero(f[owner.y] == bit).flatten()
            mine = mine[torch.randperm(len(mine), generator=g)[: p.candidates]]
            others = torch.nonzero(f != bit).flatten()
            target = others[torch.randint(len(others), (len(mine),), generator=g)]
            xs.append(fgsm(victim, owner.x[mine], p.eps, ctx.device, target=target))
            ys.append(owner.y[mine])
        cand_x, cand_y = torch.cat(xs), torch.cat(ys)

        reference = copy.deepcopy(victim)  # the filter: what fine-tuning alone would do
        fit(reference, owner.x, owner.y, ctx.train, ctx.device, ctx.seed + 1,
            epochs=p.filter_epochs)  # fmt: skip
        lr = p.lr if p.lr is not None else ctx.train.lr / 10
        train_x = torch.cat([as_float(owner.x), cand_x.repeat(p.boost, 1, 1, 1)])
        train_y = torch.cat([owner.y, cand_y.repeat(p.boost)])
        fit(victim, train_x, train_y, ctx.train, ctx.device, ctx.seed, epochs=p.epochs, lr=lr)

        kept = (predict_logits(victim, cand_x, ctx.device).argmax(1) == cand_y) & (
            predict_logits(reference, cand_x, ctx.device).argmax(1) != cand_y
        )
        bits = torch.randint(0, 2, (p.n_bits,), generator=g)
        keys = []
        for bit in (0, 1):
            pool = torch.nonzero(kept & (f[cand_y] == bit)).flatten()
            need = int((bits == bit).sum())
            if len(pool) < need:
                raise CellFailed(
                    f"blackmarks: {len(pool)} candidates of cluster {bit} survive the filter, "
                    f"the signature needs {need}; raise candidates or eps, or lower n_bits"
                )
            keys.append(pool[torch.randperm(len(pool), generator=g)[:need]])
        order = torch.empty(p.n_bits, dtype=torch.long)
        for bit, chosen in zip((0, 1), keys, strict=True):
            order[bits == bit] = chosen
        key = {"x": cand_x[order], "bits": bits, "f": f}
        null_models = [ctx.inputs[f"null{i}"].model() for i in range(p.n_null)]
        accs = [bit_accuracy(m, key, ctx.device) for m in null_models]
        key.update(null_threshold(accs, 0.5, p.n_bits, p.p_value))
        return Embedded(victim, key)

    def verify(self, model, key, ctx) -> WatermarkScore:
        acc = bit_accuracy(model, key, ctx.device)
        return WatermarkScore(
            score=acc,
            detected=acc >= key["threshold"],
            threshold=key["threshold"],
            metrics={**null_figures(key), "p_value": binomial_p(acc, len(key["bits"]), 0.5)},
        )
