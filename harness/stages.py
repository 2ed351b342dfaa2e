"""The stages of a cell as plain functions (no Ray here; `scheduler` distributes them).

Each stage reads its inputs from, and writes its output to, the artifact store under its
content key, so a finished stage is never computed twice. A stage returns a small `meta`
dict that downstream stages receive; a deterministic failure is returned as a meta with
`failed: True` and its traceback (never raised) so that every cell ends as a row, while
`TransientError` propagates for Ray to retry.

The engine's side of the plug-in hooks lives here: it loads what a plug-in declared it needs
(`ctx.inputs`), seeds, calls the hook, and saves the typed result (`Embedded`, `Attacked`,
`AuxOutput`); the plug-in never sees a key or a path.
"""

from __future__ import annotations

import functools
import math
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from harness import __version__, data
from harness.artifacts import Artifact, ArtifactStore
from harness.cells import Cell, Job, attack_of, canonical, method_of, plugin_of_stage
from harness.claims import claimed
from harness.config import DatasetCfg, TrainCfg
from harness.context import Context
from harness.data import load_splits
from harness.errors import TransientError
from harness.plugin import need_name
from harness.serving import API, deployed
from harness.training import (
    TASK_METRIC,
    image_scores,
    seed_everything,
    task_score,
    train_task_model,
)
from model_zoo import ModelSpec
from results.stats import budget
from results.store import write_row

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(message: str, limit: int = 500) -> str:
    """An error for the `error` column: its first line, without terminal colour codes (the
    whole story is in the `traceback` column)."""
    lines = ANSI.sub("", message).strip().splitlines() or [""]
    first = lines[0] + (" …" if len(lines) > 1 else "")
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _failed(metas: tuple[dict, ...]) -> dict | None:
    return next((m for m in metas if m.get("failed")), None)


def computed_upstream(upstream: tuple[dict, ...]) -> set[tuple[str, str]]:
    """The (stage, key) pairs this run computed for a chain (run statistics, never saved)."""
    return {tuple(pair) for meta in upstream for pair in meta.get("computed", ())}


def _cached(artifacts: ArtifactStore, name: str, key: str) -> dict | None:
    """A stored artifact whose files check out; a corrupt one is removed (then recomputed)."""
    if not artifacts.has(name, key):
        return None
    meta, problem = artifacts.check(name, key)
    if problem is None:
        return meta
    print(f"recomputing {name} {key}: {problem}", file=sys.stderr)
    artifacts.remove(name, key)
    return None


def stage(name: str) -> Callable:
    """Cache lookup, a claim so that no other driver computes the stage at the same time
    (`harness.claims`), upstream-failure short-circuit, timing, and failure capture."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cell: dict, key: str, store: str, device: str, *upstream: dict) -> dict:
            if (bad := _failed(upstream)) is not None:
                return bad
            artifacts = ArtifactStore(store)
            computed = sorted(computed_upstream(upstream))
            if (meta := _cached(artifacts, name, key)) is not None:
                return {**meta, "cached": True, "computed": computed}
            with claimed(store, name, key, lambda: artifacts.has(name, key)) as mine:
                if not mine and (meta := _cached(artifacts, name, key)) is not None:
                    return {**meta, "cached": True, "computed": computed}  # another driver's
                start = time.perf_counter()
                try:
                    meta = fn(Cell.from_dict(cell), key, artifacts, device, *upstream)
                except TransientError:
                    raise
                except Exception as e:  # noqa: BLE001 - deterministic failures become rows
                    return {
                        "failed": True,
                        "error": one_line(f"{name}: {type(e).__name__}: {e}"),
                        "traceback": traceback.format_exc(),
                    }
            seconds = time.perf_counter() - start
            computed = sorted({*map(tuple, computed), (name, key)})
            return {**meta, "cached": False, "seconds": seconds, "computed": computed}

        run.stage_name = name
        return run

    return decorate


def context(cell: Cell, device: str, spec: ModelSpec | None = None, **extra: Any) -> Context:
    """The context a plug-in hook of `cell` runs in (data splits are cached per process)."""
    dataset = DatasetCfg(**cell.dataset)
    splits = load_splits(dataset)
    spec = spec or ModelSpec(cell.arch, splits.num_classes, splits.channels, splits.image_size)
    extra.setdefault("seed", cell.seed)
    return Context(data=splits, train=TrainCfg(**cell.train), spec=spec, device=device, **extra)


def _inputs(artifacts: ArtifactStore, names, metas, device: str) -> dict[str, Artifact]:
    return {n: Artifact(artifacts, m, device) for n, m in zip(names, metas, strict=True)}


@stage("train_victim")
def train_victim(cell: Cell, key: str, artifacts: ArtifactStore, device: str) -> dict:
    ctx = context(cell, device)
    seed_everything(cell.seed)
    model = ctx.create_model()
    stats = train_task_model(model, ctx.data.owner, ctx.train, device, cell.seed)
    meta = {
        "spec": ctx.spec.to_dict(),
        "task_score": task_score(model, ctx.data.test, device),
        "train": stats,
    }
    return artifacts.save("train_victim", key, meta, model=model)


def _aux(cell: Cell, key: str, artifacts: ArtifactStore, device: str, *deps: dict, name: str):
    """A declared aux step: its needs loaded as `ctx.inputs`; a scenario-level step (no needs)
    runs with seed 0, so whichever cell computes it first gets the same result."""
    plugin, step = plugin_of_stage(cell, name)
    inputs = _inputs(artifacts, [need_name(n) for n in step.needs], deps, device)
    ctx = context(
        cell, device, inputs=inputs, seed=cell.seed if step.needs else 0,
        owner_seed=artifacts.owner_seed(name, key),
    )
    seed_everything(ctx.seed)
    out = step.run(ctx)
    meta = {**out.meta, "spec": out.spec.to_dict() if out.spec is not None else None}
    return artifacts.save(name, key, meta, model=out.model, secret=out.secret)


@stage("embed")
def embed(
    cell: Cell, key: str, artifacts: ArtifactStore, device: str, victim: dict, *deps: dict
) -> dict:
    method = method_of(cell)
    names = [need_name(n) for n in method.needs()]
    ctx = context(
        cell, device, inputs=_inputs(artifacts, names, deps, device),
        owner_seed=artifacts.owner_seed("embed", key),
    )
    model = Artifact(artifacts, victim, device).model()
    seed_everything(cell.seed)
    out = method.embed(model, ctx)
    spec = out.spec or ModelSpec(**victim["spec"])  # a method may add structure
    served = deployed(out.model, method, out.secret)  # as it answers (DAWN: with its filter)
    score = method.verify(served, out.secret, ctx)
    meta = {
        "spec": spec.to_dict(),
        "task_score": task_score(served, ctx.data.test, device),
        "wm": {"score": score.score, "detected": bool(score.detected),
               "threshold": score.threshold, "metrics": dict(score.metrics)},
        "inputs": {n: [d["stage"], d["key"]] for n, d in zip(names, deps, strict=True)},
        # the plug-in's aux steps computed for this embedding (ISN, stage-1 training, keys)
        "aux_seconds": {
            d["stage"]: d["seconds"]
            for d in deps
            if d.get("stage", "").startswith("aux/") and "seconds" in d
        },
    }  # fmt: skip
    return _save_model(
        artifacts, "embed", key, meta, out.model, model, victim, out.secret, out.copies
    )


def _save_model(
    artifacts, stage_name, key, meta, new, given, upstream: dict, secret, copies=None
) -> dict:
    """Save `new`, or only a reference to the upstream weights when it is unchanged."""
    if new is given and not _changed(upstream, new, artifacts):
        ref = tuple(upstream["model_ref"])
        return artifacts.save(stage_name, key, meta, model_ref=ref, secret=secret, copies=copies)
    return artifacts.save(stage_name, key, meta, model=new, secret=secret, copies=copies)


def _changed(meta: dict, model, artifacts: ArtifactStore) -> bool:
    """Whether `model` differs from the weights `meta` points to (plug-ins may edit in place)."""
    ref, new = artifacts.load_state(meta), model.state_dict()
    if ref.keys() != new.keys():  # structure added (a method's layers or wrapper)
        return True
    return any(not ref[k].equal(new[k].detach().cpu()) for k in ref)


def marked_artifact(artifacts: ArtifactStore, marked: dict, device: str) -> Artifact:
    """The embed artifact with the inputs its method was given (verify sees them again)."""
    return Artifact(artifacts, marked, device).with_inputs()


@stage("attack")
def attack(
    cell: Cell, key: str, artifacts: ArtifactStore, device: str, marked: dict, *deps: dict
) -> dict:
    plugin, method = attack_of(cell), method_of(cell)
    names = [s.name for s in plugin.aux_steps()]
    handle = marked_artifact(artifacts, marked, device)
    # a step of a chain (`Attack.steps`) starts from the previous step's model
    prev = deps[0] if deps and deps[0].get("stage") == "attack" else None
    if prev is not None:
        deps = deps[1:]
        source = Artifact(artifacts, prev, device)
        model, spec = source.model(), source.spec
    else:
        model, spec = handle.model(), handle.spec
    inputs = _inputs(artifacts, names, deps, device)
    # the deployment the attacker may query (`ctx.query`): the owner's marked model, also for
    # a later step of a chain (whose own model is the attacker's copy); the owner keeps its log
    served = handle.model() if prev is not None else model
    api = API(deployed(served, method, handle.secret() if method.serves else {}), device)
    ctx = context(cell, device, spec, inputs=inputs, marked=handle, api=api)
    seed_everything(cell.seed)
    out = plugin.apply(model, ctx)
    log, evidence = api.log(), out.evidence
    figures = api.figures() if api.queries else None
    metrics = {k: float(v) for k, v in out.metrics.items()}  # the attack's own figures
    prior_seconds = None
    if prev is not None:  # a chain's row carries what every step did and cost
        metrics = {**prev.get("metrics", {}), **metrics}
        figures = _add_figures(prev.get("api"), figures)
        prior_seconds = prev.get("seconds", 0.0) + (prev.get("prior_seconds") or 0.0)
        held_evidence, held_log = _attack_secrets(Artifact(artifacts, prev, device))
        log = log if log is not None else held_log
        evidence = evidence if evidence is not None else held_evidence
    meta = {
        "spec": (out.spec or spec).to_dict(),
        "evidence": evidence is not None,
        "metrics": metrics,
        "api": figures,
        "api_log": log is not None,
        "secret_layout": 2,  # {"evidence", "api_log"} (1: the evidence dict itself)
        "prior_seconds": prior_seconds,  # a chain: the seconds of the steps before this one
    }
    held = evidence is not None or log is not None
    secret = {"evidence": evidence, "api_log": log} if held else None
    upstream = prev if prev is not None else marked
    return _save_model(artifacts, "attack", key, meta, out.model, model, upstream, secret)


def _add_figures(a: dict | None, b: dict | None) -> dict | None:
    """Served-API counts of two chain steps together."""
    if a is None or b is None:
        return a or b
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


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
        error = one_line(f"verify: {type(e).__name__}: {e}")
        bad = {"error": error, "traceback": traceback.format_exc()}
    if bad is not None:
        row.update(status="failed", error=bad["error"], traceback=bad.get("traceback"))
    seconds = {
        m["stage"]: m["seconds"]
        for m in (victim, marked, attacked)
        if "stage" in m and "seconds" in m
    }
    if "embed" in seconds:  # the aux stages it waited for, when this run computed them
        seconds.update(marked.get("aux_seconds", {}))
    if "attack" in seconds and attacked.get("prior_seconds"):  # a chain's earlier steps
        seconds["attack_prior_steps"] = attacked["prior_seconds"]
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


def verify_context(c: Cell, store: str, device: str, marked: dict, attacked: dict | None = None):
    """The model under test, the method's secret and the context its `verify` runs in."""
    artifacts = ArtifactStore(store)
    method = method_of(c)
    handle = marked_artifact(artifacts, marked, device)
    suspect = Artifact(artifacts, attacked or marked, device)
    evidence, api_log = _attack_secrets(suspect) if attacked else (None, None)
    ctx = context(
        c, device, suspect.spec, inputs=handle.inputs, marked=handle, evidence=evidence,
        api_log=api_log,
    )  # fmt: skip
    secret = handle.secret() if method.wm_metric else {}
    model = suspect.model()
    if method.serves and suspect.meta.get("model_ref") == marked.get("model_ref"):
        model = deployed(model, method, secret)  # the deployment itself, as it answers
    return model, secret, ctx


def _attack_secrets(attacked: Artifact) -> tuple[dict | None, dict | None]:
    """(evidence, API log) an attack artifact holds (an older one holds evidence alone)."""
    meta = attacked.meta
    if not (meta.get("evidence") or meta.get("api_log")):
        return None, None
    held = attacked.secret()
    if meta.get("secret_layout", 1) == 1:
        return held, None
    return held["evidence"], held["api_log"]


def _measure(c: Cell, store: str, device: str, victim: dict, marked: dict, attacked: dict) -> dict:
    model, secret, ctx = verify_context(c, store, device, marked, attacked)
    method = method_of(c)
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
    metrics = dict(attacked.get("metrics") or {})  # the attack's own figures
    metrics.update(score.metrics)  # of the attacked model; `_marked`: of the model before it
    metrics.update({f"{k}_marked": v for k, v in marked["wm"]["metrics"].items()})
    if "ssim" in image:
        metrics["task_ssim_attacked"] = image["ssim"]
    if api := attacked.get("api"):  # an extraction attack's queries to the deployment
        metrics["api_queries"] = api["queries"]
        if method.serves:
            metrics["api_wm_share"] = api["watermarked"] / max(api["queries"], 1)
    if method.wm_metric:
        drop = out["task_score_marked"] - out["task_score_attacked"]
        removed = (
            # WRT: the task drops by less than 5 points (2 dB for image models): results.stats
            marked["wm"]["detected"] and not score.detected and drop < budget(ctx_metric)
        )
        metrics.update(
            wm_detected_marked=float(marked["wm"]["detected"]), wm_removed=float(removed)
        )
    out["metrics"] = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    return out


STAGES: dict[str, Callable] = {"train_victim": train_victim, "embed": embed, "attack": attack}


def get_stage(name: str) -> Callable:
    """A stage function by name; `aux/<plugin>/<step>` names a plug-in's own step."""
    if name not in STAGES and name.startswith("aux/"):
        STAGES[name] = stage(name)(functools.partial(_aux, name=name))
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
    done: dict[str, dict] = {}
    attack_job = cell.attack_job()
    embed_job = attack_job.deps[0]
    attacked = run_job(attack_job, store, device, done)
    victim, marked = done[cell.victim_key()], done[embed_job.key]
    row = verify(cell.to_dict(), store, device, run or {}, victim, marked, attacked)
    write_row(store, row)
    return row
