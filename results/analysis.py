"""Analysis helpers over the results DataFrame (pandas); DuckDB / Polars read the same files."""

from __future__ import annotations

import functools
import json
import re

import pandas as pd

TRIAL = re.compile(r"^(?P<base>.+)\.trial(?P<number>\d+)$")  # `harness tune`'s trial scenarios


def trial_of(name: str) -> str | None:
    """The tuned scenario a trial's scenario name (`<name>.trial<N>`) belongs to, else None."""
    m = TRIAL.match(name)
    return m["base"] if m else None


def scenario_rows(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per scenario (a tuned scenario's trials folded into it): (its rows, its trials' rows).
    A scenario that was only tuned has its trials' rows as its rows."""
    base = df["scenario"].map(lambda s: trial_of(s) or s)
    out = {}
    for name, group in df.groupby(base, sort=True):
        is_trial = group["scenario"] != name
        own, trials = group[~is_trial], group[is_trial]
        out[str(name)] = (own if len(own) else trials, trials)
    return out


def varying_params(df: pd.DataFrame, name_col: str, params_col: str) -> dict[str, list[str]]:
    """Per attack (or method) name, the parameter keys that take more than one value."""
    out: dict[str, list[str]] = {}
    pairs = df[[name_col, params_col]].drop_duplicates()  # parse each distinct setting once
    for name, group in pairs.groupby(name_col):
        params = [json.loads(p or "{}") for p in group[params_col]]
        keys = sorted({k for p in params for k in p})
        out[name] = [k for k in keys if len({json.dumps(p.get(k)) for p in params}) > 1]
    return out


def label(df: pd.DataFrame, name_col: str, params_col: str) -> pd.Series:
    """'fine_tune(mode=rtal)': the name plus only the parameters that vary in this frame."""
    vary = varying_params(df, name_col, params_col)

    @functools.cache
    def one(name: str, params: str) -> str:
        p = json.loads(params or "{}")
        shown = ",".join(f"{k}={p.get(k)}" for k in vary.get(name, []))
        return f"{name}({shown})" if shown else name

    return pd.Series(
        [one(n, p) for n, p in zip(df[name_col], df[params_col], strict=True)], index=df.index
    )


def summary(df: pd.DataFrame, by: tuple[str, ...] = ("method", "attack")) -> pd.DataFrame:
    """The method x attack table of `harness show`: mean scores per group over archs and seeds,
    and the shares (detected after the attack, removed by WRT's rule) with their 95 % Wilson
    intervals - computed by `results.stats.group_estimates`, as in `harness report`."""
    from results.stats import group_estimates  # lazy: scipy only when a table is asked for

    if df.empty:
        return pd.DataFrame()
    df = df.assign(
        method=label(df, "method", "method_params"), attack=label(df, "attack", "attack_params")
    )
    est = group_estimates(df, list(by)).set_index(list(by))
    ok = df[df["status"] == "ok"]
    means = ok.groupby(list(by)).agg(
        task_clean=("task_score_clean", "mean"),
        task_marked=("task_score_marked", "mean"),
        task_attacked=("task_score_attacked", "mean"),
        wm_marked=("wm_score_marked", "mean"),
        wm_attacked=("wm_score_attacked", "mean"),
    )
    out = est[["cells", "failed"]].join(means)
    out["wm_threshold"] = est["wm_threshold"]
    for share in ("detected", "removed"):  # over ok cells: a failed cell is neither
        out[share] = est[share]
        out[f"{share}_ci"] = [
            "-" if n == 0 or pd.isna(lo) else f"[{lo:.2f}, {hi:.2f}]"
            for lo, hi, n in zip(est[f"{share}_low"], est[f"{share}_high"], est[f"{share}_n"],
                                 strict=True)
        ]  # fmt: skip
    return out.reset_index()


def metric(df: pd.DataFrame, name: str) -> pd.Series:
    """One figure of the rows' `metrics` maps as a float column (NaN where a row lacks it)."""
    return df["metrics"].map(lambda m: (m or {}).get(name, float("nan"))).astype(float)


# Figures every plug-in's rows have (tuning objectives and constraints may name them):
GENERIC_FIGURES = {
    "wm_score": "watermark score after the attack (mean)",
    "wm_detected": "share of cells whose watermark is detected after the attack",
    "wm_removed": "share of cells where WRT's removal rule holds",
    "task_score": "task score of the attacked model (mean)",
    "task_drop": "task score of the marked model minus the attacked one's (mean)",
    "embed_drop": "task score of the victim minus the marked model's (mean): embedding cost",
}


def aggregate_metrics(df: pd.DataFrame, metrics=()) -> dict[str, float]:
    """One figure per generic name and per declared row metric over a group of rows (e.g. a
    tuning trial's), each aggregated as declared; NaN where no row has it."""
    d = df[df["status"] == "ok"] if "status" in df else df
    if d.empty:
        return {name: float("nan") for name in [*GENERIC_FIGURES, *(m.name for m in metrics)]}
    out = {
        "wm_score": float(pd.to_numeric(d["wm_score_attacked"]).mean()),
        "wm_detected": float(d["wm_detected"].astype(float).mean()),
        "wm_removed": float(metric(d, "wm_removed").mean()),
        "task_score": float(d["task_score_attacked"].mean()),
        "task_drop": float((d["task_score_marked"] - d["task_score_attacked"]).mean()),
        "embed_drop": float((d["task_score_clean"] - d["task_score_marked"]).mean()),
    }
    wm_metric = d["wm_metric"].dropna()
    if len(wm_metric):
        out[str(wm_metric.iloc[0])] = out["wm_score"]
    for m in metrics:
        if m.level == "row":
            out[m.name] = float(getattr(metric(d, m.name), m.agg)())
    return out
