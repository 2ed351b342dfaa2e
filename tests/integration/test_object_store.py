"""The object-store code paths (single-PUT writes, listing, reading) against a local S3
server (moto, on 127.0.0.1 only): a store URI of `s3://bucket/prefix?endpoint_override=...`
behaves like a local folder."""

from __future__ import annotations

import pytest

from harness.cells import Cell
from harness.errors import ConfigError
from harness.stages import run_cell
from results import load
from results.store import ok_cell_ids, write_manifest

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory) -> str:
    mp = pytest.MonkeyPatch()
    for var, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        mp.setenv(var, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="wmbench")
    yield f"s3://wmbench/store?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    mp.undo()


def tiny_cell(attack: str, params: dict) -> Cell:
    dataset = {
        "name": "synthetic",
        "image_size": 16,
        "channels": 1,
        "samples": 200,
        "num_classes": 4,
    }
    from harness.config import DatasetCfg, TrainCfg

    return Cell(
        "s3",
        DatasetCfg(**dataset).model_dump(mode="json"),
        TrainCfg(epochs=2, batch_size=32).model_dump(mode="json"),
        "lenet",
        "trigger_set",
        {
            "n_keys": 10,
            "n_null": 2,
            "epochs": 4,
            "pattern": "abstract",
            "lr": None,
            "key_share": 0.1,
            "p_value": 0.05,
        },
        attack,
        params,
        0,
    )


def test_cells_artifacts_rows_and_manifests_on_s3(s3_store):
    cells = [
        tiny_cell("identity", {}),
        tiny_cell("quantize", {"bits": 4, "granularity": "per_channel"}),
    ]
    rows = [run_cell(c, s3_store) for c in cells]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    df = load(s3_store)
    assert sorted(df["cell_id"]) == sorted(c.cell_id for c in cells)
    assert ok_cell_ids(s3_store) == {c.cell_id for c in cells}
    write_manifest(s3_store, "run-1", {"cells": 2})
    again = run_cell(cells[0], s3_store)  # every stage now comes from the S3 artifact cache
    keep = ("task_score_attacked", "wm_score_attacked", "wm_detected")
    assert {k: again[k] for k in keep} == {k: rows[0][k] for k in keep}


def test_tune_needs_an_explicit_storage_with_an_object_store(s3_store):
    from harness.tuning import default_storage

    with pytest.raises(ConfigError, match="--storage"):
        default_storage(s3_store)
