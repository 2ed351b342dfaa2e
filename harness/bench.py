"""`harness bench`: speed figures, printed and never asserted.

- scheduler (also prints the store figures): per-cell driver + Ray cost of the harness on
  no-op stages vs the same 4-task chains submitted as bare Ray tasks, and the driver's RSS
  (peak, and its growth from 1/10 of the cells to the end: flat when refs are released);
- store: Parquet rows written / read per second, per-cell files and compacted;
- train: images/s of the harness training loop vs a plain PyTorch loop on the same model.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from harness.cells import Cell
from harness.config import Resources
from harness.executors import NOOP


def _noop_cells(n: int) -> list[Cell]:
    return [
        Cell("bench", {"name": "synthetic"}, {}, "lenet", "none", {}, "identity", {}, seed)
        for seed in range(n)
    ]


def _rss_mb() -> float:
    """This process's resident memory now, MB (Linux; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource  # lazy: not on every platform

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here


def _growth(first: float, last: float, cells: int) -> str:
    """RSS growth from 1/10 of the cells to the end, and whether that is flat (under 16 MB,
    or under half a KB per cell)."""
    grown = last - first
    flat = grown < 16 or grown * 1024 / max(cells, 1) < 0.5
    return f"{grown:+7.1f} MB from 1/10 to the end ({'flat' if flat else 'GROWING'})"


def bench_scheduler(n_cells: int) -> None:
    """The harness first (so that its driver RSS figures are its own), then bare Ray; at up to
    10,000 cells three alternating rounds of each (a busy machine slows both alike), medians."""
    import ray  # lazy: start-up time

    from harness import scheduler  # lazy: start-up time

    scheduler.connect(None)

    @ray.remote
    def noop(*upstream):
        return {"key": "x"}

    ray.get([noop.remote() for _ in range(200)])  # warm the worker pool
    warm = _noop_cells(200)  # the harness's workers import torch once: keep that out of the figure
    scheduler.run_cells(warm, "unused", resources=Resources(), executor=NOOP, resume=False)
    tenth = max(1, n_cells // 10)
    rounds = 3 if n_cells <= 10_000 else 1
    harness_ms, bare_ms, rss, bare_rss = [], [], {}, {}
    for r in range(rounds):
        cells = _noop_cells(n_cells)
        first = r == 0
        if first:
            rss["start"] = _rss_mb()

        def progress(summary, running: int, first=first) -> None:
            if first and "tenth" not in rss and summary.ok + summary.failed >= tenth:
                rss["tenth"] = _rss_mb()

        start = time.perf_counter()
        summary = scheduler.run_cells(
            cells, "unused", resources=Resources(), executor=NOOP, resume=False,
            progress=progress,
        )  # fmt: skip
        harness_ms.append((time.perf_counter() - start) / n_cells * 1e3)
        if first:
            rss["end"], rss["peak"] = _rss_mb(), _peak_rss_mb()
        del cells

        start = time.perf_counter()
        finals = []
        for i in range(n_cells):
            v = noop.remote()
            e = noop.remote(v)
            a = noop.remote(e)
            finals.append(noop.remote(v, e, a))
            if first and i + 1 == tenth:
                bare_rss["tenth"] = _rss_mb()
        ray.get(finals)
        bare_ms.append((time.perf_counter() - start) / n_cells * 1e3)
        if first:
            bare_rss["end"] = _rss_mb()
        del finals

    h, b = statistics.median(harness_ms), statistics.median(bare_ms)
    cpus = int(ray.cluster_resources()["CPU"])
    rest = n_cells - tenth
    shown = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"scheduler: {n_cells} no-op cells x 4 stage tasks, {cpus} CPUs, {rounds} round(s)")
    print(f"  bare Ray chains   {b:8.2f} ms/cell (all submitted at once; rounds {shown(bare_ms)})")
    print(
        f"  harness run_cells {h:8.2f} ms/cell  ({h / b:.2f}x bare Ray; rounds "
        f"{shown(harness_ms)}; {summary.ok} ok)"
    )
    print(
        f"  driver RSS, harness: {rss['start']:.0f} MB before the run, {rss['end']:.0f} MB "
        f"after, peak {rss['peak']:.0f} MB; "
        f"{_growth(rss.get('tenth', rss['start']), rss['end'], rest)}"
    )
    print(f"  driver RSS, bare Ray: {_growth(bare_rss['tenth'], bare_rss['end'], rest)}")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_store(n_rows: int, n_files: int = 2000) -> None:
    import pyarrow.parquet as pq  # lazy: start-up time

    from results.store import compact, read_table, rows_to_table, write_row  # lazy: start-up

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
    """The reference: a tuned plain PyTorch loop on the same model and data, images/s. On CUDA
    it uses what the harness uses (bf16 autocast, channels_last, data resident on the device)
    and synchronises before the clock stops."""
    import torch  # lazy: start-up time
    import torch.nn.functional as F  # lazy: start-up time

    cuda = device == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x, y = x.to(device), y.to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for i in range(len(y) // batch):
        xb = x[i * batch : (i + 1) * batch].to(device).float() / 255
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(xb).float(), y[i * batch : (i + 1) * batch].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    return len(y) // batch * batch / (time.perf_counter() - start)


def _harness_loop(spec, x, y, batch: int, device: str) -> float:
    import torch  # lazy: start-up time

    from harness.config import TrainCfg  # lazy: start-up time
    from harness.training import fit, prepare  # lazy: start-up time
    from model_zoo import create_model  # lazy: start-up time

    if device == "cuda":  # resident data, as the plain loop has it
        x, y = x.to(device), y.to(device)
    cfg = TrainCfg(epochs=1, batch_size=batch)
    start = time.perf_counter()
    fit(prepare(create_model(spec), device), x, y, cfg, device, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(y) / (time.perf_counter() - start)


def bench_train(arch: str = "resnet10t", steps: int = 30, batch: int = 64, rounds: int = 3) -> None:
    """Both loops on fresh models, one warm-up each, then `rounds` rounds in alternating order
    (so a busy machine slows both alike); the medians are reported."""
    import torch  # lazy: start-up time

    from model_zoo import ModelSpec, create_model  # lazy: start-up time

    spec = ModelSpec(arch, 10, 3, 32)
    x = torch.randint(0, 256, (steps * batch, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (steps * batch,))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def plain() -> float:
        return _plain_loop(create_model(spec).to(device), x, y, batch, device)

    def harness() -> float:
        return _harness_loop(spec, x, y, batch, device)

    plain(), harness()  # warm-up: allocator, cuDNN autotuning, thread pools
    runs: dict[str, list[float]] = {"plain": [], "harness": []}
    for r in range(rounds):
        order = (("plain", plain), ("harness", harness))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            runs[name].append(fn())
    p, h = statistics.median(runs["plain"]), statistics.median(runs["harness"])
    threads = torch.get_num_threads()
    print(f"train: {arch} 32px batch {batch}, {steps} steps on {device}, {threads} threads; "
          f"medians of {rounds} alternating rounds")
    print(f"  plain PyTorch loop {p:8.0f} img/s")
    print(f"  harness fit        {h:8.0f} img/s ({h / p:.2f}x)")


def main(what: str, args) -> None:
    if what in ("scheduler", "all"):
        bench_scheduler(args.cells)
    if what in ("scheduler", "store", "all"):
        bench_store(args.rows)
    if what in ("train", "all"):
        bench_train(args.arch, args.steps, args.batch)
