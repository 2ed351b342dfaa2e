"""The Parquet results store: one file per cell, written atomically; one reader for all.

    <store>/results/method=<m>/attack=<a>/<cell_id>.parquet

`compact` merges a partition's per-cell files into one file for fast scans of large stores;
readers keep the newest row per cell_id, so compacted and fresh files can coexist.
"""

from __future__ import annotations

import io
import uuid
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.artifacts import atomic_write, exists, open_store
from results.schema import COLUMNS, SCHEMA, SCHEMA_VERSION


def _partition(fs_root: str, method: str, attack: str) -> str:
    return f"{fs_root}/results/method={method}/attack={attack}"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    now = datetime.now(timezone.utc)
    full = [{"schema_version": SCHEMA_VERSION, "created_at": now, **{c: r.get(c) for c in COLUMNS if c in r}} for r in rows]
    return pa.Table.from_pylist(full, schema=SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_row(store: str, row: dict[str, Any]) -> str:
    """Write one cell's row atomically; returns its path."""
    fs, root = open_store(store)
    path = f"{_partition(root, row['method'], row['attack'])}/{row['cell_id']}.parquet"
    atomic_write(fs, path, _parquet_bytes(rows_to_table([row])))
    return path


def read_table(store: str, columns: list[str] | None = None) -> pa.Table:
    """All rows under the fixed schema (newest per cell_id), or an empty table."""
    fs, root = open_store(store)
    base = f"{root}/results"
    if not exists(fs, base):
        return SCHEMA.empty_table().select(columns or COLUMNS)
    want = list(dict.fromkeys([*(columns or COLUMNS), "cell_id", "created_at"]))
    dataset = ds.dataset(base, schema=SCHEMA, format="parquet", filesystem=fs,
                         exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    table = dataset.to_table(columns=want)
    table = _newest_per_cell(table)
    return table.select(columns or COLUMNS)


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


def ok_cell_ids(store: str) -> set[str]:
    table = read_table(store, ["cell_id", "status"])
    return set(table.filter(pc.equal(table["status"], "ok"))["cell_id"].to_pylist())


def compact(store: str) -> int:
    """Merge each partition's files into one; returns the number of files merged away."""
    fs, root = open_store(store)
    merged = 0
    selector = pafs.FileSelector(f"{root}/results", recursive=True, allow_not_found=True)
    parts: dict[str, list[str]] = {}
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
            parts.setdefault(info.path.rsplit("/", 1)[0], []).append(info.path)
    for folder, files in parts.items():
        if len(files) < 2:
            continue
        table = _newest_per_cell(ds.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs).to_table())
        atomic_write(fs, f"{folder}/part-{uuid.uuid4().hex}.parquet", _parquet_bytes(table))
        for f in files:
            fs.delete_file(f)
        merged += len(files)
    return merged


def write_manifest(store: str, run_id: str, manifest: dict[str, Any]) -> None:
    import json

    fs, root = open_store(store)
    atomic_write(fs, f"{root}/runs/{run_id}.json", json.dumps(manifest, indent=2, default=str).encode())
