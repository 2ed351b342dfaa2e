"""The four stages of a cell as plain functions (no Ray here; `scheduler` distributes them).

Each stage reads its inputs from, and writes its output to, the artifact store under its
content key, so a finished stage is never computed twice. A stage returns a small `meta`
dict that downstream stages receive; a deterministic failure is returned as a meta with
`failed: True` (never raised) so that every cell ends as a row, while `TransientError`
propagates for Ray to retry.
"""

from __future__ import annotations

import functools
import math
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from harness import __version__, data
from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.cells import Cell, Job, canonical
from harness.config import DatasetCfg, TrainCfg
from harness.context import Context
from harness.data import load_splits
from harness.errors import TransientError
from harness.methods import create_method
from harness.training import (
    TASK_METRIC,
    image_scores,
    seed_everything,
    task_score,
    train_task_model,
)
from model_zoo import ModelSpec

# WRT: a removal counts only if the task score drops by less than this (accuracy: 5 points;
# PSNR: 2 dB, this harness's analogue for image-to-image models)
MAX_TASK_DROP = {"accuracy": 0.05, "psnr": 2.0}


def _failed(metas: tuple[dict, ...]) -> dict | None:
    return next((m for m in metas if m.get("failed")), None)


def stage(name: str) -> Callable:
    """Cache lookup, upstream-failure short-circuit, timing, and failure capture."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cell: dict, key: str, store: str, device: str, *upstream: dict) -> dict:
            if (bad := _failed(upstream)) is not None:
                return bad
            artifacts = ArtifactStore(store)
            if artifacts.has(name, key):
                return {**artifacts.load_meta(name, key), "cached": True}
            start = time.perf_counter()
            try:
                meta = fn(Cell.from_dict(cell), key, artifacts, device, *upstream)
            except TransientError:
                raise
            except Exception as e:  # noqa: BLE001 - deterministic failures become rows
                return {
                    "failed": True,
                    "error": f"{name}: {type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=8),
                }
            return {**meta, "cached": False, "seconds": time.perf_counter() - start}

        run.stage_name = name
        return run

    return decorate


def _context(cell: Cell, device: str, spec: ModelSpec | None = None, **extra: Any) -> Context:
    dataset = DatasetCfg(**cell.dataset)
    data = load_splits(dataset)
    spec = spec or ModelSpec(cell.arch, data.num_classes, data.channels, data.image_size)
    return Context(
        data=data, train=TrainCfg(**cell.train), spec=spec, device=device, seed=cell.seed, **extra
    )


@stage("train_victim")
def train_victim(cell: Cell, key: str, artifacts: ArtifactStore, device: str) -> dict:
    ctx = _context(cell, device)
    seed_everything(cell.seed)
    model = ctx.create_model()
    stats = train_task_model(model, ctx.data.owner, ctx.train, device, cell.seed)
    meta = {
        "spec": ctx.spec.to_dict(),
        "task_score": task_score(model, ctx.data.test, device),
        "train": stats,
    }
    return artifacts.save("train_victim", key, meta, model=model)


@stage("embed")
def embed(
    cell: Cell, key: str, artifacts: ArtifactStore, device: str, victim: dict, *deps: dict
) -> dict:
    ctx = _context(cell, device, artifacts=artifacts)
    model, _ = artifacts.load_model(victim, device)
    method = create_method(cell.method, cell.method_params)
    seed_everything(cell.seed)
    out = method.embed(model, ctx, list(deps), artifacts)
    marked, secret = out[:2]
    spec = out[2] if len(out) > 2 else ModelSpec(**victim["spec"])  # a method may add structure
    score = method.verify(marked, secret, ctx)
    meta = {
        "spec": spec.to_dict(),
        "task_score": task_score(marked, ctx.data.test, device),
        "wm": asdict(score),
        # a method's own stages computed for this embedding (ISN, stage-1 training, keys)
        "aux_seconds": {
            d["stage"]: d["seconds"]
            for d in deps
            if d.get("stage", "").startswith("aux/") and "seconds" in d
        },
    }
    if marked is model and not _changed(victim, marked, artifacts):
        return artifacts.save(
            "embed", key, meta, model_ref=tuple(victim["model_ref"]), secret=secret
        )
    return artifacts.save("embed", key, meta, model=marked, secret=secret)


def _aux(cell: Cell, key: str, artifacts: ArtifactStore, device: str, *deps: dict, step: str):
    ctx = _context(cell, device, artifacts=artifacts)
    seed_everything(cell.seed)
    method = create_method(cell.method, cell.method_params)
    return method.run_aux(step, cell, ctx, artifacts, key, list(deps))


def _changed(meta: dict, model, artifacts: ArtifactStore) -> bool:
    """Whether `model` differs from the weights `meta` points to (methods may edit in place)."""
    stored, _ = artifacts.load_model(meta)
    ref, new = stored.state_dict(), model.state_dict()
    if ref.keys() != new.keys():  # structure added (passport layers, a residual TLP)
        return True
    return any(not ref[k].equal(new[k].detach().cpu()) for k in ref)


@stage("attack")
def attack(cell: Cell, key: str, artifacts: ArtifactStore, device: str, marked: dict) -> dict:
    model, spec = artifacts.load_model(marked, device)
    ctx = _context(cell, device, spec, artifacts=artifacts, marked=marked)
    seed_everything(cell.seed)
    out = create_attack(cell.attack, cell.attack_params).apply(model, ctx)
    attacked, out_spec = out[:2]
    evidence = out[2] if len(out) > 2 else None  # forged passports, keys: artifacts only
    meta = {"spec": out_spec.to_dict(), "evidence": evidence is not None}
    if attacked is model and not _changed(marked, attacked, artifacts):
        ref = tuple(marked["model_ref"])
        return artifacts.save("attack", key, meta, model_ref=ref, secret=evidence)
    return artifacts.save("attack", key, meta, model=attacked, secret=evidence)


def verify(
    cell: dict, store: str, device: str, run: dict, victim: dict, marked: dict, attacked: dict
) -> dict:
    """The row of a cell (also for a failed one); written to the results store by the caller."""
    c = Cell.from_dict(cell)
    row = base_row(c, device, run)
    bad = _failed((victim, marked, attacked))
    start = time.perf_counter()
    try:
        if bad is None:
            row.update(_measure(c, store, device, victim, marked, attacked))
    except TransientError:
        raise
    except Exception as e:  # noqa: BLE001
        bad = {"error": f"verify: {type(e).__name__}: {e}"}
    if bad is not None:
        row.update(status="failed", error=bad["error"])
    seconds = {
        m["stage"]: m["seconds"]
        for m in (victim, marked, attacked)
        if "stage" in m and "seconds" in m
    }
    if "embed" in seconds:  # the aux stages it waited for, when this run computed them
        seconds.update(marked.get("aux_seconds", {}))
    seconds["verify"] = time.perf_counter() - start
    row.update(stage_seconds=seconds, duration_s=sum(seconds.values()))
    if c.trial is not None:  # a `harness tune` trial's cells carry its number
        row["metrics"] = {**(row.get("metrics") or {}), "trial": float(c.trial)}
    return row


def base_row(c: Cell, device: str, run: dict) -> dict[str, Any]:
    return {
        "cell_id": c.cell_id,
        "run_id": run.get("run_id"),
        "scenario": c.scenario,
        "dataset": c.dataset["name"],
        "arch": c.arch,
        "method": c.method,
        "method_params": canonical(c.method_params),
        "attack": c.attack,
        "attack_params": canonical(c.attack_params),
        "attack_role": c.attack_role,
        "seed": c.seed,
        "status": "ok",
        "node": socket.gethostname(),
        "device": device,
        "harness_version": __version__,
        "git_sha": run.get("git_sha"),
        "task_metric": TASK_METRIC[data.task_of(c.dataset["name"])],
        "wm_detected": False,
    }


def _measure(c: Cell, store: str, device: str, victim: dict, marked: dict, attacked: dict) -> dict:
    artifacts = ArtifactStore(store)
    model, spec = artifacts.load_model(attacked, device)
    has_evidence = attacked.get("evidence")
    evidence = artifacts.load_secret("attack", attacked["key"]) if has_evidence else None
    ctx = _context(c, device, spec, artifacts=artifacts, marked=marked, evidence=evidence)
    method = create_method(c.method, c.method_params)
    secret = artifacts.load_secret("embed", marked["key"]) if method.wm_metric else {}
    score = method.verify(model, secret, ctx)
    ctx_metric = TASK_METRIC[ctx.task]
    image = image_scores(model, ctx.data.test, device) if ctx.task == "image2image" else {}
    out = {
        "task_score_clean": victim["task_score"],
        "task_score_marked": marked["task_score"],
        "task_score_attacked": image["psnr"] if image else task_score(model, ctx.data.test, device),
        "wm_metric": method.wm_metric,
        "wm_score_marked": marked["wm"]["score"],
        "wm_score_attacked": score.score,
        "wm_threshold": score.threshold,
        "wm_detected": bool(score.detected),
    }
    metrics = dict(score.metrics)  # of the attacked model; `_marked`: of the model before it
    metrics.update({f"{k}_marked": v for k, v in marked["wm"]["metrics"].items()})
    if "ssim" in image:
        metrics["task_ssim_attacked"] = image["ssim"]
    if method.wm_metric:
        drop = out["task_score_marked"] - out["task_score_attacked"]
        removed = (
            marked["wm"]["detected"] and not score.detected and drop < MAX_TASK_DROP[ctx_metric]
        )
        metrics.update(
            wm_detected_marked=float(marked["wm"]["detected"]), wm_removed=float(removed)
        )
    out["metrics"] = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    return out


STAGES: dict[str, Callable] = {"train_victim": train_victim, "embed": embed, "attack": attack}


def get_stage(name: str) -> Callable:
    """A stage function by name; `aux/<step>` names a method's own stage (made on first use)."""
    if name not in STAGES and name.startswith("aux/"):
        step = name.removeprefix("aux/")
        STAGES[name] = stage(name)(functools.partial(_aux, step=step))
    return STAGES[name]


def run_job(job: Job, store: str, device: str, done: dict[str, dict] | None = None) -> dict:
    """A job and, first, its upstream jobs, in this process (memoised by key)."""
    done = {} if done is None else done
    if job.key not in done:
        upstream = [run_job(dep, store, device, done) for dep in job.deps]
        done[job.key] = get_stage(job.stage)(job.cell.to_dict(), job.key, store, device, *upstream)
    return done[job.key]


def run_cell(cell: Cell, store: str, device: str = "cpu", run: dict | None = None) -> dict:
    """All stages of one cell in this process (tests, debugging); writes and returns its row."""
    from results.store import write_row

    done: dict[str, dict] = {}
    attack_job = cell.attack_job()
    embed_job = attack_job.deps[0]
    attacked = run_job(attack_job, store, device, done)
    victim, marked = done[cell.victim_key()], done[embed_job.key]
    row = verify(cell.to_dict(), store, device, run or {}, victim, marked, attacked)
    write_row(store, row)
    return row
