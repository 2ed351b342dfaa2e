"""Knockoff Nets (Orekondy et al., CVPR 2019, arXiv 1812.02766; WRT's
`wrt/attacks/removal/knockoff_nets.py`, config `knockoff.yaml`): a fresh student trained on
the deployment's answers to images of ANOTHER distribution - the transfer set - asked through the
served API (`ctx.query`). The attacker's task data are never sent, nor read.

The transfer set (`source`): `photos`, patches of the real photographs shipped with
scikit-image / scikit-learn (`harness.data.photo_patches`; the stand-in for WRT's Open Images
folder, which is not shipped), or `folder`, an ImageFolder-style directory (`root`; images
anywhere below it, sub-folder names unused). Either is resized to the data set's side and
channel count, as WRT reads Open Images at 32 px.

`selection`: `random` (WRT's, and Orekondy's baseline) asks `query_budget` images drawn at
random from the transfer set. `adaptive` is Orekondy's gradient-bandit policy, kept simple:
the actions are KMeans groups (`clusters`) of a larger pool (`pool_size`; the paper's actions
are the transfer set's own label hierarchy, which photos and flat folders lack), clustered on
their 8 x 8 thumbnails; each round draws `round_size` actions from softmax(H), asks one unseen
image of each, and rewards an answer by its certainty (the margin between its two largest
softmax probabilities, the paper's R_cert); H follows the gradient-bandit update
H_a += bandit_lr (r - mean r)(1[a = chosen] - pi_a), one query at a time against the running
mean reward. Then the student is trained on every answer bought, with `distill`'s recipe
(`harness.attacks.retrain.train_on_answers`).

Departures from WRT / the paper:
- transfer set: the shipped photos (or the user's folder), not 1.25 million Open Images;
- budget: `query_budget` 10,000 (WRT: the whole 1.25 M folder, 25 x CIFAR-10's training
  set; at digits scale 10,000 is ~20 x the attacker split), and WRT's 4 epochs over it;
- adaptive: rewards certainty only (the paper also rewards diversity and the student's
  loss, which need the student trained online); the student is trained after the selection,
  not during it; rounds of `round_size` queries share one API call;
- loss: distill's T^2 KL + CE(argmax) at T = 1 on soft answers (the paper: soft
  cross-entropy), or CE on `hard_labels`; the scenario's optimiser and cosine schedule.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from harness.attacks.base import Attack, Metric, register
from harness.attacks.retrain import RetrainParams, train_on_answers
from harness.data import has_class_image, is_class_image, photo_patches, to_uint8
from harness.errors import CellFailed, ConfigError

ADAPTIVE_POOL = 4  # adaptive: candidates per query of the budget unless pool_size says
THUMBNAIL = 8  # side of the thumbnails the adaptive policy clusters


class KnockoffParams(RetrainParams):  # retrain's soft labels, other budget and epochs
    source: Literal["photos", "folder"] = Field(
        "photos", description="transfer set: the shipped photos' patches, or a folder (root)"
    )
    root: str | None = Field(None, description="source folder: a directory of images")
    selection: Literal["random", "adaptive"] = "random"
    query_budget: int = Field(10_000, ge=1, description="transfer-set images queried")
    pool_size: int | None = Field(
        None, ge=1, description="candidates drawn; default: query_budget (random), 4x (adaptive)"
    )
    clusters: int = Field(16, ge=2, le=1024, description="adaptive: groups (bandit actions)")
    bandit_lr: float = Field(0.1, gt=0, description="adaptive: the preferences' step size")
    round_size: int = Field(64, ge=1, description="adaptive: queries per round (one API call)")
    epochs: int = Field(4, ge=1, description="WRT: 4")

    @model_validator(mode="after")
    def _consistent(self) -> KnockoffParams:
        if (self.source == "folder") != (self.root is not None):
            raise ConfigError(
                "a folder transfer set needs root, and root is read only with source: folder",
                field="root",
                value=self.root,
            )
        if self.pool_size is not None and self.pool_size < self.query_budget:
            raise ConfigError(
                "the pool cannot be smaller than the budget spent on it",
                field="pool_size",
                value=self.pool_size,
                allowed=f"at least query_budget ({self.query_budget})",
            )
        return self

    def pool(self) -> int:
        if self.pool_size is not None:
            return self.pool_size
        return self.query_budget * (ADAPTIVE_POOL if self.selection == "adaptive" else 1)


@register("knockoff")
class Knockoff(Attack):
    Params = KnockoffParams
    queries_api = True
    version = "1"
    metrics = (
        Metric("transfer_pool", "transfer-set images drawn (the candidates)", None),
        Metric("answer_margin", "mean top-2 softmax margin of the answers bought (the "
               "adaptive policy's reward)", None),
    )  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"query_budget": 64, "epochs": 1, "student_arch": "lenet"}

    def check_data(self, dataset) -> None:
        if self.params.source == "folder":
            check_folder(self.params.root)

    def apply(self, model, ctx):
        p = self.params
        size, channels = ctx.data.image_size, ctx.data.channels
        if p.source == "photos":
            pool = to_uint8(photo_patches(p.pool(), size, ctx.seed), size, channels)
        else:
            pool = folder_images(p.root, p.pool(), size, channels, ctx.seed)
        if p.selection == "random":
            x = pool[: p.query_budget]  # both sources come in seeded random order
            answers = ctx.query(model, x)
        else:
            x, answers = adaptive_queries(pool, lambda q: ctx.query(model, q), p, ctx.seed)
        out = train_on_answers(model, ctx, x, answers, p)
        figures = {"transfer_pool": float(len(pool)), "answer_margin": margin(answers).mean()}
        return dataclasses.replace(out, metrics={k: float(v) for k, v in figures.items()})


# ------------------------------------------------------------------ a folder transfer set


def check_folder(root: str) -> None:
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"the transfer-set root {what}", field="root", value=str(path))
    if not has_class_image(path):
        raise ConfigError("no images in the transfer-set folder (searched below it too)",
                          field="root", value=str(path))  # fmt: skip


def folder_images(root: str, n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """Up to n images of the folder (or below it), a seeded random choice in random order,
    as uint8 (n, channels, size, size)."""
    from PIL import Image, UnidentifiedImageError  # lazy: start-up time

    path = Path(root).expanduser()
    files = sorted(Path(d) / f for d, _, fs in os.walk(path, followlinks=True)
                   for f in fs if is_class_image(f))  # fmt: skip
    if not files:
        raise CellFailed(f"no images left in the transfer-set folder {path}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n]
    images = []
    for i in order.tolist():
        try:
            with Image.open(files[i]) as opened:
                image = opened.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as err:
            raise CellFailed(f"cannot read transfer-set image {files[i]}: {err}") from err
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return to_uint8(torch.stack(images).float() / 255.0, size, channels)


# ------------------------------------------------------------------ adaptive selection


def margin(answers: torch.Tensor) -> torch.Tensor:
    """The certainty of each answer: its largest softmax probability minus the second."""
    top = answers.float().softmax(1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def thumbnail_groups(pool: torch.Tensor, clusters: int, seed: int) -> np.ndarray:
    """KMeans groups of the pool's 8 x 8 thumbnails (the bandit's actions)."""
    from sklearn.cluster import KMeans  # lazy: start-up time

    thumbs = F.adaptive_avg_pool2d(pool.float() / 255.0, THUMBNAIL).flatten(1).numpy()
    k = min(clusters, len(pool))
    return KMeans(n_clusters=k, n_init=3, random_state=seed % 2**32).fit_predict(thumbs)


def adaptive_queries(pool: torch.Tensor, ask, p: KnockoffParams, seed: int):
    """Orekondy's gradient bandit over the pool's groups (module docstring): the queries it
    chose, in order, and their answers from `ask`."""
    groups = thumbnail_groups(pool, p.clusters, seed)
    rng = np.random.default_rng(seed)
    unseen = [list(rng.permutation(np.flatnonzero(groups == a))) for a in range(groups.max() + 1)]
    prefs = np.zeros(len(unseen))
    mean_reward, seen = 0.0, 0
    picked, answers = [], []
    while seen < p.query_budget and any(unseen):
        live = np.array([bool(u) for u in unseen])
        want = min(p.round_size, p.query_budget - seen)
        actions = rng.choice(len(unseen), size=want, p=_policy(prefs, live))
        chosen = [(a, unseen[a].pop()) for a in actions if unseen[a]]
        idx = torch.tensor([i for _, i in chosen])
        got = ask(pool[idx])
        for (a, _), r in zip(chosen, margin(got).tolist(), strict=True):
            seen += 1
            mean_reward += (r - mean_reward) / seen
            step = p.bandit_lr * (r - mean_reward)
            prefs -= step * _policy(prefs, live)
            prefs[a] += step
        picked.append(idx)
        answers.append(got)
    idx = torch.cat(picked)
    return pool[idx], torch.cat(answers)


def _policy(prefs: np.ndarray, live: np.ndarray) -> np.ndarray:
    """softmax of the preferences over groups with unseen images left."""
    z = np.where(live, prefs - prefs[live].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()
