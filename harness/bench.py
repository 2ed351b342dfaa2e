"""`harness bench`: speed figures, printed and never asserted.

- scheduler (also prints the store figures): per-cell driver + Ray cost of the harness on
  no-op stages vs the same 4-task chains submitted as bare Ray tasks;
- store: Parquet rows written / read per second, per-cell files and compacted;
- train: images/s of the harness training loop vs a plain PyTorch loop on the same model.
"""

from __future__ import annotations

import tempfile
import time

from harness.cells import Cell
from harness.config import Resources


def _noop_cells(n: int) -> list[Cell]:
    return [
        Cell("bench", {"name": "synthetic"}, {}, "lenet", "none", {}, "identity", {}, seed)
        for seed in range(n)
    ]


def bench_scheduler(n_cells: int) -> None:
    import ray

    from harness import scheduler

    scheduler.connect(None)

    @ray.remote
    def noop(*upstream):
        return {"key": "x"}

    ray.get([noop.remote() for _ in range(200)])  # warm the worker pool
    start = time.perf_counter()
    finals = []
    for _ in range(n_cells):
        v = noop.remote()
        e = noop.remote(v)
        a = noop.remote(e)
        finals.append(noop.remote(v, e, a))
    ray.get(finals)
    bare = (time.perf_counter() - start) / n_cells
    cells = _noop_cells(n_cells)
    warm = _noop_cells(200)  # the harness's workers import torch once: keep that out of the figure
    scheduler.run_cells(warm, "unused", resources=Resources(), executor="noop", resume=False)
    start = time.perf_counter()
    summary = scheduler.run_cells(
        cells, "unused", resources=Resources(), executor="noop", resume=False
    )
    harness = (time.perf_counter() - start) / n_cells
    cpus = int(ray.cluster_resources()["CPU"])
    print(f"scheduler: {n_cells} no-op cells x 4 stage tasks, {cpus} CPUs")
    print(f"  bare Ray chains   {bare * 1e3:8.2f} ms/cell")
    print(
        f"  harness run_cells {harness * 1e3:8.2f} ms/cell  ({harness / bare:.2f}x bare Ray; "
        f"{summary.ok} ok)"
    )


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_store(n_rows: int, n_files: int = 2000) -> None:
    import pyarrow.parquet as pq

    from results.store import compact, read_table, rows_to_table, write_row

    rows = [
        {
            "cell_id": f"{i:08d}",
            "method": f"m{i % 4}",
            "attack": f"a{i % 8}",
            "status": "ok",
            "task_score_attacked": 0.5,
            "metrics": {"x": 1.0},
            "seed": i,
        }
        for i in range(n_rows)
    ]
    with tempfile.TemporaryDirectory() as store:
        _, write_s = _timed(lambda: [write_row(store, row) for row in rows[:n_files]])
        got, read_files_s = _timed(lambda: read_table(store).num_rows)
        print(
            f"store: write {n_files / write_s:,.0f} rows/s (one atomic file per cell); "
            f"read {got / read_files_s:,.0f} rows/s from {got} per-cell files"
        )
        compact(store)
        for part in range(32):  # fill partitions as `compact` leaves them, to n_rows in all
            chunk = rows[n_files + part :: 32]
            path = f"{store}/results/method=m{part % 4}/attack=a{part % 8}/part-bench{part}.parquet"
            pq.write_table(rows_to_table(chunk), path, compression="zstd")
        got, read_s = _timed(lambda: read_table(store).num_rows)
        print(
            f"store: read {got:,} rows from compacted partitions in {read_s:.3f} s "
            f"({got / read_s:,.0f} rows/s)"
        )


def _plain_loop(model, x, y, batch: int, device: str) -> float:
    """The reference: the textbook PyTorch loop on the same model and data; images/s."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for i in range(len(y) // batch):
        xb = x[i * batch : (i + 1) * batch].to(device).float() / 255
        loss = F.cross_entropy(model(xb), y[i * batch : (i + 1) * batch].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(y) // batch * batch / (time.perf_counter() - start)


def bench_train(steps: int = 30, batch: int = 64) -> None:
    """Both loops run twice on fresh models; the second (warm) run is reported."""
    import torch

    from harness.config import TrainCfg
    from harness.training import fit, prepare
    from model_zoo import ModelSpec, create_model

    spec = ModelSpec("resnet10t", 10, 3, 32)
    x = torch.randint(0, 256, (steps * batch, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (steps * batch,))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainCfg(epochs=1, batch_size=batch)
    for _ in range(2):
        plain = _plain_loop(create_model(spec).to(device), x, y, batch, device)
        ips = fit(prepare(create_model(spec), device), x, y, cfg, device, 0)["images_per_s"]
    threads = torch.get_num_threads()
    print(f"train: {spec.arch} {spec.img_size}px batch {batch} on {device}, {threads} threads")
    print(f"  plain PyTorch loop {plain:8.0f} img/s")
    print(f"  harness fit        {ips:8.0f} img/s ({ips / plain:.2f}x)")


def main(what: str, args) -> None:
    if what in ("scheduler", "all"):
        bench_scheduler(args.cells)
    if what in ("scheduler", "store", "all"):
        bench_store(args.rows)
    if what in ("train", "all"):
        bench_train()
