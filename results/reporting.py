"""`harness report`: the verdict of a grid from the stored rows alone.

It reads the results store (rows, run manifests, the plug-in sections the driver stored and the
Optuna journal), never Ray, torch or a plug-in module, and writes into one folder:

    index.html   one self-contained page (inline CSS, figures embedded; no network)
    index.md     the same in Markdown (``--format markdown``) for READMEs and notes
    figures/     every figure as PNG and PDF (matplotlib)
    tables/      every table as CSV

Statistics come from `results.stats` (the one place for them; ``harness show`` uses it too):
shares with Wilson intervals, means with bootstrap intervals over seeds, WRT's removal rule,
ROC AUC and TPR at low FPR against null models, and p-values."""

from __future__ import annotations

import base64
import html
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from pyarrow.fs import FileSelector

from harness.errors import ConfigError
from harness.fs import exists, open_store, read_bytes
from results import figures
from results.analysis import label, scenario_rows, varying_params
from results.report import markdown
from results.stats import (
    FEW_NEGATIVES,
    Estimate,
    budget,
    gaussian_ps,
    group_estimates,
    removal,
    separability,
)
from results.store import load, read_sections

NULL_SCORE = re.compile(r"^null_score_\d+$")  # each null model's score (harness.decision)
MAX_FIGURES = 12  # per kind and scenario; the CSV tables hold every group


# ------------------------------------------------------------------ the page's parts


@dataclass
class Part:
    """A titled piece of the page: text paragraphs, a table and/or figures."""

    title: str
    text: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    csv: str | None = None  # the table's CSV file name (under tables/)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (png name, caption)


@dataclass
class ScenarioReport:
    name: str
    parts: list[Part] = field(default_factory=list)


class Output:
    """The report's folder: tables written as CSV at once; figures drawn and saved by worker
    processes (matplotlib draws on one core, and a big grid's report is mostly figures), each
    returning its PNG's name at once; `wait` until all are on disk."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.folder, self.figures, self.tables = folder, folder / "figures", folder / "tables"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.tables.mkdir(parents=True, exist_ok=True)
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx)
        self.pending: list = []

    def csv(self, table: pd.DataFrame, name: str) -> str:
        table.to_csv(self.tables / f"{name}.csv", index=False)
        return f"{name}.csv"

    def draw(self, name: str, kind: str, *args) -> str:
        """figures.<kind>(*args), saved as `name`.png and .pdf; returns the PNG's name."""
        if self.pool is None:
            return _render(self.figures, name, kind, args)
        self.pending.append(self.pool.submit(_render, self.figures, name, kind, args))
        return f"{name}.png"

    def wait(self) -> None:
        try:
            for future in self.pending:
                future.result()  # a figure that failed raises here
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)


def _render(folder: Path, name: str, kind: str, args: tuple) -> str:
    return figures.save(getattr(figures, kind)(*args), folder, name)


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


# ------------------------------------------------------------------ entry point


def build(
    store: str,
    scenario: str | None = None,
    out: str | Path = "report",
    fmt: str = "html",
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write the report of `store` (one scenario or all) into `out`; returns the page's path.
    `progress(message, done, total)` is told of each step."""
    say = progress or (lambda message, done, total: None)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError("--out is a file, not a folder", field="--out", value=str(out))
    start = time.perf_counter()
    say("reading the store", 0, 1)
    df = load(store)
    if df.empty:
        raise ConfigError(
            "the store has no result rows (run `harness run SCENARIO --store STORE` first)",
            field="STORE",
            value=store,
        )
    by_scenario = scenario_rows(df)
    names = sorted(by_scenario)
    if scenario is not None:
        if scenario not in by_scenario:
            raise ConfigError(
                "no rows of this scenario in the store",
                field="--scenario",
                value=scenario,
                allowed=names,
            )
        names = [scenario]
    manifests = _manifests(store)
    output = Output(out, _workers())
    reports = []
    try:
        for i, name in enumerate(names, 1):
            say(f"scenario {name}", i - 1, len(names) + 1)
            rows, trials = by_scenario[name]
            runs = manifests.get(name, [])
            reports.append(_scenario_report(store, name, rows, trials, runs, output, df))
        say("drawing the figures", len(names), len(names) + 1)
    finally:
        output.wait()
    seconds = time.perf_counter() - start
    meta = {
        "store": store,
        "rows": len(df),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds,
    }
    say("writing the page", len(names), len(names) + 1)
    if fmt == "markdown":
        path = out / "index.md"
        path.write_text(_markdown_page(reports, meta))
    else:
        path = out / "index.html"
        path.write_text(_html_page(reports, meta, output))
    say("done", len(names) + 1, len(names) + 1)
    return path


def _manifests(store: str) -> dict[str, list[dict]]:
    """Every run manifest per scenario name, oldest first (the newest holds the scenario as
    last run, its `reported:` figures included)."""
    fs, root = open_store(store)
    folder = f"{root}/runs"
    if not exists(fs, folder):
        return {}
    found: dict[str, list[dict]] = {}
    for info in fs.get_file_info(FileSelector(folder)):
        if not info.path.endswith(".json"):
            continue
        try:
            manifest = json.loads(read_bytes(fs, info.path))
        except (OSError, ValueError):
            continue  # a manifest being written, or damaged: it holds no rows
        name = (manifest.get("scenario") or {}).get("name")
        if name:
            found.setdefault(name, []).append(manifest)
    for runs in found.values():
        runs.sort(key=lambda m: str(m.get("started_at", "")))
    return found


# ------------------------------------------------------------------ one scenario


def _prepare(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.assign(
        method_label=label(rows, "method", "method_params"),
        attack_label=label(rows, "attack", "attack_params"),
    )
    return rows.assign(removed=removal(rows))


def _scenario_report(
    store: str, name: str, rows: pd.DataFrame, trials: pd.DataFrame, runs: list[dict],
    out: Output, everything: pd.DataFrame | None = None,
) -> ScenarioReport:
    sc = runs[-1]["scenario"] if runs else None
    rows = _prepare(rows)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    report = ScenarioReport(name)
    ok = rows[rows["status"] == "ok"]
    marked = ok[ok["wm_metric"].notna()]  # methods with something to verify (not `none`)
    plugins, sections = read_sections(store, name)
    parts = report.parts
    parts.append(_overview(rows, sc))
    if sc and sc.get("reported"):
        parts.append(_reported(sc["reported"], rows, sections, plugins, out, slug))
    decision, est = _decision(rows, out, slug)
    parts.append(decision)
    parts.append(_separability(marked, out, slug))
    parts.append(_heatmaps(marked, out, slug))
    parts.append(_curves(marked, est, out, slug))
    parts.append(_pareto(marked, out, slug))
    parts.append(_ranking(marked, out, slug))
    parts.extend(_plugin_sections(plugins, sections, len(rows), out, slug))
    parts.extend(_cost(rows, runs, out, slug))
    if len(trials):
        part, study = _optuna(store, name, trials, out, slug)
        parts.append(part)
        if study is not None and (attacker := _tuned_attacker(study, trials, everything)):
            attacker.csv = out.csv(attacker.table, f"{slug}.attacker")
            parts.append(attacker)
    failed = rows[rows["status"] != "ok"]
    if len(failed):
        parts.append(_failures(failed, out, slug))
    return report


def _overview(rows: pd.DataFrame, sc: dict | None) -> Part:
    ok = rows["status"] == "ok"
    seeds = sorted(rows["seed"].dropna().unique().tolist())
    text = [
        f"{len(rows)} cells: {int(ok.sum())} ok, {int((~ok).sum())} failed "
        "(failed cells are counted apart, never as 'not detected').",
        f"Archs: {', '.join(sorted(rows['arch'].dropna().unique()))}. "
        f"Methods: {', '.join(sorted(rows['method'].dropna().unique()))}. "
        f"Attacks: {', '.join(sorted(rows['attack'].dropna().unique()))}. "
        f"Seeds: {len(seeds)} ({', '.join(map(str, seeds[:10]))}"
        f"{' …' if len(seeds) > 10 else ''}).",
        f"Data set: {', '.join(sorted(rows['dataset'].dropna().unique()))}; devices: "
        f"{', '.join(sorted(rows['device'].dropna().unique())) or '-'}; runs: "
        f"{rows['run_id'].nunique()}; harness commits: "
        f"{', '.join(sorted(rows['git_sha'].dropna().unique())) or '-'}.",
    ]
    if sc and sc.get("description"):
        text.insert(0, str(sc["description"]))
    return Part("Overview", text=text)


# ------------------------------------------------------------------ decision statistics


def _est(value, low, high, n, kind: str) -> str:
    if n == 0 or value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a (no scored cells)"
    return Estimate(float(value), float(low), float(high), int(n), kind).fmt()


def _metric_column(rows: pd.DataFrame, name: str) -> pd.Series:
    return rows["metrics"].map(lambda m: (m or {}).get(name, math.nan)).astype(float)


def _decision(rows: pd.DataFrame, out: Output, slug: str) -> tuple[Part, pd.DataFrame]:
    by = ["method_label", "arch", "attack_label"]
    est = group_estimates(rows, by)
    ok = rows[rows["status"] == "ok"]
    p = pd.DataFrame(
        {
            "p_binomial": _metric_column(ok, "p_value"),
            "p_gaussian": gaussian_ps(
                pd.to_numeric(ok["wm_score_attacked"], errors="coerce"),
                _metric_column(ok, "null_mean"),
                _metric_column(ok, "null_std"),
            ),
        },
        index=ok.index,
    )
    medians = p.groupby([ok[c] for c in by], sort=True).median()  # per group, over its cells
    est = est.merge(medians, left_on=by, right_index=True, how="left")
    csv = out.csv(est, f"{slug}.decision")
    shown = pd.DataFrame(
        {
            "method": est["method_label"],
            "arch": est["arch"],
            "attack": est["attack_label"],
            "cells": est["cells"],
            "failed": est["failed"],
            "detected [95% CI]": [
                _est(r.detected, r.detected_low, r.detected_high, r.detected_n, "share")
                for r in est.itertuples()
            ],
            "removed (WRT) [95% CI]": [
                _est(r.removed, r.removed_low, r.removed_high, r.removed_n, "share")
                for r in est.itertuples()
            ],
            "wm score [95% CI]": [
                _est(r.wm_score, r.wm_score_low, r.wm_score_high, r.seeds, "mean")
                for r in est.itertuples()
            ],
            "task drop [95% CI]": [
                _est(r.task_drop, r.task_drop_low, r.task_drop_high, r.seeds, "mean")
                for r in est.itertuples()
            ],
            "threshold": est["wm_threshold"],
            "p (binomial)": est["p_binomial"],
            "p (Gaussian, null models)": est["p_gaussian"],
        }
    )
    # ok cells of a method with a watermark score (not `none`) whose score is NaN
    missing = int((ok["wm_metric"].notna() & ok["wm_score_attacked"].isna()).sum())
    text = [
        "Per method, arch and attack setting. Shares (detected after the attack; removed by "
        "WRT's rule: detected before, not after, task drop below 5 points or 2 dB) carry 95 % "
        "Wilson intervals over cells; means carry 95 % percentile-bootstrap intervals over "
        "seeds. With one seed an interval is shown as n/a, never left out. p (binomial): the "
        "cells' median exact binomial p-value of the key accuracy against chance; p "
        "(Gaussian): WRT's one-sided p of the score under the null models' Gaussian.",
    ]
    if missing:
        text.append(f"{missing} ok cell(s) have no watermark score (NaN): counted, not used.")
    return Part("Decision statistics", text=text, table=shown, csv=csv), est


def _negatives(group: pd.DataFrame) -> list[float]:
    """Null-model scores of a (method setting, arch): one set per key (seed), deduplicated:
    those of the seed's first row that has any (a row without metrics does not hide them)."""
    out: list[float] = []
    for _, g in group.groupby("seed"):
        for m in g["metrics"]:
            scores = [v for k, v in (m or {}).items() if NULL_SCORE.match(k)]  # not `_marked`
            if scores:
                out += scores
                break
    return out


def _separability(marked: pd.DataFrame, out: Output, slug: str) -> Part:
    part = Part("Separability of suspects (ROC)")
    part.text.append(
        "Positives: marked models after the attack, scored with their key. Negatives: the "
        "null models of each key (independently trained victims of other seeds that never "
        "carried the mark, scored with that key). `none` cells carry no key and no score, so "
        "they cannot serve as negatives. A figure resting on fewer than "
        f"{FEW_NEGATIVES} negatives says so."
    )
    rows = []
    for (method, arch), g in marked.groupby(["method_label", "arch"], sort=True):
        neg = _negatives(g)
        for attack, a in g.groupby("attack_label", sort=True):
            pos = a["wm_score_attacked"].dropna().astype(float).tolist()
            s = separability(pos, neg) if neg else None
            rows.append(
                {
                    "method": method, "arch": arch, "attack": attack,
                    "auc": s["auc"] if s else math.nan,
                    "tpr_at_1pct_fpr": s["tpr_at_1pct"] if s else math.nan,
                    "tpr_at_0.1pct_fpr": s["tpr_at_0_1pct"] if s else math.nan,
                    "positives": len(pos), "negatives": len(neg),
                    "note": ("no null-model scores in these rows" if not neg else
                             f"rests on {len(neg)} < {FEW_NEGATIVES} negatives"
                             if s["few_negatives"] else ""),
                }  # fmt: skip
            )
    if not rows:
        part.text.append("No marked cells.")
        return part
    table = pd.DataFrame(rows)
    part.table, part.csv = table, out.csv(table, f"{slug}.separability")
    if (table["negatives"] == 0).all():
        part.text.append(
            "None of these methods records null-model scores (only methods with a "
            "null-model threshold do), so no ROC can be drawn."
        )
    return part


# ------------------------------------------------------------------ figures


def _drop_note(drop: float, metric: str | None) -> str:
    if math.isnan(drop):
        return ""
    if metric == "psnr":
        return f"Δ {drop:+.1f} dB"
    return f"Δ {100 * drop:+.1f} pt"


def _heatmaps(marked: pd.DataFrame, out: Output, slug: str) -> Part:
    part = Part("Watermark retention: method × attack")
    part.text.append(
        "Colour: share of cells whose watermark is still detected after the attack; in each "
        "cell that share and the task-score drop (marked − attacked: accuracy points or dB)."
    )
    if marked.empty:
        part.text.append("No marked cells.")
        return part
    d = marked.assign(
        detected_f=marked["wm_detected"].astype(float),
        drop=marked["task_score_marked"] - marked["task_score_attacked"],
    )
    for arch, g in list(d.groupby("arch", sort=True))[:MAX_FIGURES]:
        agg = g.groupby(["method_label", "attack_label"]).agg(
            detected=("detected_f", "mean"), task_drop=("drop", "mean"), n=("cell_id", "size"),
            metric=("task_metric", "first"),
        )  # fmt: skip
        agg["note"] = [
            f"{det:.2f}\n{_drop_note(drop, metric)}\nn={n}"
            for det, drop, metric, n in zip(
                agg["detected"], agg["task_drop"], agg["metric"], agg["n"], strict=True
            )
        ]
        values = agg["detected"].unstack("attack_label")
        notes = agg["note"].unstack("attack_label").reindex_like(values)
        png = out.draw(
            f"{slug}.heatmap.{_safe(arch)}", "heatmap", values, notes,
            f"{arch}: watermark retention after each attack",
            "share of cells detected after the attack",
        )  # fmt: skip
        part.figures.append((png, f"{arch}: retention (colour) and task drop per cell"))
    return part


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(text))[:80]


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return True


def _curves(marked: pd.DataFrame, est: pd.DataFrame, out: Output, slug: str) -> Part:
    """Drawn from the decision table's estimates (a point of a curve is one of its groups:
    method setting x arch x attack setting), so no interval is computed twice."""
    part = Part("Robustness curves")
    part.text.append(
        "Watermark score (upper panels, the mean detection threshold dashed) and task score "
        "(lower panels) along every attack parameter that varies in the grid, one pair of "
        "panels per arch; bands: 95 % bootstrap intervals over seeds (none with one seed)."
    )
    settings = marked.drop_duplicates("attack_label").set_index("attack_label")
    est = est[est["method_label"].isin(set(marked["method_label"]))]
    est = est.join(settings[["attack", "attack_params", "task_metric"]], on="attack_label",
                   how="inner")  # fmt: skip
    made, rows = 0, []
    for attack, g in est.groupby("attack", sort=True):
        params = g["attack_params"].map(lambda p: json.loads(p or "{}"))
        vary = varying_params(g, "attack", "attack_params").get(attack, [])
        for param in vary:
            values = params.map(lambda p, k=param: p.get(k))
            if values.isna().any() or not _numeric(values):
                continue
            others = [k for k in vary if k != param]
            line_key = g["method_label"].str.cat(
                params.map(lambda p, o=others: ",".join(f"{k}={p.get(k)}" for k in o)),
                sep=" · ",
            ).str.rstrip(" ·")
            d = g.assign(x=values.astype(float), line=line_key).sort_values("x")
            panels: dict[str, list[dict]] = {}
            for (arch, name), lg in d.groupby(["arch", "line"], sort=True):
                line = {"label": name, "x": lg["x"].tolist()}
                for key, col in (("wm", "wm_score"), ("task", "task_score")):
                    for suffix in ("", "_low", "_high"):
                        line[f"{key}{suffix}"] = lg[f"{col}{suffix}"].astype(float).tolist()
                panels.setdefault(arch, []).append(line)
            rows.append(d.assign(param=param)[
                ["attack", "param", "arch", "line", "x", "wm_score", "wm_score_low",
                 "wm_score_high", "task_score", "task_score_low", "task_score_high", "cells",
                 "failed"]])  # fmt: skip
            if made >= MAX_FIGURES:
                continue
            threshold = float(pd.to_numeric(g["wm_threshold"], errors="coerce").mean())
            png = out.draw(
                f"{slug}.curve.{_safe(attack)}.{_safe(param)}", "curves", panels, param,
                threshold, f"{attack}: scores against {param} ({int(g['cells'].sum())} cells)",
                f"task score ({g['task_metric'].iloc[0]})",
            )  # fmt: skip
            part.figures.append((png, f"{attack}: watermark and task score vs {param}"))
            made += 1
    if rows:
        part.csv = out.csv(pd.concat(rows), f"{slug}.curves")
    else:
        part.text.append("No attack parameter takes more than one numeric value in this grid.")
    return part


def _pareto(marked: pd.DataFrame, out: Output, slug: str) -> Part:
    part = Part("WRT's Pareto view")
    part.text.append(
        "Task-score loss (x) against the watermark score after the attack (y), one point per "
        "attack setting and one panel per arch; the budget (5 points, or 2 dB) dotted, the "
        "detection threshold dashed; crosses: removed in at least half of the cells (WRT's "
        "rule)."
    )
    if marked.empty:
        return part
    d = marked.assign(drop=marked["task_score_marked"] - marked["task_score_attacked"])
    all_points = []
    for i, (method, g) in enumerate(d.groupby("method_label", sort=True)):
        panels = {}
        for arch, ga in g.groupby("arch", sort=True):
            panels[arch] = (
                ga.groupby("attack_label")
                .agg(task_drop=("drop", "mean"), wm_score=("wm_score_attacked", "mean"),
                     removed=("removed", "mean"), threshold=("wm_threshold", "mean"),
                     cells=("cell_id", "size"))  # fmt: skip
                .reset_index()
                .rename(columns={"attack_label": "label"})
            )
            all_points.append(panels[arch].assign(method=method, arch=arch))
        if i >= MAX_FIGURES:
            continue
        metric = str(g["task_metric"].iloc[0])
        limit = budget(metric)
        png = out.draw(
            f"{slug}.pareto.{_safe(method)}", "pareto", panels, limit,
            f"budget: {limit:g} {'dB' if metric == 'psnr' else '(5 points)'}",
            f"{method}: removal against task loss",
        )  # fmt: skip
        part.figures.append((png, f"{method}: WRT's Pareto view per arch"))
    part.csv = out.csv(pd.concat(all_points), f"{slug}.pareto")
    return part


def _ranking(marked: pd.DataFrame, out: Output, slug: str) -> Part:
    """WRT's verdict per scheme: of the attack settings it met (identity aside), the share
    that remove it (WRT's rule in at least half of their cells, archs and seeds pooled)."""
    part = Part("Schemes ordered by the attacks that remove them")
    part.text.append(
        "WRT's question: does any attack remove the scheme within the budget? Per method "
        "setting, the attack settings (identity aside) whose cells are removed by WRT's rule "
        "in at least half of the cases, most robust scheme first; 'detected unattacked' is "
        "the share of identity cells where the mark is found at all."
    )
    rows = []
    for method, g in marked.groupby("method_label", sort=True):
        attacked = g[g["attack"] != "identity"]
        per_attack = attacked.groupby("attack_label")["removed"].mean()
        removing = sorted(per_attack[per_attack >= 0.5].index)
        identity = g[g["attack"] == "identity"]["wm_detected"].astype(float)
        rows.append({
            "method": method,
            "detected unattacked": float(identity.mean()) if len(identity) else math.nan,
            "attack settings": len(per_attack),
            "removing it": len(removing),
            "share removing": len(removing) / len(per_attack) if len(per_attack) else math.nan,
            "which": ", ".join(removing[:6]) + (" …" if len(removing) > 6 else ""),
        })  # fmt: skip
    if not rows:
        part.text.append("No marked cells.")
        return part
    table = pd.DataFrame(rows).sort_values(["share removing", "method"], kind="stable")
    part.table, part.csv = table, out.csv(table, f"{slug}.ranking")
    return part


# ------------------------------------------------------------------ plug-ins, cost, tuning


def _plugin_sections(
    plugins: dict, sections: dict, n_rows: int, out: Output, slug: str
) -> list[Part]:
    parts = []
    for key in sorted(sections):
        table, seen = sections[key]
        meta = plugins.get(key, {})
        part = Part(meta.get("summary_title") or key)
        part.text.append(f"The plug-in's own table ({key}), as its code computed it.")
        if seen != n_rows:
            part.text.append(
                f"Built from {seen} rows; the store now has {n_rows} for this scenario: "
                "`harness run` the scenario again (nothing is recomputed) to refresh it."
            )
        for i, spec in enumerate(meta.get("figures", [])):
            x = [c for c in spec["x"] if c in table.columns]
            y = [c for c in spec["y"] if c in table.columns]
            if not x or not y or table.empty:
                continue
            png = out.draw(f"{slug}.{_safe(key)}.{i}", "bars", table, x, y,
                           spec.get("ylabel", ""), spec["title"], spec.get("hline"))  # fmt: skip
            part.figures.append((png, spec["title"]))
        part.table, part.csv = table, out.csv(table, f"{slug}.{_safe(key)}")
        parts.append(part)
    if not sections:
        parts.append(
            Part(
                "Plug-in sections",
                text=["No plug-in section is stored for this scenario (a store written by an "
                      "older harness, or no plug-in here has its own table): `harness run` "
                      "the scenario again (nothing is recomputed) to store them."],
            )  # fmt: skip
        )
    return parts


def _cost(rows: pd.DataFrame, runs: list[dict], out: Output, slug: str) -> list[Part]:
    stages = rows["stage_seconds"].map(lambda m: m or {})
    names = sorted({k for m in stages for k in m})
    d = rows.assign(**{f"s_{k}": stages.map(lambda m, k=k: m.get(k, math.nan)) for k in names})
    d = d.assign(gpu_s=d["duration_s"].where(d["device"].fillna("").str.startswith("cuda")))
    agg = {f"{k}_s": (f"s_{k}", "mean") for k in names}
    table = (
        d.groupby(["method", "attack"], sort=True)
        .agg(cells=("cell_id", "size"), duration_s=("duration_s", "mean"),
             gpu_seconds=("gpu_s", "sum"), **agg)  # fmt: skip
        .reset_index()
    )
    part = Part("Cost per cell", table=table, csv=out.csv(table, f"{slug}.cost"))
    part.text.append(
        "Mean seconds per cell of each stage as measured when it was computed (a cached or "
        "shared stage - one victim for many attacks - shows its one-time cost in every cell "
        f"that uses it). Total cell time {d['duration_s'].sum():.0f} s; GPU-seconds: the "
        "duration of cells that ran on a CUDA device (0 where none did)."
    )
    if runs:  # what each run computed and what it found cached (its manifest's counts)
        table = pd.DataFrame(
            [{"run": m.get("run_id"), "started": str(m.get("started_at", ""))[:19],
              "cells": m.get("cells"), "already stored": m.get("skipped"), "ok": m.get("ok"),
              "failed": m.get("failed"), "seconds": m.get("seconds"),
              **{f"computed {k}": v for k, v in (m.get("computed") or {}).items()}}
             for m in runs]  # fmt: skip
        )
        part.text.append(
            "Runs of this scenario (from their manifests): cells found already stored, and the "
            "distinct stages each run computed - every other stage its cells needed came from "
            "the artifact cache."
        )
        extra = Part("Runs: computed vs cached", table=table,
                     csv=out.csv(table, f"{slug}.runs"))  # fmt: skip
        return [part, extra]
    return [part]


def _optuna(store: str, name: str, trials: pd.DataFrame, out: Output, slug: str):
    """The study's part of the page, and the study (None where it cannot be read)."""
    part = Part(f"Tuning ({trials['scenario'].nunique()} trials in the store)")
    if "://" in store:
        part.text.append("The Optuna study of an object-store store lives in its RDB storage: "
                         "open it with Optuna's own dashboard.")  # fmt: skip
        return part, None
    journal = Path(store).expanduser() / "optuna" / "journal.log"
    if not journal.exists():
        part.text.append(f"No Optuna journal at {journal}.")
        return part, None
    import optuna  # lazy: only for a tuned scenario
    from optuna.storages import JournalStorage  # lazy
    from optuna.storages.journal import JournalFileBackend  # lazy

    try:
        study = optuna.load_study(study_name=name, storage=JournalStorage(
            JournalFileBackend(str(journal))))  # fmt: skip
    except KeyError:
        part.text.append(f"No study named {name!r} in {journal}.")
        return part, None
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    rows = [{"trial": t.number, "state": t.state.name, "value": t.value, **t.params}
            for t in study.trials]  # fmt: skip
    table = pd.DataFrame(rows)
    part.table, part.csv = table, out.csv(table, f"{slug}.optuna")
    if done:
        best = study.best_trial if len(study.directions) == 1 else None
        first = next((t for t in study.trials if t.number == 0), None)
        if best is not None and first is not None:
            part.text.append(
                f"Best trial {best.number}: value {best.value:.4f} with {best.params}; trial 0 "
                f"(the untuned parameters): "
                f"{'n/a' if first.value is None else f'{first.value:.4f}'}."
            )
        for key, fig in figures.optuna_figures(study).items():
            png = figures.save(fig.get_figure(), out.figures, f"{slug}.{key}")
            part.figures.append((png, key.replace("_", " ")))
    return part, study


def _attack_seconds(rows: pd.DataFrame) -> pd.Series:
    """Seconds of a row's attack stages (a chain's earlier steps included; NaN if cached)."""
    return rows["stage_seconds"].map(
        lambda s: (s or {}).get("attack", math.nan) + (s or {}).get("attack_prior_steps", 0.0)
    )


def _tuned_attacker(study, trials: pd.DataFrame, everything: pd.DataFrame | None) -> Part | None:
    """A study that tunes one attack (or a choice among attacks) against one scheme
    (`tune.per`): per arch, its best trial within the constraints (feasible; the lowest
    watermark score, then the largest removal) and the attack it ran, beside the strongest
    hand-set setting of any attack on the same scheme and arch elsewhere in the store (a
    removal if one exists, else the lowest score within WRT's budget). None for any other
    study."""
    ok = trials[trials["status"] == "ok"]
    if ok.empty or ok["method"].nunique() != 1:
        return None
    feasible = {
        t.number for t in study.trials
        if t.state.name == "COMPLETE" and all(v <= 0 for v in (t.constraints or {}).values())
    }  # fmt: skip
    ok = _prepare(ok).assign(trial=lambda d: d["metrics"].map(lambda m: m.get("trial")),
                             seconds=_attack_seconds)  # fmt: skip
    drop = ok["task_score_marked"] - ok["task_score_attacked"]
    ok = ok.assign(drop=drop)
    hand = None
    if everything is not None:
        hand = everything[(everything["status"] == "ok")
                          & (everything["method"] == ok["method"].iloc[0])
                          & ~everything["scenario"].str.contains(r"\.trial\d+$")]  # fmt: skip
        hand = _prepare(hand) if len(hand) else None
    rows = []
    for arch, group in ok.groupby("arch"):
        fit = group[group["trial"].isin(feasible)]
        best = fit.sort_values(["removed", "wm_score_attacked"], ascending=[False, True]).head(1)
        entry = {"arch": arch, "trials": int(group["trial"].nunique()),
                 "feasible": int(fit["trial"].nunique()),
                 "cpu_s_per_trial": float(group["seconds"].median())}  # fmt: skip
        if len(best):
            b = best.iloc[0]
            entry.update(best_trial=int(b["trial"]), attack=b["attack"],
                         wm_score=b["wm_score_attacked"],
                         threshold=b["wm_threshold"], removed=b["removed"], task_drop=b["drop"],
                         params=b["attack_params"])  # fmt: skip
        if hand is not None:
            h = hand[hand["arch"] == arch]
            h = h.assign(drop=h["task_score_marked"] - h["task_score_attacked"])
            h = h[h["drop"] < 0.05]
            h = h.sort_values(["removed", "wm_score_attacked"], ascending=[False, True]).head(1)
            if len(h):
                r = h.iloc[0]
                entry.update(hand_attack=r["attack_label"], hand_wm_score=r["wm_score_attacked"],
                             hand_removed=r["removed"], hand_task_drop=r["drop"])  # fmt: skip
        rows.append(entry)
    part = Part("Tuned attacker")
    part.table = pd.DataFrame(rows)
    attacks = sorted(ok["attack"].unique())
    tuned = (f"{attacks[0]!r}" if len(attacks) == 1 else
             f"attacker (each trial chose among {', '.join(attacks)})")  # fmt: skip
    part.text.append(
        f"The tuned {tuned} against {ok['method'].iloc[0]!r}: per arch, the "
        "best trial that meets the study's constraints (removal first, then the lowest "
        "watermark score), its task drop and the attack's CPU / GPU seconds per trial, beside "
        "the strongest hand-set attack on the same scheme elsewhere in this store within "
        "WRT's 5-point budget (the min-max WRT approximates after the fact)."
    )
    return part


def _failures(failed: pd.DataFrame, out: Output, slug: str) -> Part:
    table = failed[["cell_id", "arch", "method_label", "attack_label", "seed", "error"]].copy()
    table["cell_id"] = table["cell_id"].str[:12]
    part = Part(f"Failed cells ({len(failed)})", table=table.head(50))
    part.csv = out.csv(table, f"{slug}.failed")
    part.text.append("`harness show STORE --failed` prints their tracebacks.")
    return part


# ------------------------------------------------------------------ reported beside measured


def _matches(rows: pd.DataFrame, where: dict) -> pd.Series:
    keep = pd.Series(True, index=rows.index)
    for key, want in where.items():
        if key.endswith("_params"):
            params = rows[key].map(lambda p: json.loads(p or "{}"))
            keep &= params.map(lambda p, w=want: all(p.get(k) == v for k, v in w.items()))
        else:
            keep &= rows[key] == want
    return keep


def _measure(
    metric: str, rows: pd.DataFrame, sections: dict, plugins: dict, where: dict
) -> float:
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return math.nan
    generic = {
        "wm_score": lambda d: d["wm_score_attacked"].astype(float).mean(),
        "wm_detected": lambda d: d["wm_detected"].astype(float).mean(),
        "wm_removed": lambda d: d["removed"].mean(),
        "task_score": lambda d: d["task_score_attacked"].mean(),
        "task_drop": lambda d: (d["task_score_marked"] - d["task_score_attacked"]).mean(),
        "embed_drop": lambda d: (d["task_score_clean"] - d["task_score_marked"]).mean(),
    }
    if metric in generic:
        return float(generic[metric](ok))
    values = ok["metrics"].map(lambda m: (m or {}).get(metric, math.nan)).astype(float)
    if values.notna().any():  # aggregated as the plug-in declares it (ssim_min: by its min)
        aggs = {m["name"]: m.get("agg", "mean") for p in plugins.values()
                for m in p.get("metrics", [])}  # fmt: skip
        return float(getattr(values.dropna(), aggs.get(metric, "mean"))())
    for key, (table, _) in sections.items():  # a column of a plug-in's own table
        if metric in table.columns and key.endswith(f"-{where.get('method', '')}".rstrip("-")):
            return float(pd.to_numeric(table[metric], errors="coerce").mean())
    return math.nan


def _reported(
    reported: Any, rows: pd.DataFrame, sections: dict, plugins: dict, out: Output, slug: str
) -> Part:
    part = Part("Reported beside measured")
    if isinstance(reported, dict):  # free-text notes
        part.text += [f"{k}: {v}" for k, v in reported.items()]
        part.text.append("(free text: give `reported:` as a list of {metric, value, op, where, "
                         "setting, source} to have each figure measured and compared)")  # fmt: skip
        return part
    out_rows = []
    for r in reported:
        where = r.get("where") or {}
        sel = rows[_matches(rows, where)]
        measured = _measure(r["metric"], sel, sections, plugins, where)
        op, value = r.get("op", "=="), float(r["value"])
        holds = (
            "n/a" if math.isnan(measured) else
            ("yes" if (measured >= value if op == ">=" else measured <= value) else "no")
            if op in (">=", "<=") else "-"
        )  # fmt: skip
        out_rows.append(
            {
                "metric": r["metric"],
                "where": ", ".join(f"{k}={v}" for k, v in where.items()) or "all cells",
                "paper": f"{op} {value:g}" if op != "==" else f"{value:g}",
                "measured": measured,
                "gap": measured - value,
                "claim holds here": holds,
                "cells": int((sel["status"] == "ok").sum()),
                "setting (paper)": r.get("setting", ""),
                "source": r.get("source", ""),
            }
        )
    table = pd.DataFrame(out_rows)
    part.table, part.csv = table, out.csv(table, f"{slug}.reported")
    part.text.append(
        "Each figure the paper reports (its setting and source beside it) against the same "
        "figure measured on the matching cells here; gap = measured − paper. Smaller data, "
        "models and budgets than the paper's are expected to move figures: the gap is shown, "
        "never hidden."
    )
    return part


# ------------------------------------------------------------------ pages

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.6em}table{border-collapse:collapse;font-size:.82em;margin:.6em 0;
display:block;overflow-x:auto}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;
white-space:nowrap}th{background:#f3f3f3}td.l,th.l{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
.meta{color:#555;font-size:.85em}nav a{margin-right:1em}
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(
        f'<th class="{"" if table[c].dtype.kind in "fiu" else "l"}">{html.escape(str(c))}</th>'
        for c in table.columns
    )
    body = []
    for row in table.itertuples(index=False):
        cells = "".join(
            f'<td class="{"" if table[c].dtype.kind in "fiu" else "l"}">'
            f"{html.escape(_fmt(v)).replace(chr(10), '<br>')}</td>"
            for c, v in zip(table.columns, row, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_page(reports: list[ScenarioReport], meta: dict, out: Output) -> str:
    esc = html.escape
    nav = "".join(f'<a href="#{esc(_safe(r.name))}">{esc(r.name)}</a>' for r in reports)
    body = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>wmbench report · {esc(str(meta['store']))}</title><style>{CSS}</style>",
        "</head><body>",
        f"<h1>wmbench report</h1><p class='meta'>store {esc(str(meta['store']))} · "
        f"{meta['rows']} rows · generated {meta['generated']} in {meta['seconds']:.1f} s · "
        "figures as PNG and PDF under figures/, tables as CSV under tables/</p>",
        f"<nav>{nav}</nav>",
    ]
    for r in reports:
        body.append(f"<h2 id='{esc(_safe(r.name))}'>Scenario {esc(r.name)}</h2>")
        for part in r.parts:
            body.append(f"<h3>{esc(part.title)}</h3>")
            body += [f"<p>{esc(t)}</p>" for t in part.text]
            for png, caption in part.figures:
                data = base64.b64encode((out.figures / png).read_bytes()).decode()
                pdf = png.removesuffix(".png") + ".pdf"
                body.append(
                    f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{esc(caption)} · <a href='figures/{esc(pdf)}'>PDF</a>"
                    "</figcaption></figure>"
                )
            if part.table is not None and not part.table.empty:
                body.append(_html_table(part.table))
            if part.csv:
                body.append(f"<p class='meta'><a href='tables/{esc(part.csv)}'>CSV</a></p>")
    body.append("</body></html>")
    return "\n".join(body)


def _markdown_page(reports: list[ScenarioReport], meta: dict) -> str:
    lines = [
        "# wmbench report",
        "",
        f"store `{meta['store']}` · {meta['rows']} rows · generated {meta['generated']}",
    ]
    for r in reports:
        lines += ["", f"## Scenario {r.name}"]
        for part in r.parts:
            lines += ["", f"### {part.title}", ""]
            lines += [*part.text]
            for png, caption in part.figures:
                lines += ["", f"![{caption}](figures/{png})"]
            if part.table is not None and not part.table.empty:
                table = part.table.map(lambda v: _fmt(v).replace("\n", " "))
                lines += ["", markdown(table)]
            if part.csv:
                lines += ["", f"[CSV](tables/{part.csv})"]
    return "\n".join(lines) + "\n"
