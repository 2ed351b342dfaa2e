"""Watermark overwriting (WRT's `wrt/attacks/removal/overwriting.py`; the ambiguity attack of
Adi et al., USENIX Security 2018, section 5): the attacker embeds a trigger set of its OWN into
the marked model, as the owner embedded theirs, so that the model carries two marks - and the
training may push the owner's out.

The attacker's keys come from `harness.methods.trigger_set.make_triggers` (Adi-style abstract
or noise images with uniform random labels), seeded from the cell's seed - public, the
attacker's - and never from the owner's secret. The model is fine-tuned on the attacker split
plus those keys, repeated so that they make up `key_share` of the training set (as
`trigger_set` boosts its keys), for `epochs` (default: the train config's, as `trigger_set`
embeds) at `lr` (default: the train config's). The attacker images are labelled with the marked
model's predicted class (WRT's overwriting relabels them by the model's argmax; `labels: true`:
ground truth).

Row figure: `attacker_key_acc`, the accuracy on the attacker's own keys after the attack (its
claim: near 1 when the overwrite took).

Departures from WRT: WRT re-runs the defended scheme's own `embed` with fresh keys (its
configured epochs and early stopping); here the attacker always embeds an Adi trigger set,
whatever the owner's scheme, with a fixed number of epochs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.weight_shifting import LABELS_DESCRIPTION, Labels, attacker_targets
from harness.methods.trigger_set import make_triggers, trigger_accuracy
from harness.training import fit

KEY_SEED_OFFSET = 1_000_003  # the attacker's key seed: the cell's seed plus this


class OverwriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_keys: int = Field(100, ge=1, le=10_000, description="the attacker's keys (Adi, WRT: 100)")
    pattern: Literal["abstract", "noise"] = Field("abstract", description="key images")
    key_share: float = Field(0.1, gt=0, lt=1, description="share of keys in the training data")
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr)")
    labels: Labels = Field("predicted", description=LABELS_DESCRIPTION)


def key_repeats(n_data: int, n_keys: int, share: float) -> int:
    """How often the keys are repeated to make up `share` of data + keys (at least once)."""
    return max(1, round(share * n_data / ((1 - share) * n_keys)))


@register("overwrite")
class Overwrite(Attack):
    Params = OverwriteParams
    metrics = (Metric("attacker_key_acc", "accuracy on the attacker's own trigger set after "
                      "the attack (its overwriting claim)", higher_is_better=None),)  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_keys": 20, "epochs": 3}

    def apply(self, model, ctx):
        p, d = self.params, ctx.data
        keys_x, keys_y = make_triggers(p.n_keys, d.channels, d.image_size, d.num_classes,
                                       p.pattern, ctx.seed + KEY_SEED_OFFSET)  # fmt: skip
        data = d.attacker
        labels = attacker_targets(model, ctx, data.x, data.y, p.labels).argmax(1)
        repeat = key_repeats(len(data), p.n_keys, p.key_share)
        x = torch.cat([data.x, keys_x.repeat(repeat, 1, 1, 1)])
        y = torch.cat([labels, keys_y.repeat(repeat)])
        fit(model, x, y, ctx.train, ctx.device, ctx.seed, epochs=p.epochs, lr=p.lr)
        key_acc = trigger_accuracy(model, {"x": keys_x, "y": keys_y}, ctx.device)
        return Attacked(model, metrics={"attacker_key_acc": key_acc})
