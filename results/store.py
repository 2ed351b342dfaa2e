"""The Parquet results store: one file per cell, written atomically; one reader for all.

    <store>/results/method=<m>/attack=<a>/<cell_id>.parquet          (status ok)
    <store>/results/method=<m>/attack=<a>/<cell_id>.failed.parquet   (status failed)

`compact` merges a partition's per-cell files into one file for fast scans of large stores;
readers keep the newest row per cell_id, so compacted and fresh files can coexist.

Files carry Parquet page checksums. A file that cannot be read back (truncated, altered) is
skipped by every reader with a `StoreWarning` naming it, and its cell counts as not done, so
the next `harness run` recomputes it and writes a good file in its place.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.fs import atomic_write, exists, open_store, read_bytes
from results.schema import COLUMNS, SCHEMA, SCHEMA_VERSION

FAILED_SUFFIX = ".failed.parquet"
PART_PREFIX = "part-"
MAGIC = b"PAR1"  # a Parquet file starts and ends with it: a truncated file lacks the end
FORMAT = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
)


class StoreWarning(UserWarning):
    """Unreadable files were skipped (their paths are in the message)."""


def _warn_skipped(bad: list[str]) -> None:
    shown = ", ".join(bad[:5]) + (f" … and {len(bad) - 5} more" if len(bad) > 5 else "")
    warnings.warn(
        f"skipped {len(bad)} unreadable result file(s) (their cells count as not done; "
        f"`harness check --repair` removes them): {shown}",
        StoreWarning,
        stacklevel=3,
    )


def _partition(fs_root: str, method: str, attack: str) -> str:
    return f"{fs_root}/results/method={method}/attack={attack}"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    now = datetime.now(timezone.utc)
    stamp = {"schema_version": SCHEMA_VERSION, "created_at": now}
    return pa.Table.from_pylist([{**stamp, **r} for r in rows], schema=SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
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
        try:
            fs.delete_file(stale)
        except FileNotFoundError:
            pass  # `compact` merged it away meanwhile
    return path


def ok_row_exists(store: str, method: str, attack: str, cell_id: str) -> bool:
    """Whether the cell's ok row file is there and whole (for claims: a truncated one is redone)."""
    fs, root = open_store(store)
    info = fs.get_file_info(f"{_partition(root, method, attack)}/{cell_id}.parquet")
    return info.type == pafs.FileType.File and _intact_end(fs, info)


def read_table(store: str, columns: list[str] | None = None) -> pa.Table:
    """All rows under the fixed schema (newest per cell_id), or an empty table. Unreadable
    files are skipped with a `StoreWarning` naming them."""
    fs, root = open_store(store)
    base = f"{root}/results"
    if not exists(fs, base):
        return SCHEMA.empty_table().select(columns or COLUMNS)
    want = list(dict.fromkeys([*(columns or COLUMNS), "cell_id", "created_at"]))
    files = [i.path for i in _result_files(fs, root)]  # listed once: writers may be busy
    dataset = ds.dataset(files, schema=SCHEMA, format=FORMAT, filesystem=fs)
    try:
        table = dataset.to_table(columns=want)
    except (OSError, pa.ArrowException):  # one bad file: read file by file, skip the bad
        table = _read_readable(fs, files, want)
    return _newest_per_cell(table).select(columns or COLUMNS)


def _read_readable(fs: pafs.FileSystem, files: list[str], columns: list[str]) -> pa.Table:
    tables, bad = [], []
    for path in files:
        try:
            tables.append(_read_file(fs, path, columns))
        except FileNotFoundError:
            continue  # replaced since the listing (a failed row rewritten ok, compacted)
        except (OSError, pa.ArrowException):
            bad.append(path)
    if bad:
        _warn_skipped(bad)
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns)


def _read_file(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """One result file, every page checksum verified."""
    return ds.dataset(path, schema=SCHEMA, format=FORMAT, filesystem=fs).to_table(columns=columns)


def unreadable_files(store: str) -> tuple[int, list[str]]:
    """(result files checked, those that cannot be read back in full), for `harness check`."""
    fs, root = open_store(store)
    files, bad = _result_files(fs, root), []
    for info in files:
        try:
            _read_file(fs, info.path)
        except (OSError, pa.ArrowException):
            bad.append(info.path)
    return len(files), bad


def stale_temp_files(store: str, older_than_s: float = 3600) -> list[str]:
    """Half-written temp files (`.NAME.HEX.tmp`, `.NAME.HEX.compacting`) that a killed
    process left and no live writer can still be using (older than `older_than_s`)."""
    fs, root = open_store(store)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    cutoff = (datetime.now(timezone.utc).timestamp() - older_than_s) * 1e9
    return [
        i.path
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and i.base_name.startswith(".")
        and i.base_name.endswith((".tmp", ".compacting"))
        and (i.mtime_ns or 0) < cutoff
    ]


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
    for attempt in range(10):  # a writer's temp file renamed away between readdir and stat
        try:
            infos = fs.get_file_info(selector)
            break
        except FileNotFoundError:
            if attempt == 9:
                raise
            time.sleep(0.01)
    return [
        i
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith(".")
    ]


def _intact_end(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """Whether a local file ends with Parquet's magic bytes (a truncated one does not); object
    stores write whole objects, so only the size is checked there."""
    if info.size is None or info.size < 2 * len(MAGIC) + 4:
        return False
    if not isinstance(fs, pafs.LocalFileSystem):
        return True
    try:
        with open(info.path, "rb") as f:
            f.seek(-len(MAGIC), os.SEEK_END)
            return f.read() == MAGIC
    except OSError:
        return False


def ok_cell_ids(store: str) -> set[str]:
    """Cells stored with status ok, from the file names (plus compacted parts), without a scan.
    A truncated file does not count: its cell runs again."""
    fs, root = open_store(store)
    files = _result_files(fs, root)
    parts = [f.path for f in files if f.base_name.startswith(PART_PREFIX)]
    cells = [f for f in files if not f.base_name.startswith(PART_PREFIX)]
    bad = [f.path for f in cells if not _intact_end(fs, f)]
    names = [f.base_name for f in cells if f.path not in set(bad)]
    ok = {n.removesuffix(".parquet") for n in names if not n.endswith(FAILED_SUFFIX)}
    failed = {n.removesuffix(FAILED_SUFFIX) for n in names if n.endswith(FAILED_SUFFIX)}
    if parts:
        try:
            table = ds.dataset(parts, schema=SCHEMA, format="parquet", filesystem=fs).to_table(
                columns=["cell_id", "status"]
            )
        except (OSError, pa.ArrowException):
            table = _read_readable(fs, parts, ["cell_id", "status"])
        ok |= set(table.filter(pc.equal(table["status"], "ok"))["cell_id"].to_pylist())
    if bad:
        _warn_skipped(bad)
    return ok - failed  # both files left by a crash mid-rewrite: run the cell again


def compact(store: str) -> int:
    """Merge each partition's files into one; returns the number of files merged away.

    Safe while a driver writes: the merged file is written first, then each source file is
    removed only if it is still the file that was read (a row rewritten meanwhile stays, and
    readers keep the newest row per cell). Unreadable files are left for `harness check`."""
    fs, root = open_store(store)
    merged = 0
    parts: dict[str, list[pafs.FileInfo]] = {}
    for info in _result_files(fs, root):
        parts.setdefault(info.path.rsplit("/", 1)[0], []).append(info)
    local = isinstance(fs, pafs.LocalFileSystem)
    for folder, infos in parts.items():
        if len(infos) < 2:
            continue
        seen = {i.path: _identity(i, local) for i in infos}
        tables, read = [], []
        for info in infos:
            if seen[info.path] is None:
                continue  # removed since the listing (the driver replaced a failed row)
            try:
                tables.append(_read_file(fs, info.path))
                read.append(info.path)
            except (OSError, pa.ArrowException):
                continue
        if len(read) < 2:
            continue
        table = _newest_per_cell(pa.concat_tables(tables))
        atomic_write(fs, f"{folder}/{PART_PREFIX}{uuid.uuid4().hex}.parquet", _parquet_bytes(table))
        for path in read:
            merged += _remove_if_unchanged(fs, path, seen[path], local)
    return merged


def _identity(info: pafs.FileInfo, local: bool) -> tuple | None:
    if local:
        try:
            st = os.stat(info.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size
    return info.mtime_ns, info.size


def _remove_if_unchanged(fs: pafs.FileSystem, path: str, seen: tuple, local: bool) -> int:
    """Remove `path` if it is still the file `seen` describes; 1 if removed. Locally the file
    is first renamed aside (atomic), so a row a driver writes at `path` meanwhile survives."""
    if not local:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File and (info.mtime_ns, info.size) == seen:
            fs.delete_file(path)
            return 1
        return 0
    folder, name = path.rsplit("/", 1)
    aside = f"{folder}/.{name}.{uuid.uuid4().hex}.compacting"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return 0  # already replaced by the driver's other-status file and removed
    st = os.stat(aside)
    if (st.st_ino, st.st_mtime_ns, st.st_size) != seen:  # written after we read it: keep it
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # an even newer file is there already
        os.unlink(aside)
        return 0
    os.unlink(aside)
    return 1


def write_manifest(store: str, run_id: str, manifest: dict[str, Any]) -> None:
    fs, root = open_store(store)
    atomic_write(
        fs, f"{root}/runs/{run_id}.json", json.dumps(manifest, indent=2, default=str).encode()
    )


# ------------------------------------------------------------------ plug-in sections
# The report reads the store alone (no torch, no plug-in imports): the driver stores what it
# needs of the plug-ins - their declarations and their own summary tables per scenario.


def _sections_dir(root: str, scenario: str) -> str:
    return f"{root}/report/sections/{scenario}"


def write_sections(
    store: str, scenario: str, plugins: dict[str, dict], tables: dict[str, pd.DataFrame], rows: int
) -> None:
    """Store every plug-in's `describe()` (`plugins`, keyed "<kind>-<name>") and the
    scenario's plug-in summary tables, each stamped with the number of rows it was built from
    (the report says when the store has more rows than a table saw)."""
    fs, root = open_store(store)
    atomic_write(fs, f"{root}/report/plugins.json", json.dumps(plugins, indent=1).encode())
    folder = _sections_dir(root, scenario)
    for key, table in tables.items():
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                               b"wmbench_rows": str(rows).encode()})
        buf = io.BytesIO()
        pq.write_table(arrow, buf)
        atomic_write(fs, f"{folder}/{key}.parquet", buf.getvalue())


def read_sections(store: str, scenario: str) -> tuple[dict[str, dict], dict[str, tuple]]:
    """The stored plug-in declarations and, per "<kind>-<name>", (table, rows it saw) for
    `scenario`; empty where nothing was stored (a store written before sections were)."""
    fs, root = open_store(store)
    meta_path = f"{root}/report/plugins.json"
    plugins = json.loads(read_bytes(fs, meta_path)) if exists(fs, meta_path) else {}
    folder = _sections_dir(root, scenario)
    tables: dict[str, tuple] = {}
    if exists(fs, folder):
        for info in fs.get_file_info(pafs.FileSelector(folder)):
            if not info.path.endswith(".parquet"):
                continue
            try:
                arrow = pq.read_table(io.BytesIO(read_bytes(fs, info.path)))
            except (OSError, pa.ArrowException):
                warnings.warn(f"skipped unreadable section table {info.path}", StoreWarning,
                              stacklevel=2)
                continue
            rows = int((arrow.schema.metadata or {}).get(b"wmbench_rows", b"-1"))
            key = info.path.rsplit("/", 1)[-1].removesuffix(".parquet")
            tables[key] = (arrow.to_pandas(), rows)
    return plugins, tables
