"""Frontier stitching (Le Merrer et al., Neural Computing and Applications 2019; WRT's
`wm_frontier_stitching`): keys are adversarial examples near the owner model's decision
boundary, and the model is fine-tuned to classify them all with their original labels.

Keys (WRT's recipe): from up to `candidates` owner-split images the model classifies
correctly (chosen with the owner secret), one untargeted FGSM step of size `eps` (L-inf, in
[0, 1] pixel space, against the model's own prediction, clipped to [0, 1]). "True
adversaries" flipped the prediction, "false adversaries" did not; half the keys of each,
labelled with their original class (short of either kind, the other fills in; the row
reports the share of true ones). The model is then fine-tuned on the owner split plus
the keys repeated `boost` times (WRT: 10; a fixed epoch count instead of WRT's early
stopping). Verification is the accuracy on the keys against their original labels.

Decisions: keys stay float in [0, 1] (an `eps` of 0.01 is 2.55 grey levels: rounding to
uint8 would change it). Null models, independently trained, classify the false adversaries
(and some true ones) correctly, so chance is not 1 / classes here: the threshold is WRT's
Gaussian over the null models' key accuracy, and the binomial p-value is taken against the
null models' mean accuracy instead of 1 / classes (and the threshold's binomial floor is the
spread of a binomial at that mean). Where the null models classify the keys as well as the
marked model does (an easy task, a small `eps`: few true adversaries), the scheme cannot be
told from them, and the rows say so rather than claim a detection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.decision import binomial_p, null_figures, null_model_metrics, null_threshold
from harness.errors import CellFailed
from harness.methods.base import Embedded, Metric, WatermarkScore, register
from harness.methods.trigger_set import TriggerSet, trigger_accuracy
from harness.training import as_float, fit, predict_logits


class FrontierParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_keys: int = Field(100, ge=2, le=10_000, description="keys, half true adversaries (WRT: 100)")
    eps: float = Field(0.01, gt=0, le=1, description="FGSM step in [0, 1] pixel units (WRT: 0.01)")
    candidates: int = Field(1000, ge=2, description="owner images tried (WRT: 1,000)")
    boost: int = Field(10, ge=1, le=1000, description="times the key set is repeated (WRT: 10)")
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr)")
    n_null: int = Field(3, ge=2, le=50)
    p_value: float = Field(0.05, gt=0, lt=0.5)


def fgsm(model, x: torch.Tensor, eps: float, device, target: torch.Tensor | None = None,
         batch: int = 256) -> torch.Tensor:  # fmt: skip
    """One FGSM step of `eps` (L-inf), float in [0, 1]: away from the model's own prediction
    (untargeted), or toward `target` labels (targeted: BlackMarks' candidates)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = as_float(x[i : i + batch], device).requires_grad_(True)
        logits = model(xb)
        goal = logits.argmax(1) if target is None else target[i : i + batch].to(device)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, goal), xb)
        step = eps * grad.sign() if target is None else -eps * grad.sign()
        out.append((xb + step).clamp(0, 1).detach().cpu())
    return torch.cat(out)


@register("frontier_stitching")
class FrontierStitching(TriggerSet):
    Params = FrontierParams
    wm_metric = "key_acc"
    version = "1"
    metrics = (
        *null_model_metrics("key accuracy"),
        Metric("true_share", "share of true adversaries among the keys (0.5 when enough)", None),
    )

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_keys": 40, "eps": 0.3, "candidates": 400, "n_null": 2, "epochs": 4,
                "boost": 5}  # fmt: skip

    def embed(self, victim, ctx) -> Embedded:
        null_models = [ctx.inputs[f"null{i}"].model() for i in range(self.params.n_null)]
        p, owner = self.params, ctx.data.owner
        g = torch.Generator().manual_seed(ctx.owner_seed)
        pick = torch.randperm(len(owner), generator=g)[: p.candidates]
        x, y = owner.x[pick], owner.y[pick]
        correct = predict_logits(victim, x, ctx.device).argmax(1) == y
        x, y = x[correct], y[correct]
        adv = fgsm(victim, x, p.eps, ctx.device)
        flipped = predict_logits(victim, adv, ctx.device).argmax(1) != y
        n_true = min(p.n_keys // 2, int(flipped.sum()))
        n_false = min(p.n_keys - n_true, int((~flipped).sum()))
        n_true = min(p.n_keys - n_false, int(flipped.sum()))  # short of false ones: more true
        if n_true + n_false < p.n_keys:
            raise CellFailed(
                f"frontier_stitching: {len(x)} correctly classified candidates give "
                f"{int(flipped.sum())} true and {int((~flipped).sum())} false adversaries, "
                f"fewer than n_keys {p.n_keys}; raise candidates or lower n_keys"
            )
        keys_x = torch.cat([adv[flipped][:n_true], adv[~flipped][:n_false]])
        keys_y = torch.cat([y[flipped][:n_true], y[~flipped][:n_false]])
        train_x = torch.cat([as_float(owner.x), keys_x.repeat(p.boost, 1, 1, 1)])
        train_y = torch.cat([owner.y, keys_y.repeat(p.boost)])
        fit(victim, train_x, train_y, ctx.train, ctx.device, ctx.seed, epochs=p.epochs, lr=p.lr)
        key = {"x": keys_x, "y": keys_y, "true_share": n_true / p.n_keys}
        accs = [trigger_accuracy(m, key, ctx.device) for m in null_models]
        spread = min(max(sum(accs) / len(accs), 0.01), 0.99)  # binomial floor about their mean
        key.update(null_threshold(accs, spread, p.n_keys, p.p_value))
        return Embedded(victim, key)

    def verify(self, model, key, ctx) -> WatermarkScore:
        acc = trigger_accuracy(model, key, ctx.device)
        chance = min(max(key["null_mean"], 1e-6), 1 - 1e-6)  # the null models' accuracy
        return WatermarkScore(
            score=acc,
            detected=acc >= key["threshold"],
            threshold=key["threshold"],
            metrics={
                **null_figures(key),
                "p_value": binomial_p(acc, len(key["y"]), chance),
                "true_share": key["true_share"],
            },
        )
