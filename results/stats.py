"""Decision statistics for `harness report`: intervals, separability, p-values, removal.

Only numpy, pandas and scipy are imported, so the report can run anywhere the results are.

Conventions:
- A *share* (detected, removed) is k successes out of n cells; its interval is the Wilson
  score interval, which stays inside [0, 1] and is sensible for small n and for k = 0 or n.
- A *mean* (watermark score, task drop) is averaged over the cells of a group (one cell per
  seed when the group is method x arch x attack); its interval is a percentile bootstrap of
  the mean with a fixed seed, so the same rows always give the same report.
- Every function returns NaN instead of raising when there is nothing to estimate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

NAN = float("nan")

#: The largest task drop (marked - attacked) an attack may cost and still count as a removal,
#: per task metric; metrics not listed use DEFAULT_BUDGET (5 points of a score in [0, 1]).
BUDGET: dict[str, float] = {"psnr": 2.0}
DEFAULT_BUDGET = 0.05

#: Below this many negatives a separability figure is reported as resting on few negatives.
FEW_NEGATIVES = 10


# --------------------------------------------------------------------------------- intervals


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the share k/n (no continuity correction); (nan, nan) if n == 0."""
    k, n = int(k), int(n)
    if n <= 0:
        return NAN, NAN
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _finite(values: Iterable[Any]) -> np.ndarray:
    """The values as a float array with NaN / None / inf dropped."""
    arr = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(float)
    return arr[np.isfinite(arr)]


@functools.lru_cache(maxsize=32)
def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each of n values is drawn in each bootstrap resample (n_resamples x n): one
    matrix per group size, so a report of thousands of groups resamples once."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), n), idx.ravel()), 1.0)
    counts.flags.writeable = False
    return counts


def bootstrap_ci(
    values: Iterable[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaNs dropped first).

    The percentile method of `scipy.stats.bootstrap`, computed as a product with the matrix of
    draw counts (cached per group size, seeded with `seed`): the same rows always give the
    same interval, and thousands of groups cost milliseconds. Fewer than two finite values
    give (nan, nan): one seed says nothing about the spread. Equal values give (v, v).
    """
    arr = _finite(values)
    if arr.size < 2:
        return NAN, NAN
    if np.all(arr == arr[0]):
        return float(arr[0]), float(arr[0])
    means = _resample_counts(arr.size, n_resamples, seed) @ arr / arr.size
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval.

    value: the mean (kind "mean") or the share k/n (kind "share").
    low, high: the bootstrap (mean) or Wilson (share) interval; NaN where it does not exist.
    n: the number of values (seeds/cells) the estimate rests on.
    """

    value: float
    low: float
    high: float
    n: int
    kind: str  # "mean" | "share"

    def fmt(self, digits: int = 3) -> str:
        """'0.812 [0.701, 0.903]'; '0.812 (CI n/a: 1 seed)' for one value; 'n/a (no cells)'."""
        if self.n == 0:
            return "n/a (no cells)"
        value = f"{self.value:.{digits}f}"
        if math.isnan(self.low) or math.isnan(self.high):
            unit = "seed" if self.kind == "mean" else "cell"
            return f"{value} (CI n/a: {self.n} {unit}{'' if self.n == 1 else 's'})"
        return f"{value} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_estimate(values: Iterable[float], confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of the finite `values` with its percentile bootstrap interval."""
    arr = _finite(values)
    if arr.size == 0:
        return Estimate(NAN, NAN, NAN, 0, "mean")
    low, high = bootstrap_ci(arr, confidence=confidence, seed=seed)
    return Estimate(float(arr.mean()), low, high, int(arr.size), "mean")


def share_estimate(k: int, n: int, confidence: float = 0.95) -> Estimate:
    """The share k/n with its Wilson interval."""
    k, n = int(k), int(n)
    if n <= 0:
        return Estimate(NAN, NAN, NAN, 0, "share")
    low, high = wilson(k, n, confidence)
    return Estimate(k / n, low, high, n, "share")


# ------------------------------------------------------------------------------ separability


def _scores(values: Iterable[float]) -> np.ndarray:
    """Scores as a float array with NaNs dropped (inf kept: it orders fine)."""
    arr = np.asarray(list(values), dtype=float).ravel()
    return arr[~np.isnan(arr)]


def roc_auc(pos: Iterable[float], neg: Iterable[float]) -> float:
    """ROC AUC = P(pos > neg) + 0.5 P(pos == neg) over all pairs (Mann-Whitney U / n_pos n_neg).

    Exact (from mid-ranks, so ties count half). 1.0: every marked score beats every unmarked
    one; 0.5: no separation. NaN when either side is empty (NaN scores are dropped).
    """
    p, q = _scores(pos), _scores(neg)
    if p.size == 0 or q.size == 0:
        return NAN
    ranks = stats.rankdata(np.concatenate([p, q]))  # average ranks: ties split evenly
    u = ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * q.size))


def tpr_at_fpr(pos: Iterable[float], neg: Iterable[float], fpr: float) -> float:
    """Largest TPR of a threshold rule whose empirical FPR on the negatives is <= `fpr`.

    A score >= threshold is called positive. With n negatives at most k = floor(fpr * n) of them
    may be called positive, so the threshold is placed just above the (k+1)-th largest negative
    `t_k` (sorted in descending order, 0-based index k): the TPR is the share of positives
    strictly above `t_k` (a positive tied with `t_k` is not counted). At most k negatives lie
    above `t_k` (fewer when negatives tie with it), so the empirical FPR is <= k / n <= fpr.
    With k == 0 -- in particular whenever n < 1 / fpr -- the threshold must exceed every
    negative. If k >= n every score may be called positive and the TPR is 1.
    NaN when either side is empty (NaN scores are dropped).
    """
    p, q = _scores(pos), _scores(neg)
    if p.size == 0 or q.size == 0:
        return NAN
    k = math.floor(fpr * q.size + 1e-9)  # + 1e-9: 0.01 * 300 is 2.9999999999999996
    if k >= q.size:
        return 1.0
    t_k = np.sort(q)[::-1][k]
    return float(np.mean(p > t_k))


def separability(pos: Iterable[float], neg: Iterable[float]) -> dict[str, float | int | bool]:
    """How well watermark scores of marked models (pos) separate from unmarked ones (neg).

    auc: ROC AUC; tpr_at_1pct / tpr_at_0_1pct: TPR at FPR <= 1 % / 0.1 % (see tpr_at_fpr);
    n_pos, n_neg: the numbers of scores; few_negatives: n_neg < 10, i.e. the figures rest on
    fewer than 10 negatives (and the low-FPR points then just mean "above every negative").
    """
    p, q = _scores(pos), _scores(neg)
    return {
        "auc": roc_auc(p, q),
        "tpr_at_1pct": tpr_at_fpr(p, q, 0.01),
        "tpr_at_0_1pct": tpr_at_fpr(p, q, 0.001),
        "n_pos": int(p.size),
        "n_neg": int(q.size),
        "few_negatives": bool(q.size < FEW_NEGATIVES),
    }


# ---------------------------------------------------------------------------------- p-values


def gaussian_ps(scores, null_means, null_stds) -> np.ndarray:
    """`gaussian_p` of many rows at once (arrays of equal length; NaN where any input is)."""
    x, m, sd = (np.asarray(v, dtype=float) for v in (scores, null_means, null_stds))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = stats.norm.sf(x, loc=m, scale=np.where(sd > 0, sd, 1.0))
    p = np.where(sd > 0, p, np.where(x > m, 0.0, 1.0))
    return np.where(np.isnan(x) | np.isnan(m) | np.isnan(sd), NAN, p)


def gaussian_p(score: float, null_mean: float, null_std: float) -> float:
    """One-sided p-value P(X >= score) for X ~ N(null_mean, null_std) (WRT's Gaussian null).

    A degenerate null (null_std <= 0) gives 0.0 if score > null_mean, else 1.0. NaN inputs
    give NaN.
    """
    if any(math.isnan(float(x)) for x in (score, null_mean, null_std)):
        return NAN
    if null_std <= 0:
        return 0.0 if score > null_mean else 1.0
    return float(stats.norm.sf(score, loc=null_mean, scale=null_std))


def binomial_p(hits: int, n: int, chance: float) -> float:
    """Exact one-sided p-value P(X >= hits) for X ~ Binomial(n, chance); NaN if n == 0.

    E.g. trigger-set accuracy: the chance that an unmarked model matches >= hits of n labels.
    """
    if int(n) <= 0:
        return NAN
    return float(stats.binomtest(int(hits), int(n), chance, alternative="greater").pvalue)


# ---------------------------------------------------------------------------------- removal


def _missing(x: Any) -> bool:
    """True for None / NaN / pd.NA."""
    if x is None:
        return True
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):  # array-likes
        return False


def _metrics_map(m: Any) -> Mapping[str, Any]:
    """A row's `metrics` as a dict (it may be None, a dict, or a list of (key, value) pairs)."""
    if isinstance(m, Mapping):
        return m
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return {}
    try:
        return dict(m)
    except (TypeError, ValueError):
        return {}


def budget(task_metric: str | None) -> float:
    """The allowed task drop for a task metric (BUDGET, else DEFAULT_BUDGET)."""
    if not isinstance(task_metric, str):
        return DEFAULT_BUDGET
    return BUDGET.get(task_metric.lower(), DEFAULT_BUDGET)


def _removal_one(row: Mapping[str, Any]) -> float:
    if row.get("status") != "ok":
        return NAN
    if "wm_metric" in row and _missing(row["wm_metric"]):
        return NAN  # a method with nothing to verify (the `none` control): nothing to remove
    figures = _metrics_map(row.get("metrics"))
    stored = figures.get("wm_removed")  # the engine's own verdict, made when the row was
    if not _missing(stored):
        return float(stored)
    before = figures.get("wm_detected_marked")
    if not _missing(before) and not bool(before):
        return 0.0  # never detected on the marked model: nothing to remove
    after = row.get("wm_detected")
    if _missing(after):
        return NAN
    if bool(after):
        return 0.0  # still detected after the attack
    marked, attacked = row.get("task_score_marked"), row.get("task_score_attacked")
    if _missing(marked) or _missing(attacked):
        return NAN
    drop = float(marked) - float(attacked)
    return 1.0 if drop < budget(row.get("task_metric")) else 0.0


def removal(df: pd.DataFrame) -> pd.Series:
    """WRT's removal rule per result row: 1.0 removed, 0.0 not removed, NaN undecidable.

    Removed = the mark was detected on the marked model (metrics["wm_detected_marked"] == 1;
    assumed when the figure is absent), is not detected after the attack (wm_detected False),
    and the task drop task_score_marked - task_score_attacked is below the budget (WRT's
    "< 0.05"; BUDGET by task_metric, e.g. 2 dB for psnr; DEFAULT_BUDGET = 0.05 otherwise, 5
    points of accuracy). A row's stored `metrics["wm_removed"]` (the engine applies this same
    rule when it writes the row) is taken as is; the rule is applied here only without it.
    Not detected before -> 0.0 (nothing to remove); still detected -> 0.0 whatever the task
    scores. NaN for failed rows, rows of a method with nothing to verify (`wm_metric` null:
    the `none` control) and where a figure the answer depends on is missing.
    """
    cols = [
        "status",
        "metrics",
        "wm_detected",
        "task_metric",
        "task_score_marked",
        "task_score_attacked",
        *(["wm_metric"] if "wm_metric" in df.columns else []),
    ]
    records = df.reindex(columns=cols).to_dict("records")
    return pd.Series([_removal_one(r) for r in records], index=df.index, dtype=float)


# ----------------------------------------------------------------------------------- groups

_GROUP_COLUMNS = [
    "cells",
    "failed",
    "seeds",
    "missing",
    "detected",
    "detected_low",
    "detected_high",
    "detected_n",
    "removed",
    "removed_low",
    "removed_high",
    "removed_n",
    "wm_score",
    "wm_score_low",
    "wm_score_high",
    "task_drop",
    "task_drop_low",
    "task_drop_high",
    "task_score",
    "task_score_low",
    "task_score_high",
    "wm_threshold",
]


def _floats(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").astype(float)


def _group_row(g: pd.DataFrame) -> dict[str, float | int]:
    ok = g[g["status"] == "ok"]
    scored = ok if "wm_metric" not in ok else ok[ok["wm_metric"].notna()]  # not `none`'s
    detected = [bool(v) for v in scored["wm_detected"] if not _missing(v)]
    removed = ok["_removed"].dropna()
    wm = _floats(ok["wm_score_attacked"])
    drop = _floats(ok["task_score_marked"]) - _floats(ok["task_score_attacked"])
    thr = _floats(ok["wm_threshold"]).dropna()
    det = share_estimate(sum(detected), len(detected))
    rem = share_estimate(int(removed.sum()), len(removed))
    task = _floats(ok["task_score_attacked"])
    wms, drops, tasks = mean_estimate(wm), mean_estimate(drop), mean_estimate(task)
    return {
        "cells": len(g),
        "failed": len(g) - len(ok),
        "seeds": int(ok["seed"].nunique()),
        "missing": int(wm.isna().sum()),
        "detected": det.value,
        "detected_low": det.low,
        "detected_high": det.high,
        "detected_n": det.n,
        "removed": rem.value,
        "removed_low": rem.low,
        "removed_high": rem.high,
        "removed_n": rem.n,
        "wm_score": wms.value,
        "wm_score_low": wms.low,
        "wm_score_high": wms.high,
        "task_drop": drops.value,
        "task_drop_low": drops.low,
        "task_drop_high": drops.high,
        "task_score": tasks.value,
        "task_score_low": tasks.low,
        "task_score_high": tasks.high,
        "wm_threshold": float(thr.mean()) if len(thr) else NAN,
    }


def group_estimates(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group of result rows, the report's figures with their intervals.

    One row per group (groups of only failed rows included). Columns, besides `by`:
    cells: all rows; failed: rows whose status is not "ok" (never part of a share or mean);
    seeds: distinct seeds among ok rows; missing: ok rows whose wm_score_attacked is NaN;
    detected (+ _low/_high Wilson, _n): share of ok rows with wm_detected True, over ok rows
    where wm_detected is known and the method verifies something (wm_metric set, when the
    column is there); removed (+ _low/_high/_n): share of removal() == 1 over ok rows
    where removal() is decidable; wm_score / task_drop (+ _low/_high): mean over ok rows of
    wm_score_attacked / task_score_marked - task_score_attacked with a bootstrap interval (NaN
    for a single seed); task_score (+ _low/_high): the same of task_score_attacked;
    wm_threshold: mean threshold of the ok rows.
    Means are taken over rows: with `by` fine enough (method x arch x attack) a row is a seed.
    """
    by = list(by)
    needed = [
        "status",
        "seed",
        *(["wm_metric"] if "wm_metric" in df.columns else []),
        "wm_detected",
        "wm_score_attacked",
        "wm_threshold",
        "task_score_marked",
        "task_score_attacked",
        "task_metric",
        "metrics",
    ]
    df = df.reindex(columns=list(dict.fromkeys([*by, *needed])))
    if df.empty:
        return pd.DataFrame(columns=[*by, *_GROUP_COLUMNS])
    df = df.assign(_removed=removal(df))  # once for all rows, not per group
    rows = []
    for key, g in df.groupby(by, dropna=False, sort=True):
        keys = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, keys, strict=True)), **_group_row(g)})
    return pd.DataFrame(rows, columns=[*by, *_GROUP_COLUMNS])
