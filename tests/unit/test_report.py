"""`harness report` on synthetic stores (no Ray, no torch): the page is self-contained and names
every section, figures come as PNG + PDF, the CSV tables hold the right counts and figures, bad
input exits 2 before anything is written, and a 100,000-row store is reported."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from report_store import (
    FAILED,
    PLUGIN_TABLE,
    PLUGIN_TITLE,
    RUN_ID,
    SCENARIO,
    build_synthetic_store,
    write_partitions,
)

from harness.cli import main
from results import reporting
from results.store import load, write_row

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "Overview",
    "Decision statistics",
    "Separability",
    "Watermark retention",
    "Robustness curves",
    "Pareto",
    "Cost per cell",
    "Reported beside measured",
    "Failed cells",
    PLUGIN_TITLE,
)


@dataclass
class Report:
    store: Path
    rows: pd.DataFrame  # as written by the helper
    out: Path
    page: str  # index.html, HTML entities unescaped

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.out / "tables" / f"{SCENARIO}.{name}.csv")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    root = tmp_path_factory.mktemp("report")
    store, out = root / "store", root / "out"
    rows = build_synthetic_store(store)
    assert main(["report", str(store), "--out", str(out)]) == 0
    page = html.unescape((out / "index.html").read_text())
    return Report(store, pd.DataFrame(rows), out, page)


def _ok(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"] == "ok"]


def _params(rows: pd.DataFrame, col: str) -> pd.Series:
    return rows[col].map(json.loads)


# ------------------------------------------------------------------ the page


def test_page_is_self_contained(report: Report) -> None:
    raw = (report.out / "index.html").read_text()
    lower = raw.lower()
    assert lower.startswith("<!doctype html>")
    assert "<script src" not in lower and "<link" not in lower and "@import" not in lower
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", lower)
    assert not re.search(r"url\(\s*[\"']?(?:https?:)?//", lower)  # no web fonts or CSS images
    srcs = re.findall(r"""<img\b[^>]*\bsrc=(["'])(.*?)\1""", raw)
    pngs = sorted((report.out / "figures").glob("*.png"))
    assert len(srcs) == len(pngs) >= 6  # every figure on the page, embedded
    assert all(src.startswith("data:image/png;base64,") for _, src in srcs)
    # links point only into the report folder: PDFs and CSVs beside the page
    for href in re.findall(r"""href=["']([^"'#]+)["']""", raw):
        assert href.startswith(("figures/", "tables/")) and (report.out / href).is_file(), href
    assert re.search(r"<title>wmbench report", raw)


def test_page_names_every_section(report: Report) -> None:
    for title in SECTIONS:
        assert title in report.page, title
    assert "Scenario synth" in report.page
    assert "90 cells: 89 ok, 1 failed" in report.page
    assert "a synthetic grid" in report.page  # the manifest's description


def test_figures_png_and_pdf(report: Report) -> None:
    folder = report.out / "figures"
    pngs = sorted(folder.glob("*.png"))
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png.name
        pdf = png.with_suffix(".pdf")
        assert pdf.is_file() and pdf.read_bytes()[:5] == b"%PDF-", pdf.name
    assert {p.suffix for p in folder.iterdir()} == {".png", ".pdf"}
    names = {p.name for p in pngs}
    assert {"synth.heatmap.lenet.png", "synth.heatmap.resnet18.png"} <= names
    assert any(n.startswith("synth.curve.prune.sparsity.") for n in names)
    # one Pareto figure per marked method setting and arch: 2 x 2
    # one Pareto figure per method setting, a panel per arch
    assert len([n for n in names if n.startswith("synth.pareto.")]) == 2
    assert "synth.method-trigger_set.0.png" in names  # the plug-in's declared bar chart


def test_decision_table(report: Report) -> None:
    d = report.table("decision")
    # 3 method settings x 2 archs x 5 attack settings, `none` included
    assert len(d) == 30
    assert set(d["method_label"]) == {"trigger_set(n_keys=20)", "trigger_set(n_keys=50)", "none"}
    assert set(d["attack_label"]) == {
        "identity",
        "prune(sparsity=0.2)",
        "prune(sparsity=0.5)",
        "prune(sparsity=0.8)",
        "fine_tune",
    }
    assert (d["cells"] == 3).all() and d["failed"].sum() == 1
    arch, n_keys, _, sparsity, _ = FAILED
    key = (d["method_label"] == f"trigger_set(n_keys={n_keys})") & (d["arch"] == arch)
    g = d[key & (d["attack_label"] == f"prune(sparsity={sparsity})")].iloc[0]
    assert g["failed"] == 1 and g["seeds"] == 2
    # by hand: the ok seeds 1 and 2 score 0.27 and 0.32 against the threshold 0.3, so one of
    # the two ok cells is detected; the failed cell counts in neither the numerator nor n
    assert g["detected_n"] == 2 and g["detected"] == pytest.approx(1 / 2)
    assert 0 <= g["detected_low"] < 0.5 < g["detected_high"] <= 1
    assert g["wm_score"] == pytest.approx((0.27 + 0.32) / 2)
    # the ok cell without a score: counted as a cell, not in the share or the mean
    nan = d[
        (d["method_label"] == "trigger_set(n_keys=50)")
        & (d["arch"] == "resnet18")
        & (d["attack_label"] == "fine_tune")
    ].iloc[0]
    assert nan["failed"] == 0 and nan["detected_n"] == 2 and nan["missing"] == 1
    assert nan["wm_score"] == pytest.approx((0.25 + 0.27) / 2)
    # `none` has nothing to detect: no share, yet its cells and task drops are there
    none = d[d["method_label"] == "none"]
    assert (none["detected_n"] == 0).all() and none["detected"].isna().all()
    assert none["task_drop"].notna().all()
    # identity keeps every mark: detected everywhere, tiny binomial p-values
    ident = d[(d["attack_label"] == "identity") & (d["method_label"] != "none")]
    assert (ident["detected"] == 1.0).all() and (ident["p_binomial"] < 1e-6).all()
    assert (ident["removed"] == 0.0).all()
    # ftal on 50 keys: not detected at a 2-point task drop -> removed by WRT's rule
    ftal = d[(d["attack_label"] == "fine_tune") & (d["method_label"] == "trigger_set(n_keys=50)")]
    assert (ftal["removed"] == 1.0).all() and (ftal["detected"] == 0.0).all()


def test_ok_cell_without_score_is_noted(report: Report) -> None:
    # only the one trigger_set cell; `none` cells have no watermark score by design
    assert "1 ok cell(s) have no watermark score (NaN)" in report.page


def test_separability(report: Report) -> None:
    s = report.table("separability")
    assert len(s) == 2 * 2 * 5  # marked method settings x archs x attack settings
    assert set(s["method"]) == {"trigger_set(n_keys=20)", "trigger_set(n_keys=50)"}
    # 2 null models per key x 3 seeds (keys), whatever the attack
    assert (s["negatives"] == 6).all()
    assert s["note"].str.contains("rests on 6 < 10 negatives").all()
    assert s["positives"].sum() == 20 * 3 - 2  # less the failed cell and the NaN score
    # identity: every marked score (>= 0.96) beats every null score (<= 0.14)
    assert (s.loc[s["attack"] == "identity", "auc"] == 1.0).all()
    assert f"fewer than {10} negatives" in report.page


def test_negatives_do_not_depend_on_row_order(report: Report) -> None:
    """A seed's null scores are found even when its first row has no metrics."""
    df = load(str(report.store))
    g = df[
        (df["status"] == "ok")
        & (df["method_params"] == '{"n_keys":50}')
        & (df["arch"] == "resnet18")
    ]
    no_metrics_first = g.assign(_m=g["metrics"].notna()).sort_values("_m", kind="stable")
    assert no_metrics_first["metrics"].iloc[0] is None
    assert len(reporting._negatives(no_metrics_first)) == 6
    assert len(reporting._negatives(no_metrics_first.iloc[::-1])) == 6


def test_reported_beside_measured(report: Report) -> None:
    r = report.table("reported")
    assert list(r["metric"]) == ["wm_detected", "wm_score"]  # the newest manifest's figures
    ok = _ok(report.rows)
    ts = ok[ok["method"] == "trigger_set"]
    ident = ts[ts["attack"] == "identity"]
    pruned = ts[
        (ts["attack"] == "prune")
        & (_params(ts, "attack_params").map(lambda p: p.get("sparsity") == 0.8))
    ]
    held, missed = r.iloc[0], r.iloc[1]
    assert held["claim holds here"] == "yes" and held["cells"] == len(ident) == 12
    assert held["measured"] == pytest.approx(ident["wm_detected"].astype(float).mean()) == 1.0
    assert missed["claim holds here"] == "no" and missed["cells"] == len(pruned) == 11
    by_hand = (0.27 + 0.32 + 0.22 + 0.27 + 0.32 + 2 * (0.22 + 0.27 + 0.32)) / 11
    assert missed["measured"] == pytest.approx(by_hand)
    assert missed["gap"] == pytest.approx(by_hand - 0.9)
    assert "Adi et al. 2018, Fig. 4" in report.page


def test_plugin_section(report: Report) -> None:
    table = report.table("method-trigger_set")
    pd.testing.assert_frame_equal(table, PLUGIN_TABLE)
    assert "method-trigger_set" in report.page
    assert "Built from" not in report.page  # the section saw every row of the scenario


def test_failed_and_cost_tables(report: Report) -> None:
    failed = report.table("failed")
    assert len(failed) == 1 and "illegal memory access" in failed["error"].iloc[0]
    assert "Failed cells (1)" in report.page
    cost = report.table("cost")
    assert cost["cells"].sum() == 90
    assert {"train_victim_s", "embed_s", "attack_s", "verify_s"} <= set(cost.columns)
    assert (cost["gpu_seconds"] == 0).all()  # every cell ran on the CPU
    runs = report.table("runs")  # each run's manifest: what it computed, what it found cached
    assert list(runs["run"]) == ["run-synth-0000", RUN_ID]  # oldest first
    newest = runs.iloc[-1]
    assert (newest["cells"], newest["computed train_victim"], newest["computed attack"]) == (
        90, 6, 80
    )


def test_markdown(report: Report, tmp_path: Path) -> None:
    out = tmp_path / "md"
    assert main(["report", str(report.store), "--out", str(out), "--format", "markdown"]) == 0
    assert not (out / "index.html").exists()
    text = (out / "index.md").read_text()
    assert text.startswith("# wmbench report")
    for title in SECTIONS:
        assert title in text, title
    lines = text.splitlines()
    assert any(line.startswith("| method | arch | attack |") for line in lines)
    assert any(re.fullmatch(r"\|(?:-{3}:?\|)+", line) for line in lines)  # a table's rule
    links = re.findall(r"!\[[^\]]+\]\((figures/[^)]+\.png)\)", text)
    assert len(links) >= 6 and all((out / link).is_file() for link in links)


# ------------------------------------------------------------------ options and bad input


@pytest.fixture
def two_scenarios(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    rows = build_synthetic_store(store)
    other = {**rows[0], "cell_id": "f" * 64, "scenario": "other", "run_id": "run-other"}
    write_row(str(store), other)
    return store


def test_scenario_option(two_scenarios: Path, tmp_path: Path) -> None:
    out = tmp_path / "only"
    assert main(["report", str(two_scenarios), "--scenario", SCENARIO, "--out", str(out)]) == 0
    page = html.unescape((out / "index.html").read_text())
    assert "Scenario synth" in page and "Scenario other" not in page
    assert "90 cells: 89 ok, 1 failed" in page
    assert {p.name.split(".")[0] for p in (out / "tables").iterdir()} == {SCENARIO}


def test_unknown_scenario(two_scenarios: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nope-out"
    assert main(["report", str(two_scenarios), "--scenario", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --scenario" in err and "'nope'" in err
    assert "Allowed: other, synth" in err
    assert not out.exists()


def test_empty_store(tmp_path: Path, capsys) -> None:
    store, out = tmp_path / "empty", tmp_path / "out"
    store.mkdir()
    assert main(["report", str(store), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no result rows" in err
    assert not out.exists()
    assert list(store.iterdir()) == []  # reading the store wrote nothing into it


def test_out_is_a_file(report: Report, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.html"
    out.write_text("keep me")
    assert main(["report", str(report.store), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--out" in err
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_report_imports_neither_torch_nor_ray(report: Report, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys; from harness.cli import main; "
        f"main(['report', {str(report.store)!r}, '--out', {str(out)!r}]); "
        "print(sorted(m for m in ('torch','ray','timm') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "index.html").is_file()


# ------------------------------------------------------------------ a large store

BIG_ARCHS = [f"arch{i}" for i in range(10)]
BIG_SEEDS = 100
BIG_METHODS = [*(("trigger_set", {"n_keys": k}) for k in (10, 20, 50, 100)), ("none", {})]
BIG_ATTACKS = [  # (name, params, strength in [0, 1])
    ("identity", {}, 0.0),
    *(("prune", {"sparsity": s}, s) for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)),
    *(
        ("fine_tune", {"mode": m}, x)
        for m, x in (("ftll", 0.1), ("rtll", 0.2), ("ftal", 0.4), ("rtal", 0.6))
    ),
    *(("quantize", {"bits": b}, x) for b, x in ((8, 0.0), (6, 0.1), (4, 0.3), (2, 0.9))),
    *(("distill", {"epochs": e}, x) for e, x in ((1, 0.3), (2, 0.5), (5, 0.8))),
]


def big_rows() -> list[dict[str, Any]]:
    """10 archs x 100 seeds x 5 method settings x 20 attack settings = 100,000 rows, the
    figures drawn with numpy in one go."""
    a, m, k, s = (
        x.ravel()
        for x in np.meshgrid(
            np.arange(len(BIG_ARCHS)),
            np.arange(len(BIG_METHODS)),
            np.arange(len(BIG_ATTACKS)),
            np.arange(BIG_SEEDS),
            indexing="ij",
        )
    )
    n = a.size
    rng = np.random.default_rng(0)
    strength = np.array([x for *_, x in BIG_ATTACKS])[k]
    clean = 0.9 - 0.01 * a + rng.normal(0, 0.01, n)
    marked = clean - 0.01
    attacked = marked - 0.2 * strength**2 + rng.normal(0, 0.005, n)
    wm = np.clip(0.97 - 0.9 * strength**2 + rng.normal(0, 0.05, n), 0, 1)
    detected = wm >= 0.3
    removed = ~detected & (marked - attacked < 0.05)
    null_rng = np.random.default_rng(1)  # null scores depend on (arch, method, seed) only
    nulls = np.clip(
        null_rng.normal(0.1, 0.03, (len(BIG_ARCHS), len(BIG_METHODS), BIG_SEEDS, 3)), 0, 1
    )[a, m, s]
    p_value = np.exp(-40 * np.clip(wm - 0.1, 0, None))
    method_json = [json.dumps(p, separators=(",", ":")) for _, p in BIG_METHODS]
    attack_json = [json.dumps(p, separators=(",", ":")) for _, p, _ in BIG_ATTACKS]
    stages = {"train_victim": 30.0, "embed": 10.0, "attack": 5.0, "verify": 1.0}
    rows = []
    for i, (ai, mi, ki, si) in enumerate(
        zip(a.tolist(), m.tolist(), k.tolist(), s.tolist(), strict=True)
    ):
        method, attack = BIG_METHODS[mi][0], BIG_ATTACKS[ki][0]
        marked_wm = method != "none"
        rows.append(
            {
                "cell_id": f"{i:064x}",
                "run_id": "run-big",
                "scenario": "big",
                "dataset": "cifar10",
                "arch": BIG_ARCHS[ai],
                "method": method,
                "method_params": method_json[mi],
                "attack": attack,
                "attack_params": attack_json[ki],
                "seed": si,
                "status": "ok",
                "task_metric": "accuracy",
                "task_score_clean": clean[i],
                "task_score_marked": marked[i] if marked_wm else clean[i],
                "task_score_attacked": attacked[i],
                "wm_metric": "trigger_accuracy" if marked_wm else None,
                "wm_score_marked": 0.97 if marked_wm else None,
                "wm_score_attacked": wm[i] if marked_wm else None,
                "wm_threshold": 0.3 if marked_wm else None,
                "wm_detected": bool(detected[i]) if marked_wm else None,
                "metrics": {
                    "p_value": p_value[i],
                    "null_mean": 0.1,
                    "null_std": 0.03,
                    "null_score_0": nulls[i, 0],
                    "null_score_1": nulls[i, 1],
                    "null_score_2": nulls[i, 2],
                    "wm_detected_marked": 1.0,
                    "wm_removed": float(removed[i]),
                }
                if marked_wm
                else {},
                "duration_s": 46.0,
                "stage_seconds": stages,
                "node": "node-0",
                "device": "cuda:0",
                "git_sha": "abc1234",
            }
        )
    return rows


# about 20 s on 2 cores (figures drawn by worker processes); the time is printed, not asserted
def test_report_of_100k_rows(tmp_path: Path, capsys) -> None:
    store, out = tmp_path / "big", tmp_path / "out"
    start = time.perf_counter()
    rows = big_rows()
    write_partitions(store, rows)
    written = time.perf_counter() - start
    assert len(rows) == 100_000
    start = time.perf_counter()
    assert main(["report", str(store), "--out", str(out)]) == 0
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n100,000-row store: written in {written:.1f} s, reported in {seconds:.1f} s")
    d = pd.read_csv(out / "tables" / "big.decision.csv")
    assert len(d) == 10 * 5 * 20 and (d["cells"] == 100).all() and d["failed"].sum() == 0
    s = pd.read_csv(out / "tables" / "big.separability.csv")
    assert len(s) == 10 * 4 * 20 and (s["negatives"] == 3 * 100).all()
    assert s["note"].isna().all()  # 300 negatives: enough
    # figures are capped per kind; the tables hold every group
    assert len(list((out / "figures").glob("big.pareto.*.png"))) == 4  # per method setting
    assert len(list((out / "figures").glob("big.heatmap.*.png"))) == 10  # per arch
    assert len(pd.read_csv(out / "tables" / "big.pareto.csv")) == 10 * 4 * 20
    page = (out / "index.html").read_text()
    assert "100000 rows" in page


def test_schemes_ordered_by_the_attacks_that_remove_them(report: Report) -> None:
    ranking = report.table("ranking")
    rows = _ok(report.rows)
    marked = rows[rows["wm_metric"].notna()]
    settings = marked[marked["attack"] != "identity"]["attack_params"].map(str)
    attacks = marked[marked["attack"] != "identity"].assign(p=settings)
    expected = attacks.groupby(["attack", "p"]).ngroups
    assert len(ranking) == marked["method_params"].nunique()  # one row per method setting
    assert (ranking["attack settings"] == expected).all()
    assert ranking["share removing"].is_monotonic_increasing  # most robust first
    assert (ranking["removing it"] <= ranking["attack settings"]).all()
    assert "Schemes ordered by the attacks that remove them" in report.page
