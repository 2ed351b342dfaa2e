"""results.stats against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from results.stats import (
    BUDGET,
    DEFAULT_BUDGET,
    Estimate,
    binomial_p,
    bootstrap_ci,
    gaussian_p,
    gaussian_ps,
    group_estimates,
    mean_estimate,
    removal,
    roc_auc,
    separability,
    share_estimate,
    tpr_at_fpr,
    wilson,
)

Z95 = 1.959963984540054


def test_imports_only_numeric_stack():
    code = (
        "import sys, results.stats; "
        "print(sorted(m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- wilson


def test_wilson_matches_textbook_formula():
    k, n, z = 8, 10, Z95
    center = (k + z**2 / 2) / (n + z**2)
    half = z / (n + z**2) * math.sqrt(k * (n - k) / n + z**2 / 4)
    low, high = wilson(k, n)
    assert low == pytest.approx(center - half, abs=1e-9)
    assert high == pytest.approx(center + half, abs=1e-9)
    # not the Wald interval 0.8 +- z sqrt(0.8 * 0.2 / 10)
    assert abs(high - (0.8 + z * math.sqrt(0.016))) > 0.01


def test_wilson_confidence_and_edges():
    assert all(math.isnan(x) for x in wilson(0, 0))
    narrow, wide = wilson(8, 10, confidence=0.5), wilson(8, 10)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 0.35


# ------------------------------------------------------------------------------- bootstrap

VALUES = [0.1, 0.4, 0.5, 0.9, 0.6]


def test_bootstrap_ci_reproducible_and_sane():
    a, b = bootstrap_ci(VALUES, seed=0), bootstrap_ci(VALUES, seed=0)
    assert a == b
    low, high = a
    assert min(VALUES) <= low < np.mean(VALUES) < high <= max(VALUES)
    low50, high50 = bootstrap_ci(VALUES, confidence=0.5, seed=0)
    assert high50 - low50 < high - low
    assert low <= low50 and high50 <= high


def test_bootstrap_ci_drops_nan_and_degenerate_cases():
    assert bootstrap_ci([*VALUES, float("nan")]) == bootstrap_ci(VALUES)
    assert all(math.isnan(x) for x in bootstrap_ci([0.7]))
    assert all(math.isnan(x) for x in bootstrap_ci([0.7, float("nan")]))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)


# -------------------------------------------------------------------------------- estimate


def test_estimate_fmt():
    assert Estimate(0.8123, 0.7012, 0.9031, 5, "mean").fmt() == "0.812 [0.701, 0.903]"
    assert Estimate(0.8123, 0.7012, 0.9031, 5, "mean").fmt(2) == "0.81 [0.70, 0.90]"
    assert Estimate(0.8123, float("nan"), float("nan"), 1, "mean").fmt() == (
        "0.812 (CI n/a: 1 seed)"
    )
    assert Estimate(float("nan"), float("nan"), float("nan"), 0, "mean").fmt() == "n/a (no cells)"


def test_mean_and_share_estimates():
    m = mean_estimate([*VALUES, None, float("nan")])
    assert m.kind == "mean" and m.n == 5 and m.value == pytest.approx(0.5)
    assert (m.low, m.high) == bootstrap_ci(VALUES)
    assert mean_estimate([0.812]).fmt() == "0.812 (CI n/a: 1 seed)"
    assert mean_estimate([]).fmt() == "n/a (no cells)"
    s = share_estimate(8, 10)
    assert s.kind == "share" and s.n == 10 and s.value == 0.8
    assert (s.low, s.high) == wilson(8, 10)
    assert share_estimate(0, 0).fmt() == "n/a (no cells)"


# -------------------------------------------------------------------------------------- roc


def test_roc_auc():
    assert roc_auc([0.8, 0.9], [0.1, 0.2, 0.3]) == 1.0
    assert roc_auc([0.1, 0.2], [0.8, 0.9]) == 0.0
    assert roc_auc([0.5, 0.5, 1.0, 1.0], [1.0, 0.5, 1.0, 0.5]) == 0.5
    # pairs won: 0.9 beats both, 0.6 beats both, 0.4 beats 0.3 -> 5 of 6
    assert roc_auc([0.9, 0.6, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6, abs=1e-12)
    # a tie counts half: 0.5 vs 0.5 -> (1 + 0.5 + 1 + 0) / 4
    assert roc_auc([0.5, 0.9], [0.5, 0.3]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert math.isnan(roc_auc([], [0.1])) and math.isnan(roc_auc([0.1], []))


def test_tpr_at_fpr_thousand_negatives():
    neg = np.arange(1000) / 1000  # 0.000 .. 0.999
    # FPR <= 1 %: k = 10 negatives (0.990 .. 0.999) may be above the threshold; the threshold
    # lies just above the 11th largest negative, 0.989: positives strictly above 0.989 count.
    pos = [0.9895, 0.995, 0.989, 0.5, 1.0]
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(3 / 5)
    assert np.mean(neg > 0.989) == 0.01  # the rule's FPR is exactly 1 %
    # FPR <= 0.1 %: k = 1 (only 0.999 may be above); threshold just above 0.998
    assert tpr_at_fpr(pos, neg, 0.001) == pytest.approx(1 / 5)
    assert tpr_at_fpr([0.9985, 0.998], neg, 0.001) == pytest.approx(1 / 2)
    # FPR <= 0 / k >= n
    assert tpr_at_fpr([0.9995, 0.999], neg, 0.0) == pytest.approx(1 / 2)
    assert tpr_at_fpr([-1.0], neg, 1.0) == 1.0


def test_tpr_at_fpr_few_negatives_must_exceed_all():
    neg = [0.1, 0.2, 0.3, 0.4, 0.7]  # 5 < 1 / 0.01: k = 0
    assert tpr_at_fpr([0.8, 0.75, 0.7, 0.5], neg, 0.01) == pytest.approx(2 / 4)
    assert tpr_at_fpr([0.6], neg, 0.1) == 0.0  # 5 * 0.1 = 0.5 -> k = 0 as well
    assert tpr_at_fpr([0.6], neg, 0.2) == 1.0  # k = 1: 0.7 may be above, threshold > 0.4
    assert math.isnan(tpr_at_fpr([], neg, 0.01)) and math.isnan(tpr_at_fpr([0.5], [], 0.01))


def test_separability():
    s = separability([0.9, 0.6, 0.4, float("nan")], [0.5, 0.3])
    assert s["auc"] == pytest.approx(5 / 6)
    assert s["tpr_at_1pct"] == pytest.approx(2 / 3) and s["tpr_at_0_1pct"] == pytest.approx(2 / 3)
    assert (s["n_pos"], s["n_neg"], s["few_negatives"]) == (3, 2, True)
    many = separability([2.0], np.arange(10) / 10)
    assert many["few_negatives"] is False and many["auc"] == 1.0


# --------------------------------------------------------------------------------- p-values


def test_gaussian_p():
    mean, std = 0.3, 0.05
    assert gaussian_p(mean + 1.6448536269514722 * std, mean, std) == pytest.approx(0.05, abs=1e-9)
    assert gaussian_p(mean, mean, std) == pytest.approx(0.5, abs=1e-12)
    assert gaussian_p(0.31, 0.3, 0.0) == 0.0 and gaussian_p(0.3, 0.3, 0.0) == 1.0
    assert gaussian_p(0.2, 0.3, -1.0) == 1.0
    assert math.isnan(gaussian_p(float("nan"), 0.3, 0.05))
    cases = [(0.3 + 1.6448536269514722 * 0.05, 0.3, 0.05), (0.31, 0.3, 0.0), (0.2, 0.3, -1.0),
             (float("nan"), 0.3, 0.05), (0.5, 0.3, 0.1)]  # fmt: skip
    many = gaussian_ps(*zip(*cases, strict=True))  # vectorised: agrees with the scalar one
    np.testing.assert_allclose(many, [gaussian_p(*c) for c in cases], rtol=1e-12)


def test_binomial_p():
    n, p = 20, 0.1
    expected = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(18, n + 1))
    assert binomial_p(18, n, p) == pytest.approx(expected, rel=1e-9)
    assert binomial_p(0, 20, 0.1) == pytest.approx(1.0)
    assert binomial_p(2, 20, 0.1) == pytest.approx(1 - 0.9**20 - 20 * 0.1 * 0.9**19, rel=1e-9)
    assert math.isnan(binomial_p(0, 0, 0.1))


# ---------------------------------------------------------------------------------- removal


def _row(detected, marked, attacked, metric="accuracy", status="ok", metrics=None, **extra):
    return {
        "status": status,
        "wm_detected": detected,
        "task_score_marked": marked,
        "task_score_attacked": attacked,
        "task_metric": metric,
        "metrics": metrics,
        **extra,
    }


def test_removal_rule():
    assert BUDGET["psnr"] == 2.0 and DEFAULT_BUDGET == 0.05
    df = pd.DataFrame(
        [
            _row(False, 0.90, 0.88),  # removed: 2 points
            _row(False, 0.90, 0.83),  # drop 0.07 > 0.05
            _row(True, 0.90, 0.90),  # still detected
            _row(False, 30.0, 28.5, metric="psnr"),  # 1.5 dB <= 2 dB
            _row(False, 30.0, 27.5, metric="psnr"),  # 2.5 dB > 2 dB
            _row(None, None, None, status="failed"),  # failed
            _row(False, 0.90, 0.90, metrics={"wm_detected_marked": 0.0}),  # never detected
            _row(False, 0.90, 0.88, metrics={"wm_detected_marked": 1.0}),  # detected, removed
            _row(False, 0.90, 0.84),  # drop 0.06: not below the budget (WRT: "< 0.05")
            _row(None, 0.90, 0.88),  # detection unknown
            _row(False, 0.90, float("nan")),  # task score missing
            _row(False, 0.90, 0.95),  # attack improved the task: within budget
            # the engine's stored verdict is taken as is (it applies this rule when writing)
            _row(False, 0.90, 0.30, metrics={"wm_detected_marked": 1.0, "wm_removed": 1.0}),
        ],
        index=range(10, 23),
    )
    got = removal(df)
    expected = [1.0, 0.0, 0.0, 1.0, 0.0, np.nan, 0.0, 1.0, 0.0, np.nan, np.nan, 1.0, 1.0]
    assert got.dtype == float and list(got.index) == list(df.index)
    np.testing.assert_array_equal(got.to_numpy(), np.array(expected))


def test_removal_without_metrics_column_and_empty():
    df = pd.DataFrame([_row(False, 0.9, 0.88)]).drop(columns="metrics")
    assert removal(df).tolist() == [1.0]
    assert removal(df.iloc[:0]).empty


# ----------------------------------------------------------------------------------- groups


def _cell(method, seed, detected, wm, marked=0.9, attacked=0.88, status="ok", thr=0.5):
    return {
        "method": method,
        "attack": "fine_tune",
        "seed": seed,
        **_row(detected, marked, attacked, status=status),
        "wm_score_attacked": wm,
        "wm_threshold": thr,
    }


def test_group_estimates():
    df = pd.DataFrame(
        [
            # group a: 3 ok seeds + 1 failed
            _cell("a", 0, True, 0.9, attacked=0.89),
            _cell("a", 1, True, 0.8, attacked=0.80),
            _cell("a", 2, False, 0.2, attacked=0.86),
            _cell("a", 3, None, None, marked=None, attacked=None, status="failed", thr=None),
            # group b: 3 seeds, two with no watermark figure, one seed with a score
            _cell("b", 0, False, 0.3, thr=0.4),
            _cell("b", 1, None, float("nan"), attacked=0.80, thr=0.6),
            _cell("b", 2, None, None, attacked=float("nan")),
        ]
    )
    out = group_estimates(df, ["method", "attack"]).set_index("method")
    for col in ("detected", "removed", "wm_score", "task_drop"):
        assert {col, f"{col}_low", f"{col}_high"} <= set(out.columns)

    a = out.loc["a"]
    assert (a["cells"], a["failed"], a["seeds"], a["missing"]) == (4, 1, 3, 0)
    assert a["detected"] == pytest.approx(2 / 3) and a["detected_n"] == 3  # failed row not in n
    assert (a["detected_low"], a["detected_high"]) == pytest.approx(wilson(2, 3))
    # only seed 2 is removed (not detected, drop 0.04 <= 0.05)
    assert a["removed"] == pytest.approx(1 / 3) and a["removed_n"] == 3
    assert (a["removed_low"], a["removed_high"]) == pytest.approx(wilson(1, 3))
    assert a["wm_score"] == pytest.approx((0.9 + 0.8 + 0.2) / 3)
    assert (a["wm_score_low"], a["wm_score_high"]) == bootstrap_ci([0.9, 0.8, 0.2])
    assert a["task_drop"] == pytest.approx((0.01 + 0.10 + 0.04) / 3)
    assert a["task_drop_low"] < a["task_drop"] < a["task_drop_high"]
    assert a["wm_threshold"] == pytest.approx(0.5)

    b = out.loc["b"]
    assert (b["cells"], b["failed"], b["seeds"], b["missing"]) == (3, 0, 3, 2)
    assert b["detected"] == 0.0 and b["detected_n"] == 1  # None detections are excluded
    assert b["removed"] == 1.0 and b["removed_n"] == 1
    # one seed with a score: the mean exists, its interval does not
    assert b["wm_score"] == pytest.approx(0.3)
    assert math.isnan(b["wm_score_low"]) and math.isnan(b["wm_score_high"])
    assert b["task_drop"] == pytest.approx((0.02 + 0.10) / 2)
    assert b["wm_threshold"] == pytest.approx(0.5)


def test_group_estimates_only_failed_and_empty():
    df = pd.DataFrame([_cell("a", 0, None, None, status="failed")])
    row = group_estimates(df, ["method"]).iloc[0]
    assert (row["cells"], row["failed"], row["seeds"], row["detected_n"]) == (1, 1, 0, 0)
    assert math.isnan(row["detected"]) and math.isnan(row["wm_score"])
    empty = group_estimates(df.iloc[:0], ["method"])
    assert empty.empty and {"method", "detected", "removed_high"} <= set(empty.columns)


def test_bootstrap_ci_is_scipys_percentile_bootstrap():
    """The count-matrix form draws the same resamples as scipy.stats.bootstrap with the same
    seed, so the interval is scipy's percentile interval (to float rounding)."""
    from scipy import stats as sps

    values = np.random.default_rng(1).random(30)
    for confidence in (0.95, 0.8):
        ref = sps.bootstrap((values,), np.mean, n_resamples=3000, method="percentile",
                            confidence_level=confidence,
                            rng=np.random.default_rng(7)).confidence_interval  # fmt: skip
        got = bootstrap_ci(values, confidence=confidence, n_resamples=3000, seed=7)
        np.testing.assert_allclose(got, (ref.low, ref.high), rtol=1e-12)


def test_a_method_with_nothing_to_verify_is_neither_detected_nor_removed():
    """`none` rows (wm_metric null) carry wm_detected False by construction: no share counts
    them, and WRT's rule has nothing to remove there."""
    rows = [
        {**_row(False, 0.90, 0.89), "wm_metric": None, "seed": s, "wm_score_attacked": None}
        for s in range(3)
    ] + [{**_row(False, 0.90, 0.89), "wm_metric": "trigger_accuracy", "seed": 0,
          "wm_score_attacked": 0.1, "method": "m"}]  # fmt: skip
    df = pd.DataFrame(rows).assign(method=["none"] * 3 + ["m"])
    assert removal(df)[:3].isna().all()
    assert removal(df).iloc[3] == 1.0
    est = group_estimates(df, ["method"]).set_index("method")
    assert est.loc["none", "detected_n"] == 0 and math.isnan(est.loc["none", "detected"])
    assert est.loc["none", "removed_n"] == 0 and est.loc["none", "cells"] == 3
    assert est.loc["m", "detected_n"] == 1 and est.loc["m", "removed"] == 1.0
