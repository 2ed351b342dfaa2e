"""A small synthetic results store for `harness report` tests (no Ray, no torch).

Scenario "synth": 2 archs x (trigger_set with n_keys 20 and 50, none) x (identity, prune at
sparsity 0.2 / 0.5 / 0.8, fine_tune ftal) x 3 seeds = 90 cells, with realistic figures:
watermark and task scores fall with the pruning sparsity, null-model scores lie around 0.1,
p-values come from the key accuracy. One cell failed, one ok cell has no watermark score and
no metrics. A run manifest carries two reported figures (one holds here, one does not) and the
trigger_set plug-in has a stored section. Imported by tests/unit/test_report.py and
tests/integration/test_report_browser.py (pytest puts tests/ on sys.path: its conftest.py)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from results.store import rows_to_table, write_row, write_sections

SCENARIO = "synth"
RUN_ID = "run-synth-0001"
ARCHS = ("lenet", "resnet18")
METHODS = (("trigger_set", {"n_keys": 20}), ("trigger_set", {"n_keys": 50}), ("none", {}))
SPARSITIES = (0.2, 0.5, 0.8)
ATTACKS = (
    ("identity", {}),
    *(("prune", {"sparsity": s}) for s in SPARSITIES),
    ("fine_tune", {"mode": "ftal"}),
)
SEEDS = (0, 1, 2)
THRESHOLD = 0.3  # trigger accuracy a suspect must reach (the null models' mean + 4 std)
NULL_MEAN, NULL_STD = 0.1, 0.05
N_NULL = 2  # null models per key: null_score_0, null_score_1

# the one failed cell and the one ok cell without a watermark score or metrics
FAILED = ("lenet", 20, "prune", 0.8, 0)  # arch, n_keys, attack, sparsity, seed
NO_SCORE = ("resnet18", 50, "fine_tune", None, 1)

PLUGIN_TITLE = "Trigger set: own summary of the plug-in"
PLUGIN_KEY = "method-trigger_set"
PLUGIN_TABLE = pd.DataFrame(
    {"attack": ["identity", "prune", "fine_tune"], "score": [0.97, 0.61, 0.52]}
)

REPORTED = [
    {
        "metric": "wm_detected",
        "value": 0.95,
        "op": ">=",
        "where": {"method": "trigger_set", "attack": "identity"},
        "setting": "CIFAR-10, ResNet-18, 100 keys",
        "source": "Adi et al. 2018, Table 2",
    },
    {
        "metric": "wm_score",
        "value": 0.9,
        "op": ">=",
        "where": {"method": "trigger_set", "attack": "prune", "attack_params": {"sparsity": 0.8}},
        "setting": "80 % pruning",
        "source": "Adi et al. 2018, Fig. 4",
    },
]


def canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _cell_id(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _row(arch: str, method: str, mp: dict, attack: str, ap: dict, seed: int) -> dict[str, Any]:
    a = ARCHS.index(arch)
    clean = 0.92 - 0.04 * a + 0.004 * seed
    marked = clean - 0.01 if method != "none" else clean
    s = ap.get("sparsity", 0.0)
    task_drop = {"identity": 0.0, "prune": 0.3 * s * s, "fine_tune": 0.02}[attack]
    row: dict[str, Any] = {
        "cell_id": _cell_id(SCENARIO, arch, method, canonical(mp), attack, canonical(ap), seed),
        "run_id": RUN_ID,
        "scenario": SCENARIO,
        "dataset": "cifar10",
        "arch": arch,
        "method": method,
        "method_params": canonical(mp),
        "attack": attack,
        "attack_params": canonical(ap),
        "attack_role": "benign" if attack == "identity" else "malicious",
        "seed": seed,
        "status": "ok",
        "error": None,
        "traceback": None,
        "task_metric": "accuracy",
        "task_score_clean": clean,
        "task_score_marked": marked,
        "task_score_attacked": marked - task_drop,
        "wm_metric": None,
        "wm_score_marked": None,
        "wm_score_attacked": None,
        "wm_threshold": None,
        "wm_detected": None,
        "metrics": {},
        "duration_s": 4.0 + a + 2.0 * s,
        "stage_seconds": {"train_victim": 3.0 + a, "embed": 1.0, "attack": 0.5 + s, "verify": 0.2},
        "node": "node-0",
        "device": "cpu",
        "harness_version": "0.1.0",
        "git_sha": "abc1234",
    }
    if method == "none":
        return row
    n_keys = mp["n_keys"]
    marked_wm = 0.97 - 0.01 * a
    attacked_wm = {
        "identity": marked_wm,
        # falls with the sparsity; at 0.8 it straddles the threshold across the seeds
        "prune": marked_wm - 0.9 * s * s if s < 0.8 else 0.22 + 0.05 * seed,
        "fine_tune": 0.55 if n_keys == 20 else 0.25 + 0.01 * seed,  # ftal removes 50 keys
    }[attack]
    detected = attacked_wm >= THRESHOLD
    nulls = {
        f"null_score_{i}": round(0.1 + 0.02 * ((seed + 2 * i + a + n_keys) % 5 - 2), 4)
        for i in range(N_NULL)
    }
    hits = round(attacked_wm * n_keys)
    removed = (not detected) and task_drop < 0.05
    row.update(
        wm_metric="trigger_accuracy",
        wm_score_marked=marked_wm,
        wm_score_attacked=attacked_wm,
        wm_threshold=THRESHOLD,
        wm_detected=bool(detected),
        metrics={
            "p_value": float(stats.binomtest(hits, n_keys, 0.1, alternative="greater").pvalue),
            "null_mean": NULL_MEAN,
            "null_std": NULL_STD,
            **nulls,
            "wm_detected_marked": 1.0,
            "wm_removed": float(removed),
        },
    )
    key = (arch, n_keys, attack, ap.get("sparsity"), seed)
    if key == FAILED:
        row.update(
            status="failed",
            error="RuntimeError: CUDA error: an illegal memory access was encountered",
            traceback="Traceback (most recent call last):\n  ...\nRuntimeError: boom",
            task_score_attacked=None,
            wm_score_attacked=None,
            wm_detected=None,
            metrics={},
        )
    elif key == NO_SCORE:
        row.update(wm_score_attacked=float("nan"), wm_detected=None, metrics=None)
    return row


def synthetic_rows() -> list[dict[str, Any]]:
    return [
        _row(arch, method, mp, attack, ap, seed)
        for arch in ARCHS
        for method, mp in METHODS
        for attack, ap in ATTACKS
        for seed in SEEDS
    ]


def write_partitions(store: Path, rows: list[dict[str, Any]]) -> None:
    """One Parquet file per (method, attack) partition, as `harness compact` leaves them."""
    parts: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        parts[row["method"], row["attack"]].append(row)
    for (method, attack), part in parts.items():
        folder = store / "results" / f"method={method}" / f"attack={attack}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_to_table(part), folder / "part-0.parquet")


def build_synthetic_store(store: Path) -> list[dict[str, Any]]:
    """Write the synthetic store under `store`; returns its rows (as written)."""
    rows = synthetic_rows()
    failed = [r for r in rows if r["status"] != "ok"]
    write_partitions(store, [r for r in rows if r["status"] == "ok"])
    for row in failed:  # as the driver writes it: <cell_id>.failed.parquet
        write_row(str(store), row)
    runs = store / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_id": RUN_ID,
        "started_at": "2026-11-29T00:00:00+00:00",
        "scenario": {"name": SCENARIO, "description": "a synthetic grid", "reported": REPORTED},
        "cells": 90, "skipped": 0, "ok": 89, "failed": 1, "seconds": 12.5,
        "computed": {"train_victim": 6, "embed": 4, "attack": 80, "verify": 90},
    }  # fmt: skip
    (runs / f"{RUN_ID}.json").write_text(json.dumps(manifest))
    older = {  # an older run of the same scenario: its figures are not the ones reported
        "run_id": "run-synth-0000",
        "started_at": "2026-11-01T00:00:00+00:00",
        "scenario": {
            "name": SCENARIO,
            "reported": [{"metric": "embed_drop", "value": 0.01, "op": "<=", "where": {}}],
        },
    }
    (runs / "run-synth-0000.json").write_text(json.dumps(older))
    plugins = {
        PLUGIN_KEY: {
            "kind": "method",
            "name": "trigger_set",
            "summary_title": PLUGIN_TITLE,
            "metrics": [],
            "figures": [
                {"title": "bars", "x": ["attack"], "y": ["score"], "ylabel": "s", "hline": None}
            ],
        }
    }
    write_sections(str(store), SCENARIO, plugins, {PLUGIN_KEY: PLUGIN_TABLE}, len(rows))
    return rows
