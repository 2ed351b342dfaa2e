"""Results: the versioned Arrow schema, the Parquet store, analysis helpers and reports."""

from results.store import load

__all__ = ["load"]
