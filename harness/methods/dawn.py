"""DAWN — Dynamic Adversarial Watermarking of Neural Networks (Szyller et al., ACM MM 2021;
WRT's `wm_dawn`): the owner's serving API answers a secret, keyed share of queries with a wrong
label; nothing in the weights changes. A model extracted from the API's answers learns those
wrong labels, and the owner, who logged them, shows that the suspect repeats them.

Serving (`serve`, on every answer of the deployment): HMAC-SHA256 of the query under a 32-byte
key made from the owner secret; the query is watermarked when the first 16 digest bytes
(little-endian) fall below `rate` x 2^128. Its answer is the model's logits with the classes
of softmax probability above `min_prob` (fewer than two: the top `top`) permuted by a
Fisher-Yates shuffle seeded by the last 16 digest bytes, reshuffled until the argmax moves; the
new argmax is the watermark label. The logits are permuted, not replaced by a one-hot, so a
soft-label extraction sees a plausible answer.

Verification, by what the suspect is:
- a copy trained on the API's answers (an attack with `queries_api`, e.g. `distill`): the first
  `n_keys` watermarked queries the API logged for that attacker, with the labels it gave;
- anything else (the deployment itself, or its weights modified without the API): the owner's
  reference key, the first `n_keys` watermarked answers to queries over its own split (WRT's
  key). The deployment answers through the filter, so it matches by construction (DAWN's
  "marked" figure is a self-test of the filter); weights taken and changed without the API carry
  no mark, and the rows say so.
The score is the suspect's accuracy on those labels, against WRT's Gaussian over null models
(independently trained victims) on the same keys. Chance, for the binomial floor of that
Gaussian and for the p-value, is the null models' mean repeat rate but at least 1 / classes:
the labels are runner-up classes, which an independent model may pick more often than 1 /
classes, while three null models on a few dozen keys often repeat none (a floor at zero would
call two repeated labels a detection).

Decisions: the hash is over the query's 8-bit pixels (DAWN's paper) rather than WRT's binarised
penultimate activations (a perturbed repeat of a query is a new query here); `rate` defaults
to 0.01, the value WRT's code runs (its YAML's 0.05 is silently ignored there); the label
reshuffles until the argmax moves (WRT's "until the order changes" may keep the argmax: an
unaltered answer counted as watermarked); WRT's surrogate training on all 50,000 labelled
images is replaced by the grid's own extraction attacks on the attacker's split.
"""

from __future__ import annotations

import hashlib
import hmac
import random

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks import ATTACKS
from harness.decision import (
    binomial_p,
    null_chance,
    null_figures,
    null_model_metrics,
    null_threshold,
)
from harness.errors import CellFailed
from harness.methods.base import Embedded, Method, Metric, VictimRef, WatermarkScore, register
from harness.training import as_float, predict_logits


class DawnParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(0.01, gt=0, le=0.5, description="share of queries answered wrongly")
    n_keys: int = Field(100, ge=1, le=10_000, description="watermarked queries judged")
    min_prob: float = Field(0.2, gt=0, lt=1, description="classes eligible for the new label")
    top: int = Field(3, ge=2, description="eligible classes when fewer pass min_prob")
    n_null: int = Field(3, ge=2, le=50)
    p_value: float = Field(0.05, gt=0, lt=0.5)


def _quantised(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def relabel(logits: torch.Tensor, seed: int, min_prob: float, top: int) -> torch.Tensor:
    """`logits` (one query) with its likely classes shuffled until the argmax moves."""
    probs = F.softmax(logits, 0)
    classes = torch.nonzero(probs > min_prob).flatten().tolist()
    if len(classes) < 2:
        classes = probs.topk(min(top, len(probs))).indices.tolist()
    rng, first = random.Random(seed), int(logits.argmax())
    out = logits.clone()
    for _ in range(64):
        order = classes[:]
        rng.shuffle(order)  # Fisher-Yates
        out[classes] = logits[order]
        if int(out.argmax()) != first:
            return out
    # ties can keep the argmax (equal logits): swap the top class with another eligible one
    other = next(c for c in classes if c != first)
    out = logits.clone()
    out[first], out[other] = logits[other], logits[first] + 1e-3
    return out


def agreement(model, x: torch.Tensor, labels: torch.Tensor, device) -> torch.Tensor:
    """Per key, 1.0 where `model` answers its watermark label."""
    return (predict_logits(model, x, device).argmax(1) == labels).float()


@register("dawn")
class Dawn(Method):
    Params = DawnParams
    wm_metric = "wm_acc"
    version = "1"
    marks_weights = False  # the weights never change: only the deployment's answers do
    serves = True
    metrics = (
        *null_model_metrics("watermark accuracy"),
        Metric("n_keys", "watermarked queries judged", None, agg="min"),
        Metric("keys_from_api", "1: the attacker's logged queries; 0: the owner's reference key",
               None),
    )  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"rate": 0.2, "n_keys": 20, "n_null": 2}

    def needs(self):
        return tuple(VictimRef(f"null{i}", seed_offset=1 + i) for i in range(self.params.n_null))

    def scenario_warnings(self, scenario) -> list[str]:
        if any(ATTACKS.get(a.name).queries_api for a in scenario.attacks):
            return []
        extraction = [n for n in ATTACKS.list() if ATTACKS.get(n).queries_api]
        return [
            "no attack in the grid learns from the served model's answers, so DAWN's mark "
            f"is never tested on a stolen copy; add one of: {', '.join(extraction)}"
        ]

    # ------------------------------------------------------------------ the API's filter

    def serve(self, x, logits, secret):
        p, rate = self.params, float(secret["rate"])
        key = bytes(secret["hmac_key"].tolist())
        limit = int(rate * 2**128)
        queries = _quantised(x).flatten(1).numpy()
        answers, marked = logits.float().clone(), torch.zeros(len(x), dtype=torch.bool)
        for i, query in enumerate(queries):
            digest = hmac.new(key, query.tobytes(), hashlib.sha256).digest()
            if int.from_bytes(digest[:16], "little") < limit:
                seed = int.from_bytes(digest[16:], "little")
                answers[i] = relabel(answers[i].cpu(), seed, p.min_prob, p.top).to(answers.device)
                marked[i] = True
        return answers, marked

    # ------------------------------------------------------------------ owner side

    def embed(self, victim, ctx) -> Embedded:
        p, owner = self.params, ctx.data.owner
        g = torch.Generator().manual_seed(ctx.owner_seed)
        secret = {
            "hmac_key": torch.randint(0, 256, (32,), generator=g, dtype=torch.uint8),
            "rate": p.rate,
        }
        answers, marked = self.serve(
            as_float(owner.x), predict_logits(victim, owner.x, ctx.device), secret
        )
        if not marked.any():
            raise CellFailed(
                f"dawn: none of the owner's {len(owner)} queries is watermarked at rate "
                f"{p.rate}: raise rate (the reference key needs at least one)"
            )
        secret["x"] = owner.x[marked][: p.n_keys]
        secret["y"] = answers[marked].argmax(1)[: p.n_keys]
        secret.update(self._calibrate(secret["x"], secret["y"], ctx))
        return Embedded(victim, secret)

    def _calibrate(self, x, y, ctx) -> dict:
        nulls = [ctx.inputs[f"null{i}"].model() for i in range(self.params.n_null)]
        accs = [agreement(m, x, y, ctx.device).mean().item() for m in nulls]
        chance = null_chance(accs, ctx.data.num_classes)
        return null_threshold(accs, chance, len(y), self.params.p_value)

    def verify(self, model, secret, ctx) -> WatermarkScore:
        log = ctx.api_log
        if log is not None:  # a copy trained on the API's answers: the attacker's own queries
            x, y = log["x"][: self.params.n_keys], log["answers"][: self.params.n_keys].argmax(1)
            decision = self._calibrate(x, y, ctx)
        else:
            x, y, decision = secret["x"], secret["y"], secret
        acc = agreement(model, x, y, ctx.device).mean().item()
        chance = null_chance(decision["null_scores"], ctx.data.num_classes)
        return WatermarkScore(
            score=acc,
            detected=acc >= decision["threshold"],
            threshold=decision["threshold"],
            metrics={
                **null_figures(decision),
                "p_value": binomial_p(acc, len(y), chance),
                "n_keys": float(len(y)),
                "keys_from_api": float(log is not None),
            },
        )
