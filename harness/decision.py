"""Decision statistics shared by plug-ins: WRT's null-model threshold and the exact binomial
test of a key accuracy against chance."""

from __future__ import annotations

import math
from statistics import NormalDist

from harness.plugin import Metric, WatermarkScore
from results import stats


def null_model_metrics(score: str) -> tuple[Metric, ...]:
    """What a method with a null-model threshold reports beside its `score` (e.g. "trigger
    accuracy"): the null models' mean and spread and the binomial p-value."""
    return (
        Metric("null_mean", f"{score} of the null models (never carried the mark)", False),
        Metric("null_std", "their spread (floored at a chance-level binomial's)", None),
        Metric("p_value", f"exact binomial p of the {score} against chance", False),
    )


def null_threshold(
    null_scores: list[float], chance: float, n_keys: int, p_value: float
) -> dict[str, float]:
    """WRT's threshold: a Gaussian fitted to the null models' scores (independently trained
    models that never carried the mark), one-sided at `p_value`. Few null models can agree
    exactly, so the binomial spread of a chance-level model over `n_keys` keys floors sigma."""
    n = len(null_scores)
    mean = sum(null_scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in null_scores) / (n - 1)) if n > 1 else 0.0
    std = max(std, math.sqrt(chance * (1 - chance) / n_keys))
    threshold = NormalDist(mean, std).inv_cdf(1 - p_value)
    scores = [float(s) for s in null_scores]
    return {"threshold": threshold, "null_mean": mean, "null_std": std, "null_scores": scores}


def null_chance(null_scores: list[float], num_classes: int) -> float:
    """Chance for keys whose labels an unrelated model may share more often than 1 / classes
    (boundary points, runner-up labels, adversarial labels): the null models' mean score, but
    at least 1 / classes - a few null models on a few dozen keys often match none, and a
    binomial floor about zero would call two matches a detection - and at most 0.99. For the
    binomial floor of `null_threshold` and the p-value of `binomial_p`."""
    mean = sum(null_scores) / len(null_scores)
    return min(max(mean, 1.0 / num_classes), 0.99)


NULL_SCORE_PREFIX = "null_score_"  # + i: the i-th null model's score (the report's negatives)


def null_figures(key: dict) -> dict[str, float]:
    """The row metrics of a key calibrated by `null_threshold`: the null models' mean and
    spread, and each null model's own score (`null_score_<i>`), which `harness report` takes
    as negatives of its ROC (a key made before the scores were kept gives none)."""
    scores = key.get("null_scores", ())
    return {
        "null_mean": key["null_mean"],
        "null_std": key["null_std"],
        **{f"{NULL_SCORE_PREFIX}{i}": float(s) for i, s in enumerate(scores)},
    }


def binomial_p(accuracy: float, n_keys: int, chance: float) -> float:
    """Exact one-sided binomial p-value of `accuracy` over `n_keys` keys against chance."""
    return stats.binomial_p(round(accuracy * n_keys), n_keys, chance)


def bit_score(acc: float | None, n_bits: int, key: dict, **metrics: float) -> WatermarkScore:
    """The verdict of a mark read as bits against chance (Uchida, DeepSigns): `acc` None - the
    suspect lacks the marked layer, or has it at another width - reads as chance (0.5) with
    `layer_found` 0; detected when the bit accuracy clears the key's null-model threshold; the
    null figures, the exact binomial p against 0.5 and `metrics` beside it."""
    found = acc is not None
    acc = acc if found else 0.5
    return WatermarkScore(
        score=acc,
        detected=found and acc >= key["threshold"],
        threshold=key["threshold"],
        metrics={
            **null_figures(key),
            "p_value": binomial_p(acc, n_bits, 0.5),
            "layer_found": float(found),
            **metrics,
        },
    )
