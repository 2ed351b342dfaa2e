"""The shared train / evaluate / distill loops.

Data lives as uint8 tensors in memory and is cast per batch; on CUDA the loop uses bf16
autocast and channels_last. One loop (`fit`) serves supervised training, fine-tuning and
distillation: only the targets and the loss differ.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data import Split
from harness.errors import CellFailed

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
    """Mini-batch training with SGD (or Adam) and a cosine schedule; NaN loss fails the cell."""
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    params = list(model.parameters() if params is None else params)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    n = len(targets)
    steps_per_epoch = max(1, -(-n // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    model.train(not freeze_bn)
    start, seen, loss_sum = time.perf_counter(), 0, 0.0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb, tb = as_float(x[idx], device), targets[idx].to(device, non_blocking=True)
            if cfg.augment:
                xb = random_shift(xb, gen)
            with autocast(device, cfg.amp):
                loss = loss_fn(model(xb).float(), tb)
            if not torch.isfinite(loss):
                raise CellFailed(f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum / max(seen, 1),
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


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
    from harness.image_metrics import SSIM_WINDOW, psnr, ssim

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
