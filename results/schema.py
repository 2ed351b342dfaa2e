"""The one versioned Arrow schema of a result row.

Bump SCHEMA_VERSION when a column is added; new columns must be nullable so that old files
still read under the new schema (readers always pass SCHEMA explicitly — pyarrow would
otherwise take the first file's schema and silently drop newer columns).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 3  # 2: attack_role; 3: traceback

_str, _f64 = pa.string(), pa.float64()
_map = pa.map_(pa.string(), pa.float64())

SCHEMA = pa.schema(
    [
        pa.field("cell_id", _str, nullable=False),
        pa.field("run_id", _str),
        pa.field("scenario", _str),
        pa.field("dataset", _str),
        pa.field("arch", _str),
        pa.field("method", _str),
        pa.field("method_params", _str),  # canonical JSON
        pa.field("attack", _str),
        pa.field("attack_params", _str),  # canonical JSON
        pa.field("attack_role", _str),  # "benign" | "malicious" | null (schema 2)
        pa.field("seed", pa.int64()),
        pa.field("status", _str),  # "ok" | "failed"
        pa.field("error", _str),
        pa.field("traceback", _str),  # a failed cell's Python traceback (schema 3)
        pa.field("task_metric", _str),
        pa.field("task_score_clean", _f64),
        pa.field("task_score_marked", _f64),
        pa.field("task_score_attacked", _f64),
        pa.field("wm_metric", _str),
        pa.field("wm_score_marked", _f64),
        pa.field("wm_score_attacked", _f64),
        pa.field("wm_threshold", _f64),
        pa.field("wm_detected", pa.bool_()),
        pa.field("metrics", _map),
        pa.field("duration_s", _f64),
        pa.field("stage_seconds", _map),
        pa.field("node", _str),
        pa.field("device", _str),
        pa.field("harness_version", _str),
        pa.field("git_sha", _str),
        pa.field("schema_version", pa.int32()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"wmbench_schema_version": str(SCHEMA_VERSION)},
)

COLUMNS = SCHEMA.names
