"""The Parquet results store: schema round trip, atomic writes, newest row per cell, compaction,
schema-driven reads of older files, and DuckDB reading the same files."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.errors import TransientError
from results import load
from results.schema import COLUMNS, SCHEMA_VERSION
from results.store import compact, ok_cell_ids, read_table, write_row

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def make_row(
    i: int, method: str = "trigger_set", attack: str = "prune", status: str = "ok", **changes: Any
) -> dict[str, Any]:
    row = {
        "cell_id": f"cell{i:03d}",
        "run_id": "run-1",
        "scenario": "unit",
        "dataset": "digits",
        "arch": "lenet",
        "method": method,
        "method_params": json.dumps({"n_keys": 10 + i}),
        "attack": attack,
        "attack_params": json.dumps({"sparsity": 0.5}),
        "attack_role": "benign",
        "seed": i,
        "status": status,
        "error": None if status == "ok" else "attack: CellFailed: boom",
        "traceback": None if status == "ok" else "Traceback (most recent call last): ...",
        "task_metric": "accuracy",
        "task_score_clean": 0.9,
        "task_score_marked": 0.89,
        "task_score_attacked": 0.8 - i / 100,
        "wm_metric": "trigger_acc",
        "wm_score_marked": 1.0,
        "wm_score_attacked": 0.5,
        "wm_threshold": 0.3,
        "wm_detected": i % 2 == 0,
        "metrics": {"null_mean": 0.1, "wm_removed": float(i % 2)},
        "duration_s": 3.5,
        "stage_seconds": {"train_victim": 2.0, "verify": 1.5},
        "node": "host",
        "device": "cpu",
        "harness_version": "0.1.0",
        "git_sha": "abc123",
        "schema_version": SCHEMA_VERSION,
        "created_at": T0 + timedelta(seconds=i),
    }
    row.update(changes)
    return row


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def by_cell(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("cell_id").reset_index(drop=True)


def test_round_trip_keeps_every_value(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    row = make_row(1)
    path = write_row(store, row)
    assert path == f"{store}/results/method=trigger_set/attack=prune/cell001.parquet"
    df = load(store)
    assert list(df.columns) == COLUMNS
    assert len(df) == 1
    got = df.iloc[0].to_dict()
    for col in COLUMNS:
        want = row[col]
        if want is None:
            assert pd.isna(got[col]), col
        elif col == "created_at":
            assert got[col].to_pydatetime() == want
            assert str(got[col].tz) == "UTC"
        else:
            assert got[col] == want, col
    assert isinstance(got["metrics"], dict) and isinstance(got["stage_seconds"], dict)
    assert json.loads(got["method_params"]) == {"n_keys": 11}


def test_write_fills_schema_version_and_created_at(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    row = make_row(2)
    del row["schema_version"], row["created_at"]
    before = datetime.now(timezone.utc)
    write_row(store, row)
    got = load(store).iloc[0]
    assert got["schema_version"] == SCHEMA_VERSION
    assert (
        before - timedelta(seconds=1)
        <= got["created_at"].to_pydatetime()
        <= (datetime.now(timezone.utc) + timedelta(seconds=1))
    )


def test_file_carries_the_fixed_schema(tmp_path: Path) -> None:
    path = write_row(str(tmp_path / "store"), make_row(1))
    schema = pq.read_schema(path)
    assert schema.names == COLUMNS
    assert schema.field("metrics").type == pa.map_(pa.string(), pa.float64())
    assert schema.metadata[b"wmbench_schema_version"] == str(SCHEMA_VERSION).encode()


def test_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for i in range(3):
        write_row(str(store), make_row(i, attack=["prune", "identity", "quantize"][i]))
    write_row(str(store), make_row(0))  # rewrite
    names = [p.name for p in files_under(store)]
    assert sorted(names) == ["cell000.parquet", "cell001.parquet", "cell002.parquet"]
    assert not any(n.startswith(".") for n in names)


def test_reader_ignores_leftover_temp_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    path = Path(write_row(str(store), make_row(1)))
    good = path.read_bytes()
    (path.parent / ".x.tmp").write_bytes(b"not parquet at all")
    (path.parent / f".cell009.parquet.{'0' * 32}.tmp").write_bytes(good[: len(good) // 2])
    df = load(str(store))
    assert df["cell_id"].tolist() == ["cell001"]
    assert ok_cell_ids(str(store)) == {"cell001"}


def test_store_holding_only_an_interrupted_write_reads_as_empty(tmp_path: Path) -> None:
    folder = tmp_path / "store" / "results" / "method=none" / "attack=identity"
    folder.mkdir(parents=True)
    (folder / f".cell001.parquet.{'0' * 32}.tmp").write_bytes(b"PAR1 half a file")
    df = load(str(tmp_path / "store"))
    assert df.empty and list(df.columns) == COLUMNS
    assert ok_cell_ids(str(tmp_path / "store")) == set()
    assert compact(str(tmp_path / "store")) == 0


def test_failed_write_leaves_no_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("harness.fs.os.replace", broken_replace)
    with pytest.raises(TransientError, match="disk full"):
        write_row(str(store), make_row(1))
    assert not [p for p in files_under(store) if not p.name.startswith(".")]
    assert load(str(store)).empty


def test_file_names_follow_the_status(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    folder = f"{store}/results/method=trigger_set/attack=prune"
    assert write_row(store, make_row(1)) == f"{folder}/cell001.parquet"
    assert write_row(store, make_row(2, status="failed")) == f"{folder}/cell002.failed.parquet"


def test_rewriting_a_cell_replaces_its_row(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_row(str(store), make_row(1, status="failed", created_at=T0))
    assert ok_cell_ids(str(store)) == set()
    write_row(str(store), make_row(1, status="ok", created_at=T0 + timedelta(minutes=1)))
    assert [p.name for p in files_under(store)] == ["cell001.parquet"]
    df = load(str(store))
    assert len(df) == 1
    assert df.loc[0, "status"] == "ok" and pd.isna(df.loc[0, "error"])
    assert ok_cell_ids(str(store)) == {"cell001"}
    write_row(str(store), make_row(1, status="failed", created_at=T0 + timedelta(minutes=2)))
    assert [p.name for p in files_under(store)] == ["cell001.failed.parquet"]
    assert load(str(store))["status"].tolist() == ["failed"]
    assert ok_cell_ids(str(store)) == set()


def ok_in_rows(store: str) -> set[str]:
    df = load(store)
    return set(df.loc[df["status"] == "ok", "cell_id"])


def test_ok_cell_ids_agrees_with_the_rows_through_compaction(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    for i, status in enumerate(["ok", "failed", "ok", "failed"]):
        write_row(store, make_row(i, status=status, created_at=T0))
    assert ok_cell_ids(store) == ok_in_rows(store) == {"cell000", "cell002"}
    assert compact(store) == 4
    assert ok_cell_ids(store) == ok_in_rows(store) == {"cell000", "cell002"}
    # after compaction: a failed cell turns ok, an ok cell turns failed
    write_row(store, make_row(1, status="ok", created_at=T0 + timedelta(hours=1)))
    write_row(store, make_row(2, status="failed", created_at=T0 + timedelta(hours=1)))
    assert ok_cell_ids(store) == ok_in_rows(store) == {"cell000", "cell001"}
    assert compact(store) == 3
    assert ok_cell_ids(store) == ok_in_rows(store) == {"cell000", "cell001"}


def test_ok_cell_ids_agrees_with_the_rows_after_a_crash_between_write_and_cleanup(
    tmp_path: Path,
) -> None:
    """write_row writes the new file, then deletes the other status's file. A crash in between
    leaves both; readers keep the newest row, and resume must see the same status."""
    store = tmp_path / "store"
    ok_path = Path(write_row(str(store), make_row(1, status="ok", created_at=T0)))
    kept = ok_path.read_bytes()
    write_row(str(store), make_row(1, status="failed", created_at=T0 + timedelta(minutes=1)))
    ok_path.write_bytes(kept)  # the stale ok file survived the crash
    assert load(str(store))["status"].tolist() == ["failed"]
    assert ok_cell_ids(str(store)) == ok_in_rows(str(store)) == set()


def test_newest_row_wins_when_old_and_new_files_coexist(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    write_row(store, make_row(1, created_at=T0))
    write_row(store, make_row(2, created_at=T0))
    assert compact(store) == 2
    write_row(
        store,
        make_row(1, status="failed", task_score_attacked=0.01, created_at=T0 + timedelta(hours=1)),
    )
    assert len(list((tmp_path / "store").rglob("*.parquet"))) == 2
    df = by_cell(load(store))
    assert df["cell_id"].tolist() == ["cell001", "cell002"]
    assert df.loc[0, "status"] == "failed" and df.loc[0, "task_score_attacked"] == 0.01
    assert ok_cell_ids(store) == {"cell002"}


def test_reading_a_missing_store_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    store = tmp_path / "nothing-here"
    assert ok_cell_ids(str(store)) == set()
    df = load(str(store))
    assert df.empty and list(df.columns) == COLUMNS
    assert read_table(str(store), ["cell_id", "status"]).column_names == ["cell_id", "status"]
    assert not store.exists()


def test_compact_merges_files_and_keeps_rows(tmp_path: Path) -> None:
    store = tmp_path / "store"
    partitions = [("none", "identity"), ("trigger_set", "prune")]
    for i in range(7):
        method, attack = partitions[i % 2]
        write_row(
            str(store),
            make_row(i, method=method, attack=attack, status="failed" if i == 3 else "ok"),
        )
    before = by_cell(load(str(store)))
    assert compact(str(store)) == 7
    files = files_under(store)
    assert len(files) == 2
    assert all(p.name.startswith("part-") for p in files)
    assert {p.parent.name for p in files} == {"attack=identity", "attack=prune"}
    pd.testing.assert_frame_equal(by_cell(load(str(store))), before)
    assert ok_cell_ids(str(store)) == {f"cell{i:03d}" for i in range(7) if i != 3}
    assert compact(str(store)) == 0
    assert files_under(store) == files


def test_reading_with_schema_keeps_columns_missing_from_a_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_row(str(store), make_row(1, method="none", attack="identity"))
    old = pa.table(
        {
            "cell_id": ["old0"],
            "method": ["none"],
            "attack": ["identity"],
            "status": ["ok"],
            "task_score_clean": [0.75],
        }
    )
    pq.write_table(old, store / "results" / "method=none" / "attack=identity" / "old0.parquet")
    df = by_cell(load(str(store)))
    assert list(df.columns) == COLUMNS
    assert df["cell_id"].tolist() == ["cell001", "old0"]
    old_row = df.iloc[1]
    assert (old_row["status"], old_row["task_score_clean"]) == ("ok", 0.75)
    assert old_row["metrics"] is None and pd.isna(old_row["wm_score_attacked"])
    assert df.iloc[0]["metrics"] == make_row(1)["metrics"]
    assert ok_cell_ids(str(store)) == {"cell001", "old0"}


def test_duckdb_reads_the_store(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    store = tmp_path / "store"
    partitions = [("none", "identity"), ("trigger_set", "prune"), ("trigger_set", "quantize")]
    for i in range(6):
        method, attack = partitions[i % 3]
        write_row(
            str(store),
            make_row(i, method=method, attack=attack, status="failed" if i == 4 else "ok"),
        )
    old = pa.table(
        {"cell_id": ["old0"], "method": ["none"], "attack": ["identity"], "status": ["ok"]}
    )
    pq.write_table(old, store / "results" / "method=none" / "attack=identity" / "old0.parquet")
    (store / "results" / "method=none" / "attack=identity" / ".x.tmp").write_bytes(b"junk")
    df = load(str(store))
    query = (
        f"SELECT * FROM read_parquet('{store}/results/**/*.parquet', "
        "hive_partitioning=true, union_by_name=true)"
    )
    con = duckdb.connect()
    rel = con.sql(query)
    # The hive keys method / attack are also columns inside the files: DuckDB keeps one of each.
    assert rel.columns.count("method") == 1 and rel.columns.count("attack") == 1
    assert set(COLUMNS) <= set(rel.columns)
    got = con.sql(
        f"SELECT cell_id, method, attack, metrics['wm_removed'] AS removed "
        f"FROM ({query}) ORDER BY cell_id"
    ).fetchall()
    assert len(got) == len(df) == 7
    assert [(c, m, a) for c, m, a, _ in got] == sorted(
        zip(df["cell_id"], df["method"], df["attack"], strict=True)
    )
    assert got[1][3] == 1.0  # cell001: a map column reads as a DuckDB MAP
    assert got[-1][3] is None  # old0 lacks the column: union_by_name fills NULL
    failed = con.sql(f"SELECT cell_id FROM ({query}) WHERE status = 'failed'").fetchall()
    assert failed == [("cell004",)]  # <cell_id>.failed.parquet files are read too


def test_shares_are_over_ok_cells_and_failures_have_their_own_column(tmp_path: Path) -> None:
    """One failed + one detected cell: detected 1.0 (not 0.5), failed 1."""
    from results.analysis import summary

    store = str(tmp_path / "store")
    ok = {**make_row(1), "cell_id": "ok1", "wm_detected": True}
    failed = {"status": "failed", "error": "attack: boom", "wm_score_attacked": None}
    bad = {**make_row(1), **failed, "cell_id": "bad1", "wm_detected": False}
    for row in (ok, bad):
        write_row(store, row)
    table = summary(load(store))
    (line,) = table.to_dict("records")
    assert line["cells"] == 2 and line["failed"] == 1 and line["detected"] == 1.0


def test_error_column_is_one_clean_line() -> None:
    from harness.stages import one_line

    raw = "attack: OSError: \x1b[31m[errno 30] read-only\x1b[0m\nmore detail\nand more"
    assert one_line(raw) == "attack: OSError: [errno 30] read-only …"
    assert len(one_line("x" * 5000)) == 500


def test_compact_while_a_driver_writes_loses_no_row(tmp_path: Path) -> None:
    """A writer thread stores 400 cells, a third of them failed first and rewritten ok (the
    driver's other-status file), while `compact` runs over and over: every cell ends with
    its newest row, none lost or stale, no file unreadable."""
    import threading

    store = str(tmp_path)
    n = 400
    done = threading.Event()

    def writer() -> None:
        for i in range(n):
            if i % 3 == 0:
                write_row(store, make_row(i, status="failed", created_at=T0))
            write_row(store, make_row(i, created_at=T0 + timedelta(seconds=1)))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    passes = 0
    while not done.is_set():
        compact(store)
        passes += 1
    thread.join()
    compact(store)
    df = load(store)
    assert passes > 1, "compact never overlapped the writer"
    assert len(df) == n and df["cell_id"].is_unique
    assert (df["status"] == "ok").all()
    assert ok_cell_ids(store) == {f"cell{i:03d}" for i in range(n)}
    assert not list(tmp_path.rglob(".*")), "temp or set-aside files left behind"
