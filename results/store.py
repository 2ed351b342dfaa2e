"""The Parquet results store: one file per cell, written atomically; one reader for all.

    <store>/results/method=<m>/attack=<a>/<cell_id>.parquet          (status ok)
    <store>/results/method=<m>/attack=<a>/<cell_id>.failed.parquet   (status failed)

`compact` merges a partition's per-cell files into one file for fast scans of large stores;
readers keep the newest row per cell_id, so compacted and fresh files can coexist.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.fs import atomic_write, exists, open_store
from results.schema import COLUMNS, SCHEMA, SCHEMA_VERSION

FAILED_SUFFIX = ".failed.parquet"
PART_PREFIX = "part-"


def _partition(fs_root: str, method: str, attack: str) -> str:
    return f"{fs_root}/results/method={method}/attack={attack}"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    now = datetime.now(timezone.utc)
    stamp = {"schema_version": SCHEMA_VERSION, "created_at": now}
    return pa.Table.from_pylist([{**stamp, **r} for r in rows], schema=SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _cell_file(row: dict[str, Any], ok: bool) -> str:
    return f"{row['cell_id']}.parquet" if ok else f"{row['cell_id']}{FAILED_SUFFIX}"


def write_row(store: str, row: dict[str, Any]) -> str:
    """Write one cell's row atomically; returns its path.

    Failed rows go to `<cell_id>.failed.parquet`, so resuming needs only a file listing; the
    file of the other status is removed after the write (readers keep the newest row)."""
    fs, root = open_store(store)
    folder, ok = _partition(root, row["method"], row["attack"]), row.get("status") == "ok"
    path = f"{folder}/{_cell_file(row, ok)}"
    atomic_write(fs, path, _parquet_bytes(rows_to_table([row])))
    stale = f"{folder}/{_cell_file(row, not ok)}"
    if exists(fs, stale):
        fs.delete_file(stale)
    return path


def read_table(store: str, columns: list[str] | None = None) -> pa.Table:
    """All rows under the fixed schema (newest per cell_id), or an empty table."""
    fs, root = open_store(store)
    base = f"{root}/results"
    if not exists(fs, base):
        return SCHEMA.empty_table().select(columns or COLUMNS)
    want = list(dict.fromkeys([*(columns or COLUMNS), "cell_id", "created_at"]))
    dataset = ds.dataset(
        base, schema=SCHEMA, format="parquet", filesystem=fs, ignore_prefixes=[".", "_"]
    )
    return _newest_per_cell(dataset.to_table(columns=want)).select(columns or COLUMNS)


def _newest_per_cell(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    ids = table["cell_id"]
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return table
    order = table.sort_by([("cell_id", "ascending"), ("created_at", "descending")])
    first = pc.not_equal(order["cell_id"][1:], order["cell_id"][:-1])
    keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()])
    return order.filter(keep)


def load(store: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The public reader: one row per cell as a pandas DataFrame."""
    return read_table(store, columns).to_pandas(maps_as_pydicts="strict")


def _result_files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(f"{root}/results", recursive=True, allow_not_found=True)
    return [
        i
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith(".")
    ]


def ok_cell_ids(store: str) -> set[str]:
    """Cells stored with status ok, from the file names (plus compacted parts), without a scan."""
    fs, root = open_store(store)
    files = _result_files(fs, root)
    parts = [f.path for f in files if f.base_name.startswith(PART_PREFIX)]
    cells = [f.base_name for f in files if not f.base_name.startswith(PART_PREFIX)]
    ok = {n.removesuffix(".parquet") for n in cells if not n.endswith(FAILED_SUFFIX)}
    failed = {n.removesuffix(FAILED_SUFFIX) for n in cells if n.endswith(FAILED_SUFFIX)}
    if parts:
        table = ds.dataset(parts, schema=SCHEMA, format="parquet", filesystem=fs).to_table(
            columns=["cell_id", "status"]
        )
        ok |= set(table.filter(pc.equal(table["status"], "ok"))["cell_id"].to_pylist())
    return ok - failed  # both files left by a crash mid-rewrite: run the cell again


def compact(store: str) -> int:
    """Merge each partition's files into one; returns the number of files merged away."""
    fs, root = open_store(store)
    merged = 0
    parts: dict[str, list[str]] = {}
    for info in _result_files(fs, root):
        parts.setdefault(info.path.rsplit("/", 1)[0], []).append(info.path)
    for folder, files in parts.items():
        if len(files) < 2:
            continue
        table = _newest_per_cell(
            ds.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs).to_table()
        )
        atomic_write(fs, f"{folder}/{PART_PREFIX}{uuid.uuid4().hex}.parquet", _parquet_bytes(table))
        for f in files:
            fs.delete_file(f)
        merged += len(files)
    return merged


def write_manifest(store: str, run_id: str, manifest: dict[str, Any]) -> None:
    fs, root = open_store(store)
    atomic_write(
        fs, f"{root}/runs/{run_id}.json", json.dumps(manifest, indent=2, default=str).encode()
    )
