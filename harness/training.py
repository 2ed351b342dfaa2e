"""The shared train / evaluate / distill loops.

Data lives as uint8 tensors in memory and is cast per batch; on CUDA the loop uses bf16
autocast and channels_last. One optimisation loop (`train_loop`) runs every training in the
harness, each a per-batch loss function; `fit` on top of it serves supervised training,
fine-tuning and distillation: only the targets and the loss differ.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data import Split
from harness.errors import CellFailed
from harness.image_metrics import SSIM_WINDOW, psnr, ssim

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def as_float(x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images to float in [0, 1] on `device` (float input passes through)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def autocast(device: torch.device | str, enabled: bool = True):
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: nn.Module, device: torch.device | str) -> nn.Module:
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (reflect-padded crop), one offset per batch."""
    pad = max(1, x.shape[-1] // 8)
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded[..., i : i + x.shape[-2], j : j + x.shape[-1]]


def train_loop(
    loss_fn: Callable[[Any], torch.Tensor | dict[str, torch.Tensor]],
    opt: torch.optim.Optimizer,
    *,
    n: int | None = None,
    batch_size: int = 1,
    epochs: int = 1,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    batch: Callable[[Any], Any] | None = None,
    device: torch.device | str = "cpu",
    amp: bool = True,
    modules: Iterable[nn.Module] = (),
    freeze_bn: bool = False,
    clip: float | None = None,
    cosine: bool = True,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """The one optimisation loop: every training in the harness is a loss function given to it.

    Two modes. With `n` (examples): `epochs` passes, each over a fresh `torch.randperm(n,
    generator=generator)` order sliced into ceil(n / batch_size) batches (the last partial);
    the loss function gets the batch's indices. With `steps` instead: that many steps, the
    loss function gets the step number and draws its own batch (it counts as `batch_size`
    examples in the statistics).

    Per step: `batch(indices or step)` if given (outside autocast: loading, casting,
    augmenting - draws from `generator` come after that epoch's permutation, in step order),
    then `loss_fn(that)` under `autocast(device, amp)` (bf16 on CUDA only); it returns a scalar
    loss, or a dict of named scalar terms whose sum (in order) is the loss. A non-finite loss
    raises `CellFailed`. Then zero_grad, backward, a gradient-norm clip at `clip` over the
    optimiser's parameters (None: none), the optimiser step, a cosine LR step (`cosine`,
    T_max = all steps) and `after_step()` (e.g. a discriminator update).

    `modules` are put in train mode (eval mode with `freeze_bn`) and, on CUDA,
    channels_last before the first step, and in eval mode after the last.

    Returns the mean per example of the loss (and of each named term), `seconds`,
    `images_per_s` and `steps`."""
    if (n is None) == (steps is None):
        raise ValueError("give either `n` (examples, with epochs) or `steps`, not both")
    modules = list(modules)
    channels_last = torch.device(device).type == "cuda"
    for m in modules:
        if channels_last:
            m.to(memory_format=torch.channels_last)
        m.train(not freeze_bn)
    params = [q for group in opt.param_groups for q in group["params"]]
    if n is not None:
        per_epoch = -(-n // batch_size)
        plan = [(e, s) for e in range(epochs) for s in range(per_epoch)]
    else:
        plan = [(None, s) for s in range(steps)]
    sched = None
    if cosine:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, len(plan)))
    totals: dict[str, float] = {"loss": 0.0}
    start, seen, order = time.perf_counter(), 0, None
    for epoch, step in plan:
        if epoch is None:
            arg, size = step, batch_size
        else:
            if step == 0:
                order = torch.randperm(n, generator=generator)
            arg = order[step * batch_size : (step + 1) * batch_size]
            size = len(arg)
        if batch is not None:
            arg = batch(arg)
        with autocast(device, amp):
            out = loss_fn(arg)
        terms = out if isinstance(out, dict) else {}
        loss = functools.reduce(operator.add, terms.values()) if isinstance(out, dict) else out
        if not torch.isfinite(loss):
            where = f"step {step}" if epoch is None else f"epoch {epoch}, step {step}"
            raise CellFailed(f"non-finite loss ({loss.item()}) at {where}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        if after_step is not None:
            after_step()
        seen += size
        totals["loss"] += loss.item() * size
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.item() * size
    for m in modules:
        m.eval()
    seconds = time.perf_counter() - start
    stats = {name: value / max(seen, 1) for name, value in totals.items()}
    stats.update(seconds=seconds, images_per_s=seen / max(seconds, 1e-9), steps=len(plan))
    return stats


def fit(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    cfg,
    device: torch.device | str,
    seed: int,
    *,
    loss_fn: LossFn = F.cross_entropy,
    params: Iterable[nn.Parameter] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    freeze_bn: bool = False,
) -> dict[str, float]:
    """Mini-batch training with SGD (or Adam) and a cosine schedule (`train_loop`): the
    model's outputs against `targets[batch]` under `loss_fn`; NaN loss fails the cell."""
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    params = list(model.parameters() if params is None else params)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb, tb = as_float(x[idx], device), targets[idx].to(device, non_blocking=True)
        return (random_shift(xb, gen) if cfg.augment else xb), tb

    def loss(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return loss_fn(model(b[0]).float(), b[1])

    return train_loop(
        loss, opt, n=len(targets), batch_size=cfg.batch_size, epochs=epochs, generator=gen,
        batch=batch, device=device, amp=cfg.amp, modules=[model], freeze_bn=freeze_bn,
    )  # fmt: skip


def train_classifier(
    model: nn.Module, data: Split, cfg, device, seed: int, **kw
) -> dict[str, float]:
    return fit(model, data.x, data.y, cfg, device, seed, **kw)


def is_image2image(data: Split) -> bool:
    return data.y.dim() == 4


def pixel_loss(kind: str = "l1") -> LossFn:
    """L1 / L2 between an output image and a (uint8 or float) target image."""
    fn = {"l1": F.l1_loss, "l2": F.mse_loss}[kind]
    return lambda out, target: fn(out, as_float(target, out.device))


def train_task_model(
    model: nn.Module, data: Split, cfg, device, seed: int, **kw
) -> dict[str, float]:
    """Supervised training for the data's task: CE on labels, or L1 on image pairs (A -> B).

    Image pairs are never shifted (`augment` would misalign input and target)."""
    if not is_image2image(data):
        return train_classifier(model, data, cfg, device, seed, **kw)
    cfg = cfg.model_copy(update={"augment": False})
    return fit(model, data.x, data.y, cfg, device, seed, loss_fn=pixel_loss("l1"), **kw)


@torch.no_grad()
def predict_images(model: nn.Module, x: torch.Tensor, device, batch_size: int = 128):
    """A model's output images, float in [0, 1] on the CPU (what `predict_logits` is for labels)."""
    return predict_logits(model, x, device, batch_size).clamp(0, 1)


def image_scores(model: nn.Module, data: Split, device) -> dict[str, float]:
    """Mean PSNR (dB) and, on images the SSIM window fits, mean SSIM of the outputs against
    the targets, from one pass over the data."""
    out, target = predict_images(model, data.x, device), as_float(data.y)
    values = psnr(out, target)
    scores = {"psnr": values[values.isfinite()].mean().item()}
    if min(out.shape[-2:]) >= SSIM_WINDOW:
        scores["ssim"] = ssim(out, target).mean().item()
    return scores


def task_score(model: nn.Module, data: Split, device) -> float:
    """The task metric of `TASK_METRIC`: accuracy on labels, mean PSNR (dB) on image pairs."""
    if is_image2image(data):
        return image_scores(model, data, device)["psnr"]
    return accuracy(model, data, device)


TASK_METRIC = {"classification": "accuracy", "image2image": "psnr"}


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, device, batch_size: int = 512
) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(device):
            out.append(model(as_float(x[i : i + batch_size], device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model: nn.Module, data: Split, device) -> float:
    if len(data) == 0:
        return float("nan")
    return (predict_logits(model, data.x, device).argmax(1) == data.y).float().mean().item()


def kd_loss(temperature: float, hard_weight: float = 1.0) -> LossFn:
    """Hinton distillation on teacher logits: T^2 KL(soft) + CE on the teacher's argmax."""

    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / t, 1),
            F.softmax(teacher_logits / t, 1),
            reduction="batchmean",
        )
        return t * t * soft + hard_weight * F.cross_entropy(
            student_logits, teacher_logits.argmax(1)
        )

    return loss
