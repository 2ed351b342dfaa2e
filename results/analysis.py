"""Analysis helpers over the results DataFrame (pandas); DuckDB / Polars read the same files."""

from __future__ import annotations

import json

import pandas as pd


def varying_params(df: pd.DataFrame, name_col: str, params_col: str) -> dict[str, list[str]]:
    """Per attack (or method) name, the parameter keys that take more than one value."""
    out: dict[str, list[str]] = {}
    for name, group in df.groupby(name_col):
        params = [json.loads(p or "{}") for p in group[params_col]]
        keys = sorted({k for p in params for k in p})
        out[name] = [k for k in keys if len({json.dumps(p.get(k)) for p in params}) > 1]
    return out


def label(df: pd.DataFrame, name_col: str, params_col: str) -> pd.Series:
    """'fine_tune(mode=rtal)': the name plus only the parameters that vary in this frame."""
    vary = varying_params(df, name_col, params_col)

    def one(name: str, params: str) -> str:
        p = json.loads(params or "{}")
        shown = ",".join(f"{k}={p.get(k)}" for k in vary.get(name, []))
        return f"{name}({shown})" if shown else name

    return pd.Series(
        [one(n, p) for n, p in zip(df[name_col], df[params_col], strict=True)], index=df.index
    )


def summary(df: pd.DataFrame, by: tuple[str, ...] = ("method", "attack")) -> pd.DataFrame:
    """Mean scores per group over archs and seeds: the method x attack table."""
    if df.empty:
        return pd.DataFrame()
    df = df.assign(
        method=label(df, "method", "method_params"), attack=label(df, "attack", "attack_params")
    )
    removed = df["metrics"].map(lambda m: (m or {}).get("wm_removed"))
    df = df.assign(
        wm_removed=pd.to_numeric(removed),
        ok=df["status"].eq("ok"),
        wm_detected=df["wm_detected"].astype(float),
    )
    agg = df.groupby(list(by)).agg(
        cells=("cell_id", "size"),
        failed=("ok", lambda s: int((~s).sum())),
        task_clean=("task_score_clean", "mean"),
        task_marked=("task_score_marked", "mean"),
        task_attacked=("task_score_attacked", "mean"),
        wm_marked=("wm_score_marked", "mean"),
        wm_attacked=("wm_score_attacked", "mean"),
        wm_threshold=("wm_threshold", "mean"),
        detected=("wm_detected", "mean"),
        removed=("wm_removed", "mean"),
    )
    return agg.reset_index()


def _metric(df: pd.DataFrame, name: str) -> pd.Series:
    return df["metrics"].map(lambda m: (m or {}).get(name, float("nan"))).astype(float)


def discriminability(df: pd.DataFrame) -> pd.DataFrame:
    """Per (source, target) pair of the discriminative-samples method: key accuracy under the
    benign modifications minus under the malicious ones, beside the same figure for natural
    test images (the control) and their difference `disc_rel` — how much more the keys
    separate benign from malicious than natural images do."""
    d = df[(df["status"] == "ok") & df["attack_role"].isin(["benign", "malicious"])]
    d = d[d["wm_metric"] == "key_acc"]
    if d.empty:
        return pd.DataFrame()
    params = d["method_params"].map(json.loads)
    d = d.assign(
        source=[p.get("source_arch") or a for p, a in zip(params, d["arch"], strict=True)],
        target=d["arch"],
        settings=label(d, "method", "method_params"),
        control_acc=_metric(d, "control_acc"),
        ssim_min=_metric(d, "ssim_min"),
        ssim_mean=_metric(d, "ssim_mean"),
        n_keys=_metric(d, "n_keys"),
    )
    keys = ["scenario", "settings", "source", "target"]
    by_role = d.groupby([*keys, "attack_role"])[["wm_score_attacked", "control_acc"]].mean()
    wide = by_role.unstack("attack_role")
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
    return out.reset_index()


def output_watermarking(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting of the output-watermarking method and per attack: the success rate (share of
    outputs whose extraction has NC > 0.95), mean NC and centred NC, the false-positive rate on
    clean images, the served model's invisibility (PSNR / SSIM of B' vs B) and the attacked
    model's task PSNR. Rows of `surrogate` with `outputs: unmarked` are the control: their
    success rate is the false-positive rate on a surrogate of unmarked outputs."""
    d = df[(df["status"] == "ok") & (df["wm_metric"] == "success_rate")]
    if d.empty:
        return pd.DataFrame()
    attack = d["attack_params"].map(lambda p: json.loads(p or "{}"))
    d = d.assign(
        settings=label(d, "method", "method_params"),
        attack=label(d, "attack", "attack_params"),
        outputs=attack.map(lambda p: p.get("outputs", "marked")),
        **{m: _metric(d, m) for m in ("nc", "centred_nc", "fp_clean")},
        wm_psnr=_metric(d, "wm_psnr_marked"),
        wm_ssim=_metric(d, "wm_ssim_marked"),
    )
    out = d.groupby(["settings", "attack", "outputs"]).agg(
        cells=("cell_id", "size"),
        success_rate=("wm_score_attacked", "mean"),
        nc=("nc", "mean"),
        centred_nc=("centred_nc", "mean"),
        fp_clean=("fp_clean", "mean"),
        wm_psnr=("wm_psnr", "mean"),
        wm_ssim=("wm_ssim", "mean"),
        task_psnr=("task_score_attacked", "mean"),
    )
    return out.reset_index()


PASSPORT_METRICS = (
    "acc_dep", "acc_ver", "acc_gap", "forged_detection", "forged_detection_owner_bits",
    "forged_acc_ver", "reveal_psnr", "reveal_key_gap_db", "forged_reveal_psnr",
    "forged_key_reveal_psnr",
)  # fmt: skip


def passports(df: pd.DataFrame) -> pd.DataFrame:
    """Steganographic Passport per arch and attack: the owner's signature detection, both
    branches' accuracy and their gap, what a forged passport scores against its own hash's bits
    (and against the owner's), and the licence check (reveal PSNR with the genuine key, its
    margin over wrong keys, and what forged licences / keys reveal)."""
    d = df[(df["status"] == "ok") & (df["wm_metric"] == "signature_detection")]
    if d.empty:
        return pd.DataFrame()
    d = d.assign(
        attack=label(d, "attack", "attack_params"),
        detected=d["wm_detected"].astype(float),
        **{m: _metric(d, m) for m in PASSPORT_METRICS},
    )
    aggs = {m: (m, "mean") for m in PASSPORT_METRICS}
    out = d.groupby(["arch", "attack"]).agg(
        detection=("wm_score_attacked", "mean"), detected=("detected", "mean"), **aggs
    )
    return out.dropna(axis=1, how="all").reset_index()
