"""Feature permutation under WRT's name (WRT's `wrt/attacks/removal/feature_shuffling.py`): a
function-preserving reordering of the hidden filters of the marked network.

The same exact permutation as `permute` (`harness.attacks.permute`: every hidden channel chain
of the network reordered at random, its consumers' input columns with it, logits unchanged),
registered again so that WRT's attack catalogue reads one-to-one. WRT itself only sets a flag
(`shuffle_intermediate_features = True`) that its WRN never reads (WRT.md section 6), so there
are no WRT semantics to differ from: its paper describes a filter permutation, which is what
`permute` does, chain by chain (a layer's filters, its BatchNorm and the next layer's inputs
move together; a residual stream is permuted as one, since permuting its layers apart would
change the function). Parameters, row figures (`max_logit_deviation`, `channels_changed`) and
the archs refused at validation are `permute`'s.
"""

from __future__ import annotations

from harness.attacks.base import register
from harness.attacks.permute import Permute


@register("feature_shuffle")
class FeatureShuffle(Permute):
    version = "1"
