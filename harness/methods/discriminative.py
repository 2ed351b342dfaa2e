"""Cross-model watermarking via discriminative samples (ACM MM 2025).

Non-intrusive: no weight changes. Keys are natural test images nudged towards the decision
boundary of a *source* model by clamped-margin sign descent; they then authenticate a *target*
model (the cell's arch, possibly another architecture): a benign modification keeps its
answers on the keys, a malicious one flips them.

Defaults reproduce the public code: margin on softmax probabilities, pool of 2,000 correctly
classified test images, up to 1,000 steps of x' <- x' - alpha * sign(grad max(m, tau)),
alpha 2e-4 (model-input units; our models take [0, 1] pixels), L-inf eps 0.2 and the pixel
box, stop once m < tau, accept iff the source still predicts t and tau' - delta < m < tau'
after the 8-bit round trip, N = 100 keys. The margin-enhancement terms (SSIM fidelity, benign
and malicious hinges on simulated copies of the source trained on the owner's data) are off
by default (w_f = w_b = w_g = 0); `harness tune` searches them.

Every cell also measures a natural-image control: the same figures on N natural test images
(correctly classified by the source, disjoint from the keys' originals) under the same
modification, since at small scale key accuracy tracks the target's accuracy on natural images.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.attacks import ATTACKS, create_attack
from harness.config import ComponentCfg
from harness.data import Split
from harness.image_metrics import ssim
from harness.methods.base import (
    AuxOutput,
    AuxStep,
    Bars,
    Embedded,
    Method,
    Metric,
    VictimRef,
    WatermarkScore,
    register,
)
from harness.training import as_float, predict_logits
from model_zoo import check_arch
from results.analysis import label, metric

DEFAULT_BENIGN_SIM = {"name": "quantize", "params": {"bits": 8, "granularity": "per_tensor"}}
DEFAULT_MALICIOUS_SIM = {"name": "fine_tune", "params": {"mode": "ftal", "label_noise": 0.5}}


class DiscriminativeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_arch: str | None = Field(
        None, description="keys are made on this arch (default: target)"
    )
    n_keys: int = Field(100, ge=1)
    pool_size: int = Field(2000, ge=1, description="correctly classified test images to draw from")
    steps: int = Field(1000, ge=1)
    alpha: float = Field(2e-4, gt=0, description="sign-step size in model-input units")
    eps: float = Field(0.2, gt=0, le=1, description="L-inf bound in pixel units [0, 1]")
    tau: float = Field(0.5, gt=-1, lt=1, description="margin clamp: descent stops below it")
    tau_accept: float = Field(0.5, gt=-1, le=1, description="tau': upper edge of the band")
    delta: float = Field(0.2, gt=0, le=2, description="band width: tau' - delta < m < tau'")
    w_m: float = Field(1.0, ge=0)
    w_f: float = Field(0.0, ge=0, description="weight of 1 - SSIM(x', x)")
    w_b: float = Field(0.0, ge=0, description="weight of the benign-copy hinge")
    w_g: float = Field(0.0, ge=0, description="weight of the malicious-copy hinge")
    kappa_b: float = Field(0.3, ge=-1, le=1)
    kappa_m: float = Field(-0.1, ge=-1, le=1)
    benign_sim: ComponentCfg = ComponentCfg(**DEFAULT_BENIGN_SIM)
    malicious_sim: ComponentCfg = ComponentCfg(**DEFAULT_MALICIOUS_SIM)
    theta: float = Field(0.5, ge=0, le=1, description="authentic iff key accuracy >= theta")
    n_control: int = Field(
        100, ge=1, description="natural test images in the control (drawn before the keys)"
    )
    batch_size: int = Field(128, ge=1)

    @field_validator("source_arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        if v is not None:
            check_arch(v)
        return v

    @field_validator("w_m", "w_f", "w_b", "w_g", "alpha", "eps", "tau", "tau_accept", "delta")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("benign_sim", "malicious_sim")
    @classmethod
    def _known_attack(cls, v: ComponentCfg) -> ComponentCfg:
        ATTACKS.get(v.name).Params(**v.params)
        return v

    @model_validator(mode="after")
    def _band(self) -> DiscriminativeParams:
        if self.tau_accept <= self.delta:
            raise ValueError(
                f"tau_accept ({self.tau_accept}) must be greater than delta ({self.delta}): "
                "the acceptance band tau' - delta < m < tau' would hold only negative margins"
            )
        return self


def margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """m(x, t) = p_t - max_{i != t} p_i on softmax probabilities."""
    p = F.softmax(logits.float(), dim=1)
    p_t = p.gather(1, target[:, None]).squeeze(1)
    others = p.scatter(1, target[:, None], float("-inf"))
    return p_t - others.max(1).values


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit round trip every stored key goes through."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L-inf ball of radius eps around x0 and the valid pixel box."""
    return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)


def in_band(m: torch.Tensor, tau_accept: float, delta: float) -> torch.Tensor:
    return (m > tau_accept - delta) & (m < tau_accept)


def key_loss(x, x0, t, source, benign, malicious, p: DiscriminativeParams):
    """Per-image margin-enhancement loss and the source margin it was computed at."""
    m_s = margin(source(x), t)
    loss = p.w_m * m_s.clamp(min=p.tau)
    if p.w_f:
        loss = loss + p.w_f * (1 - ssim(x, x0))
    if p.w_b and benign is not None:
        loss = loss + p.w_b * F.relu(p.kappa_b - margin(benign(x), t))
    if p.w_g and malicious is not None:
        loss = loss + p.w_g * F.relu(margin(malicious(x), t) - p.kappa_m)
    return loss, m_s


def descend(x0, t, source, benign, malicious, p: DiscriminativeParams) -> torch.Tensor:
    """Clamped-margin sign descent; an image stops moving once its source margin is < tau."""
    x, active = x0.clone(), torch.ones(len(x0), dtype=torch.bool, device=x0.device)
    for _ in range(p.steps):
        x.requires_grad_(True)
        loss, m_s = key_loss(x, x0, t, source, benign, malicious, p)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        active &= m_s.detach() >= p.tau
        if not active.any():
            break
        step = p.alpha * grad.sign() * active.view(-1, 1, 1, 1)
        x = project(x.detach() - step, x0, p.eps)
    return x.detach()


@torch.no_grad()
def accept(x, t, source, p: DiscriminativeParams) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit keys and the mask of those in the band that the source still labels t."""
    keys = quantize8(x)
    logits = source(keys)
    ok = (logits.argmax(1) == t) & in_band(margin(logits, t), p.tau_accept, p.delta)
    return keys, ok


def _frozen(model):
    if model is None:
        return None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def generate_keys(
    source, pool: Split, p: DiscriminativeParams, device, benign=None, malicious=None
) -> dict[str, Any]:
    """Scan the pool in batches until n_keys keys are accepted; returns keys and origins."""
    source, benign, malicious = (_frozen(m) for m in (source, benign, malicious))
    keys, labels, origins, used = [], [], [], 0
    for start in range(0, len(pool), p.batch_size):
        x0 = as_float(pool.x[start : start + p.batch_size], device)
        t = pool.y[start : start + p.batch_size].to(device)
        x = descend(x0, t, source, benign, malicious, p)
        k, ok = accept(x, t, source, p)
        keys.append(k[ok].cpu())
        labels.append(t[ok].cpu())
        origins.append(torch.arange(start, start + len(t))[ok.cpu()])
        used = start + len(t)
        if sum(len(o) for o in origins) >= p.n_keys:
            break
    keys_x, keys_t = torch.cat(keys)[: p.n_keys], torch.cat(labels)[: p.n_keys]
    origin = torch.cat(origins)[: p.n_keys]
    return {
        "x": (keys_x * 255).round().to(torch.uint8),
        "y": keys_t,
        "origin": origin,
        "scanned": used,
    }


def correct_pool(source, test: Split, size: int, seed: int, device) -> Split:
    """A seeded draw of test images the source classifies correctly (labels = true labels)."""
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    shuffled = Split(test.x[order], test.y[order])
    correct = predict_logits(source, shuffled.x, device).argmax(1) == shuffled.y
    return Split(shuffled.x[correct][:size], shuffled.y[correct][:size])


def score(model, x: torch.Tensor, y: torch.Tensor, device) -> tuple[float, float]:
    """Share of images labelled y, and the mean margin towards y."""
    if len(y) == 0:
        return float("nan"), float("nan")
    logits = predict_logits(model, x, device)
    return (logits.argmax(1) == y).float().mean().item(), margin(logits, y).mean().item()


@register("discriminative")
class Discriminative(Method):
    Params = DiscriminativeParams
    # 2: fixed control set drawn before the keys; scikit-image-matching SSIM. 3: pool drawn
    # from the owner secret
    version = "3"
    wm_metric = "key_acc"
    marks_weights = False
    metrics = (
        Metric("key_margin", "mean softmax margin towards the keys' labels", None),
        Metric("control_acc", "accuracy on the natural-image control under the same change"),
        Metric("control_margin", "mean margin on the control images", None),
        Metric("n_keys", "keys accepted (fewest over key sets)", agg="min"),
        Metric("n_control", "natural control images", None, agg="min"),
        Metric("ssim_min", "worst key SSIM against its original", agg="min"),
        Metric("ssim_mean", "mean key SSIM against its original"),
        Metric("disc", "key accuracy under benign minus under malicious changes", level="table"),
        Metric("disc_control", "the same for the natural-image control", level="table"),
        Metric("disc_rel", "disc - disc_control: separation beyond natural images",
               level="table"),
    )  # fmt: skip
    objective = "disc_rel"
    summary_title = "discriminability (benign - malicious)"
    report_figures = (
        Bars(
            "discriminability: key accuracy under benign minus under malicious modifications, "
            "beside the same gap for natural test images (the control)",
            x=("source", "target"),
            y=("disc", "disc_control", "disc_rel"),
            ylabel="accuracy gap (benign - malicious)",
            hline=0.0,
        ),
    )

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_keys": 20, "steps": 200, "alpha": 0.002, "n_control": 20}

    def aux_steps(self) -> list[AuxStep]:
        """Keys depend on the source victim (and its simulated copies), never on the target."""
        p = self.params
        source = VictimRef("source", arch=p.source_arch)
        sims = [
            AuxStep(f"simulate_{role}", self._simulator(role), needs=(source,), params=(field,),
                    resources="train")
            for role, field, w in (
                ("benign", "benign_sim", p.w_b),
                ("malicious", "malicious_sim", p.w_g),
            )
            if w > 0
        ]  # fmt: skip
        keygen = AuxStep(
            "keygen",
            self._keygen,
            needs=(source, *(s.name for s in sims)),
            params="all",
            exclude=("theta", "source_arch"),
        )
        return [*sims, keygen]

    def needs(self):
        return ("keygen",)

    def _simulator(self, role: str):
        def simulate(ctx) -> AuxOutput:
            """A benign / malicious copy of the source, modified with the OWNER's data only."""
            sim = self.params.benign_sim if role == "benign" else self.params.malicious_sim
            source = ctx.inputs["source"]
            model, spec = source.model(), source.spec
            owner_ctx = replace(ctx, data=replace(ctx.data, attacker=ctx.data.owner), spec=spec)
            out = create_attack(sim.name, sim.params).apply(model, owner_ctx)
            return AuxOutput(model=out.model, spec=out.spec or spec, meta={"role": role})

        return simulate

    def _keygen(self, ctx) -> AuxOutput:
        """Control first (a fixed seeded draw, so every key set is judged on the same natural
        images), then keys from the rest of the pool."""
        p = self.params
        source = ctx.inputs["source"].model()
        sims = {
            role: ctx.inputs[f"simulate_{role}"].model()
            for role in ("benign", "malicious")
            if f"simulate_{role}" in ctx.inputs
        }
        n = p.pool_size + p.n_control
        pool = correct_pool(source, ctx.data.test, n, ctx.owner_seed, ctx.device)
        control = Split(pool.x[: p.n_control], pool.y[: p.n_control])
        pool = Split(pool.x[p.n_control :], pool.y[p.n_control :])
        keys = generate_keys(source, pool, p, ctx.device, sims.get("benign"), sims.get("malicious"))
        originals = as_float(pool.x[keys["origin"]])
        sim_values = ssim(as_float(keys["x"]), originals) if len(keys["y"]) else torch.zeros(0)
        secret = {"x": keys["x"], "y": keys["y"], "control_x": control.x, "control_y": control.y}
        meta = {
            "n_keys": len(keys["y"]),
            "n_control": len(control),
            "pool": len(pool),
            "scanned": keys["scanned"],
            "ssim_min": sim_values.min().item() if len(sim_values) else float("nan"),
            "ssim_mean": sim_values.mean().item() if len(sim_values) else float("nan"),
        }
        return AuxOutput(secret=secret, meta=meta)

    def embed(self, victim, ctx) -> Embedded:
        keygen = ctx.inputs["keygen"]
        stats = {k: keygen.meta[k] for k in ("n_keys", "n_control", "ssim_min", "ssim_mean")}
        return Embedded(victim, {**keygen.secret(), "stats": stats})

    def verify(self, model, key, ctx) -> WatermarkScore:
        acc, key_margin = score(model, key["x"], key["y"], ctx.device)
        ctrl_acc, ctrl_margin = score(model, key["control_x"], key["control_y"], ctx.device)
        metrics = {
            "key_margin": key_margin,
            "control_acc": ctrl_acc,
            "control_margin": ctrl_margin,
            **key["stats"],
        }
        detected = bool(acc >= self.params.theta) if not math.isnan(acc) else False
        return WatermarkScore(
            score=acc, detected=detected, threshold=self.params.theta, metrics=metrics
        )

    # ------------------------------------------------------------------ analysis

    def check_tune(self, scenario, objective: str) -> str | None:
        roles = {a.role for a in scenario.attacks}
        if objective in TABLE_FIGURES and not {"benign", "malicious"} <= roles:
            return (
                f"{objective} contrasts benign and malicious modifications: the scenario needs "
                "at least one attack with role: benign and one with role: malicious"
            )
        return None

    @classmethod
    def summary_table(cls, df):
        """Per (source, target) pair: key accuracy under the benign modifications minus under
        the malicious ones, beside the same figure for natural test images (the control) and
        their difference `disc_rel` - how much more the keys separate benign from malicious
        than natural images do."""
        d = df[df["attack_role"].isin(["benign", "malicious"])]
        if d.empty:
            return None
        params = d["method_params"].map(json.loads)
        d = d.assign(
            source=[p.get("source_arch") or a for p, a in zip(params, d["arch"], strict=True)],
            target=d["arch"],
            settings=label(d, "method", "method_params"),
            **{m: metric(d, m) for m in ("control_acc", "ssim_min", "ssim_mean", "n_keys")},
        )
        keys = ["scenario", "settings", "source", "target"]
        by_role = d.groupby([*keys, "attack_role"])[["wm_score_attacked", "control_acc"]].mean()
        wide = by_role.unstack("attack_role").reindex(
            columns=pd.MultiIndex.from_product(
                [["wm_score_attacked", "control_acc"], ["benign", "malicious"]]
            )
        )
        out = pd.DataFrame(
            {
                "key_acc_unmodified": d.groupby(keys)["wm_score_marked"].mean(),
                "key_benign": wide[("wm_score_attacked", "benign")],
                "key_malicious": wide[("wm_score_attacked", "malicious")],
                "control_benign": wide[("control_acc", "benign")],
                "control_malicious": wide[("control_acc", "malicious")],
                "ssim_min": d.groupby(keys)["ssim_min"].min(),
                "ssim_mean": d.groupby(keys)["ssim_mean"].mean(),
                "n_keys": d.groupby(keys)["n_keys"].min(),
            }
        )
        out["disc"] = out["key_benign"] - out["key_malicious"]
        out["disc_control"] = out["control_benign"] - out["control_malicious"]
        out["disc_rel"] = out["disc"] - out["disc_control"]
        return out.reset_index().drop(columns="scenario")  # `show` filters by scenario

    @classmethod
    def tune_figures(cls, df) -> dict[str, float]:
        """The row metrics, plus disc / disc_control / disc_rel averaged over the trial's
        (source, target) pairs."""
        figures = super().tune_figures(df)
        table = cls.summary_table(df[df["status"] == "ok"]) if len(df) else None
        for name in TABLE_FIGURES:
            ok = table is not None and not table[name].isna().all()
            figures[name] = float(table[name].mean()) if ok else float("nan")
        return figures


TABLE_FIGURES = ("disc", "disc_control", "disc_rel")
