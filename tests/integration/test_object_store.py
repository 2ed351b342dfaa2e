"""The object-store code paths (single-PUT writes, listing, reading) against a local S3
server (moto, on 127.0.0.1 only): a store URI of `s3://bucket/prefix?endpoint_override=...`
behaves like a local folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_report_of_an_s3_store(s3_store, tmp_path):
    """`harness report` reads rows, manifests and plug-in sections from the object store."""
    from harness.cli import main, store_sections

    cells = [tiny_cell("identity", {}), tiny_cell("prune", {"sparsity": 0.5})]
    for c in cells:
        run_cell(c, s3_store)
    write_manifest(s3_store, "run-report", {"started_at": "2026-11-29T00:00:00+00:00",
                                            "scenario": {"name": "s3", "reported": [
                                                {"metric": "wm_detected", "value": 1.0,
                                                 "op": ">=", "where": {"attack": "identity"}}]}})
    store_sections(s3_store)
    out = tmp_path / "report"
    assert main(["report", s3_store, "--scenario", "s3", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "Scenario s3" in page and "Reported beside measured" in page
    assert "data:image/png;base64," in page
    reported = (out / "tables" / "s3.reported.csv").read_text()
    assert "wm_detected" in reported


def test_tune_needs_an_explicit_storage_with_an_object_store(s3_store):
    from harness.tuning import default_storage

    with pytest.raises(ConfigError, match="--storage"):
        default_storage(s3_store)


class FlakyProxy:
    """An HTTP proxy in front of the moto server that answers S3's `503 SlowDown` to every
    request whose number falls in a failing window (bursts longer than the AWS SDK's own three
    attempts, so the harness's retries are exercised too); counts what it injected."""

    def __init__(self, target: tuple[str, int], every: int = 12, burst: int = 4) -> None:
        import http.client
        import http.server
        import threading

        self.injected = self.requests = 0
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)

            def _any(self) -> None:
                body = self._body()
                with lock:
                    proxy.requests += 1
                    fail = proxy.requests % every < burst and proxy.requests > every
                    proxy.injected += fail
                if fail:
                    error = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(*target, timeout=30)
                drop = ("connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                skip = ("transfer-encoding", "connection", "content-length")
                for k, v in reply.getheaders():
                    if k.lower() not in skip:
                        self.send_header(k, v)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # socketserver's 5 drops the SDK pools' connects
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # the client hung up on a 503: expected

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()


FLAKY_DRIVER = """
import json, os, sys
import boto3, moto.server
from test_object_store import FlakyProxy, tiny_cell
from harness import scheduler
from harness.config import Resources
from results import load

server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="wmbench")
proxy = FlakyProxy((host, port))
store = f"s3://wmbench/flaky?endpoint_override=127.0.0.1:{proxy.port}&scheme=http&region=us-east-1"
scheduler.connect(None, 2)
cells = [tiny_cell("identity", {}), tiny_cell("quantize", {"bits": 8})]
summary = scheduler.run_cells(cells, store, resources=Resources())
df = load(store)
print(json.dumps({"ok": summary.ok, "failed": summary.failed, "failures": summary.failures,
                  "injected": proxy.injected, "requests": proxy.requests,
                  "stored": sorted(df["cell_id"]), "status": sorted(set(df["status"])),
                  "expected": sorted(c.cell_id for c in cells)}))
"""


def test_transient_s3_errors_are_retried_with_backoff(tmp_path):
    """Bursts of 503 SlowDown (longer than the AWS SDK's own three attempts) on a third of
    the requests of workers and driver alike: every cell still ends ok, stored once. Its own
    process, whose Ray starts after the AWS variables are set (workers inherit them)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1", HOME=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FLAKY_DRIVER], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["injected"] >= 20, facts
    assert (facts["ok"], facts["failed"]) == (2, 0), facts["failures"]
    assert facts["stored"] == facts["expected"] and facts["status"] == ["ok"]
