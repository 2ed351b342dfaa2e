"""Steganographic Passport (Cui et al., CVPR 2024): owner- and user-verifiable passports.

One model, two branches sharing every conv weight (`model_zoo.passport`): the deployment branch
is the plain network; the verification branch modulates the chosen stage's normalisation with an
owner passport pushed through the shared conv and a private perceptron (TLP). Two-branch
training on the owner's split ties the branches together and writes a signature - the first C
bits of SHA-512 of the passport image, one per channel - into the signs of the passport's
response. Ownership holds iff the signature detection (share of matching signs) reaches the
threshold and the verification branch is about as accurate as the deployment branch.

Licences need no retraining: each user's ID image is hidden in the owner passport by an
invertible steganographic network (`model_zoo.isn`, stage `aux/isn`, trained on real photo
patches and shared by every cell with the same ISN parameters); the owner's key image reveals
it again from the user passport. The paper's ISN loss never asks other keys to fail;
`neg_weight` adds this project's negative-key hinge (wrong keys: uniform noise and other photo
patches), which the key-specificity target (genuine key >= 5 dB above a wrong one) needs.

Passports are images (uint8, what a PNG would hold, so the hash is stable); a passport layer's
buffer is what its conv sees when the deployment branch runs on the image. Training recaptures
those buffers every step, so after any later change to the layers the owner's passport image is
reinstated simply by capturing again. Secrets (passports, IDs, key, ISN reference) stay in the
embed artifact; rows only get float metrics.

Two-branch training defaults to the paper's SGD lr 0.01 with a gradient-norm clip (at a train
config's 0.05 the sign loss summed over 512-channel layers drives the loss to NaN). Measured at
digits scale: the signs of a forged passport's response agree with the OWNER's bits almost as
well as the genuine passport's do (the response is dominated by W, not by the passport), so
the proof rests on the hash: a claimant must show the bits its own passport hashes to, and that
is what `forged_detection` measures (`forged_detection_owner_bits` is reported beside it).

Function-preserving attacks (`permute`, `rescale`, `dummy_neurons`) leave the signature as it
was, with or without `align`: a passport layer is opaque to `harness.equivalence`, so the
channels it normalises are never rewritten, and every other rewrite is undone by the verifier
itself - `install` recaptures the passport buffers through the suspect's own (rewritten)
layers. A thief who also permuted a passport layer's channels (with its TLP's outputs) would
permute the sign bits; `align: true` (a verify-only parameter, as Uchida's) matches the chains
the engine can rewrite to the marked model's before reading (`harness.alignment`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.alignment import ALIGN_METRICS, aligned_suspect
from harness.data import IMAGE_SUFFIXES, photo_patches, photo_sources, random_patch
from harness.errors import ConfigError
from harness.image_metrics import psnr, ssim, to_uint8
from harness.methods.base import (
    AuxOutput,
    AuxStep,
    Bars,
    Embedded,
    Method,
    Metric,
    WatermarkScore,
    register,
)
from harness.training import as_float, predict_logits, random_shift, train_loop
from model_zoo import ModelSpec, create_model
from model_zoo.isn import ISN, isn_loss, load_isn
from model_zoo.passport import (
    Mode,
    PassportNorm,
    capture_passports,
    check_passport_stages,
    convert_to_passport,
    passport_layers,
    set_mode,
    set_passports,
    signature_bits,
)
from results.analysis import label, metric

SSIM_MIN_SIDE = 11  # harness.image_metrics.ssim's Gaussian window
KEY_TEXTURES = ("brick", "grass", "gravel")  # the paper draws keys from a texture set (DTD)
N_OTHER_KEYS = 8  # natural images tried as wrong keys in the licence check
TABLE_METRICS = (
    "acc_dep", "acc_ver", "acc_gap", "forged_detection", "forged_detection_owner_bits",
    "forged_acc_ver", "reveal_psnr", "reveal_key_gap_db", "forged_reveal_psnr",
    "forged_key_reveal_psnr",
)  # fmt: skip
ISN_PARAMS = (
    "isn_blocks", "isn_growth", "isn_steps", "isn_lr", "isn_batch", "isn_patch", "isn_pool",
    "isn_seed", "isn_clip", "neg_weight", "neg_margin",
)  # fmt: skip  (what the ISN stage depends on, beside the data set)


class StegPassportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: list[str] | None = Field(
        None, min_length=1, description="module paths of the passport stages (default: deepest)"
    )
    n_users: int = Field(4, ge=1, le=256, description="licences (user passports) to issue")
    passport: Literal["photo", "digits"] = Field(
        "photo", description="built-in owner passport images: real photo patches or digits"
    )
    passport_path: str | None = Field(
        None, description="an image file for the signature (gamma) passport instead"
    )
    passport_seed: int = Field(0, ge=0, description="owner's seed: passports, user IDs")
    isn_blocks: int = Field(8, ge=1, le=32)
    isn_growth: int = Field(32, ge=4, le=128, description="dense-block growth of the ISN")
    isn_steps: int = Field(4000, ge=1)
    isn_lr: float = Field(2e-4, gt=0, le=0.1)
    isn_batch: int = Field(8, ge=1, le=1024)
    isn_patch: int | None = Field(
        None, ge=8, le=512, description="ISN training patch side, even (default: image size)"
    )
    isn_pool: int = Field(1024, ge=2, description="photo patches the ISN trains on")
    isn_seed: int = Field(0, ge=0, description="ISN init, training draws and the owner's key")
    isn_clip: float | None = Field(
        1.0, gt=0, description="ISN gradient-norm clip (None: off); Adam at 1e-3 diverges without"
    )
    neg_weight: float = Field(0.0, ge=0, description="negative-key hinge weight (0: the paper)")
    neg_margin: float = Field(0.02, gt=0, le=1, description="wrong-key reveal MSE to reach")
    sign_weight: float = Field(0.1, ge=0)
    sign_margin: float = Field(0.1, ge=0)
    balance: bool = Field(False, description="add the branch-balance loss (off in the paper)")
    balance_weight: float = Field(1.0, ge=0)
    epochs: int | None = Field(None, ge=1, description="two-branch epochs (default: train)")
    lr: float | None = Field(
        0.01, gt=0, description="two-branch SGD lr (the paper's 0.01; None: train.lr)"
    )
    clip: float | None = Field(
        5.0, gt=0, description="gradient-norm clip of two-branch training (None: off)"
    )
    acc_gap: float = Field(0.05, ge=0, le=1, description="max |acc_dep - acc_ver| for ownership")
    threshold: float = Field(0.9, gt=0.5, le=1, description="signature detection for ownership")
    align: bool = Field(
        False, description="match the suspect's neurons to the marked model's before reading"
    )

    @field_validator("isn_patch")
    @classmethod
    def _even(cls, v: int | None) -> int | None:
        if v is not None and v % 2:
            raise ValueError("must be even (the ISN works on Haar sub-bands of half the side)")
        return v

    @field_validator("isn_lr", "neg_weight", "neg_margin", "sign_weight", "sign_margin")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


# ---------------------------------------------------------------------------------- images


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, 3, H, W) float images to the model's channel count (grey: the channel mean)."""
    return x.mean(1, keepdim=True) if channels == 1 and x.shape[1] != 1 else x


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def digit_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n seeded scikit-learn digits as float (n, 3, size, size) images in [0, 1]."""
    from sklearn.datasets import load_digits  # lazy: start-up time

    images = torch.from_numpy(load_digits().images).float().div(16.0)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return _resize(images[pick, None], size).expand(-1, 3, -1, -1).clamp(0, 1)


def read_image(path: str, size: int) -> torch.Tensor:
    """A user passport image file as float (1, 3, size, size)."""
    from PIL import Image  # lazy: start-up time (a user passport file only)

    with Image.open(Path(path).expanduser()) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return _resize(x, size).clamp(0, 1)


def owner_passports(p: StegPassportParams, size: int, channels: int) -> torch.Tensor:
    """The owner's (gamma, beta) passport images, uint8 (2, C, size, size)."""
    if p.passport == "digits":
        images = digit_images(2, size, p.passport_seed + 101)
    else:
        images = photo_patches(2, size, p.passport_seed + 101)
    if p.passport_path is not None:
        images = torch.cat([read_image(p.passport_path, size), images[1:]])
    return to_uint8(_channels(images, channels))


def user_ids(p: StegPassportParams, size: int, channels: int) -> torch.Tensor:
    """The users' ID images (what a licence carries), uint8 (n_users, C, size, size)."""
    return to_uint8(_channels(photo_patches(p.n_users, size, p.passport_seed + 202), channels))


def owner_key(size: int, channels: int, seed: int) -> torch.Tensor:
    """The owner's key image: a seeded patch of one of the texture photos, 8-bit, (1, C, s, s)."""
    photos = dict(photo_sources())
    names = [n for n in KEY_TEXTURES if n in photos] or sorted(photos)
    g = torch.Generator().manual_seed(seed + 2000)
    patch = random_patch(photos[names[seed % len(names)]], size, g)[None]
    return uint8_float(to_uint8(_channels(patch, channels)))


def wrong_keys(size: int, channels: int, seed: int) -> dict[str, torch.Tensor]:
    """Keys the licence check must reject: uniform noise and natural images (one per photo,
    textures other than the key's included)."""
    g = torch.Generator().manual_seed(seed + 303)
    noise = torch.rand(1, channels, size, size, generator=g)
    other = _channels(photo_patches(N_OTHER_KEYS, size, seed + 404), channels)
    return {"noise": noise, "other": other}


def uint8_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------------------------- ISN


def train_isn(
    p: StegPassportParams, channels: int, size: int, device
) -> tuple[ISN, torch.Tensor, dict]:
    """An ISN trained on real photo patches with the owner's fixed key (Adam, the paper's loss
    5 reveal + 1 stego + 1 low-band MSE, plus the negative-key hinge if `neg_weight` > 0)."""
    torch.manual_seed(p.isn_seed)
    g = torch.Generator().manual_seed(p.isn_seed + 1)
    pool = _channels(photo_patches(p.isn_pool, size, p.isn_seed + 1000), channels)
    key = owner_key(size, channels, p.isn_seed)  # handed out as an 8-bit image
    isn = ISN(p.isn_blocks, channels, p.isn_growth).to(device)
    opt = torch.optim.Adam(isn.parameters(), lr=p.isn_lr)
    b = p.isn_batch
    key_dev = key.to(device)
    parts: dict[str, torch.Tensor] = {}  # the last step's loss terms

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pool), (3 * b,), generator=g)
        cover, secret, others = (pool[idx[i * b : (i + 1) * b]].to(device) for i in range(3))
        # one kind of wrong key per batch: the hinge acts on the batch-mean MSE, where a
        # few noise keys (far off anyway) would hide natural keys that still reveal the ID
        wrong = None
        if p.neg_weight > 0:
            noise = torch.rand(others.shape, generator=g).to(device)
            wrong = noise if step % 2 == 0 else others
        parts.update(
            isn_loss(
                isn,
                cover,
                secret,
                key_dev.expand_as(cover),
                wrong_key=wrong,
                neg_weight=p.neg_weight,
                neg_margin=p.neg_margin,
            )
        )
        return parts["total"]

    train_loop(
        loss_fn, opt, steps=p.isn_steps, batch_size=b, device=device, amp=False,
        modules=[isn], clip=p.isn_clip,
    )  # fmt: skip
    stats = {k: v.item() for k, v in parts.items()}
    return isn, to_uint8(key[0]), stats


@torch.no_grad()
def reveal_quality(isn: ISN, stego: torch.Tensor, key: torch.Tensor, ids: torch.Tensor) -> dict:
    """Mean PSNR (and SSIM where the images are large enough) of the revealed IDs."""
    out = isn.reveal(stego.float(), key.float().expand_as(stego)).clamp(0, 1)
    target = uint8_float(ids)
    values = {"psnr": psnr(out, target).mean().item()}
    if min(out.shape[-2:]) >= SSIM_MIN_SIDE:
        values["ssim"] = ssim(out, target).mean().item()
    return values


# ---------------------------------------------------------------------------------- model


def layer_bits(layers: list[PassportNorm], passport: torch.Tensor) -> list[torch.Tensor]:
    """The signature each layer carries: the first C bits of SHA-512 of the gamma passport."""
    return [signature_bits(passport, layer.channels) for layer in layers]


def detection(layers: list[PassportNorm], bits: list[torch.Tensor]) -> float:
    """Signature detection over all passport channels (each layer weighted by its width)."""
    hits = sum(
        lay.signature_detection(b) * lay.channels for lay, b in zip(layers, bits, strict=True)
    )
    return hits / sum(layer.channels for layer in layers)


def install(model: nn.Module, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Passport images (C, H, W) into the model's passport layers (captured per layer)."""
    captured = capture_passports(model, torch.stack([uint8_float(gamma), uint8_float(beta)]))
    set_passports(model, [c[:1].float() for c in captured], [c[1:].float() for c in captured])


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Restore every passport buffer and branch (and train/eval flags) on exit."""
    layers = passport_layers(model)
    saved = [(lay.passport_gamma, lay.passport_beta, lay.mode) for lay in layers]
    flags = {m: m.training for m in model.modules()}
    try:
        yield layers
    finally:
        for lay, (g, b, mode) in zip(layers, saved, strict=True):
            lay.passport_gamma, lay.passport_beta, lay.mode = g, b, mode
        for m, training in flags.items():
            m.training = training


def branch_accuracy(model: nn.Module, mode: Mode | str, split, device) -> float:
    if len(split) == 0:
        return float("nan")
    set_mode(model, mode)
    try:
        return (predict_logits(model, split.x, device).argmax(1) == split.y).float().mean().item()
    finally:
        set_mode(model, Mode.DEPLOYMENT)


def train_two_branch(
    model: nn.Module, images: torch.Tensor, ctx, p: StegPassportParams
) -> dict[str, float]:
    """CE(deployment) + CE(verification) + sign loss (+ balance) on the owner split, SGD with
    the train config's momentum / weight decay and a cosine schedule; the passport buffers are
    recaptured from the images before every step."""
    cfg, device, data = ctx.train, ctx.device, ctx.data.owner
    epochs, lr = p.epochs or cfg.epochs, p.lr or cfg.lr
    layers = passport_layers(model)
    layer_signatures = [b.to(device) for b in layer_bits(layers, images[0])]
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(ctx.seed)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb, yb = as_float(data.x[idx], device), data.y[idx].to(device)
        if cfg.augment:
            xb = random_shift(xb, gen)
        install(model, images[0], images[1])
        model.train()
        return xb, yb

    def loss_fn(b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        xb, yb = b
        set_mode(model, Mode.DEPLOYMENT)
        ce_dep = F.cross_entropy(model(xb).float(), yb)
        set_mode(model, Mode.VERIFICATION)
        ce_ver = F.cross_entropy(model(xb).float(), yb)
        set_mode(model, Mode.DEPLOYMENT)
        sign = sum(
            lay.sign_loss(bits, p.sign_margin, p.sign_weight).float()
            for lay, bits in zip(layers, layer_signatures, strict=True)
        )
        balance = (
            p.balance_weight * sum(lay.balance_loss().float() for lay in layers)
            if p.balance
            else torch.zeros((), device=xb.device)
        )
        return {"ce_dep": ce_dep, "ce_ver": ce_ver, "sign": sign, "balance": balance}

    stats = train_loop(
        loss_fn, opt, n=len(data), batch_size=cfg.batch_size, epochs=epochs, generator=gen,
        batch=batch, device=device, amp=cfg.amp, modules=[model], clip=p.clip,
    )  # fmt: skip
    install(model, images[0], images[1])
    model.eval()
    return {k: stats[k] for k in ("ce_dep", "ce_ver", "sign", "balance")}


def probe_plain(model: nn.Module, secret: dict) -> list[PassportNorm] | None:
    """A model without passport layers (a distilled student, the unmarked victim): the owner's
    passport layers put on a copy, to read the signature its weights carry (chance if none)."""
    probe = copy.deepcopy(model).eval()
    gamma, beta = uint8_float(secret["passport_gamma"]), uint8_float(secret["passport_beta"])
    try:
        convert_to_passport(probe, secret["stages"], gamma, beta)
    except (ConfigError, ValueError, RuntimeError):
        return None
    return passport_layers(probe)


# ---------------------------------------------------------------------------------- method


@register("steg_passport")
class StegPassport(Method):
    Params = StegPassportParams
    version = "2"  # 2: ISN key, passports and user IDs derive from the store's owner secret
    wm_metric = "signature_detection"
    metrics = (
        Metric("ber", "bit error rate of the owner's signature (1 - detection)", False),
        Metric("passport_layers", "passport layers in the suspect (0: a plain network)", None),
        Metric("acc_dep", "deployment-branch accuracy", optional=True),
        Metric("acc_ver", "verification-branch accuracy, owner's passport", optional=True),
        Metric("acc_gap", "|acc_dep - acc_ver| (ownership needs <= acc_gap)", False, optional=True),
        Metric("detection_current", "detection with the passports the suspect holds",
               optional=True),
        Metric("user_detection_owner_bits", "a licence's signs against the owner's bits",
               None, optional=True),
        Metric("user_detection_own_hash", "a licence's signs against its own hash's bits",
               False, optional=True),
        Metric("reveal_psnr", "ID revealed from a licence with the genuine key (dB)",
               optional=True),
        Metric("reveal_key_gap_db", "reveal PSNR of the genuine key over a typical wrong one",
               optional=True),
        Metric("forged_detection", "a forged passport's signs against its own hash's bits",
               False, optional=True),
        Metric("forged_detection_owner_bits", "a forged passport's signs against the owner's",
               None, optional=True),
        Metric("forged_acc_ver", "verification accuracy with the forged passport", None,
               optional=True),
        Metric("forged_reveal_psnr", "forged ID revealed from a forged licence (dB)", False,
               optional=True),
        Metric("forged_key_reveal_psnr", "genuine ID revealed with a forged key (dB)", False,
               optional=True),
        *ALIGN_METRICS,
    )  # fmt: skip
    verify_params = ("align",)  # one marked model serves align: false and true
    summary_title = "steganographic passport (detection = share of matching signs)"
    report_figures = (
        Bars(
            "signature detection per attack: the owner's passport and forged ones",
            x=("arch", "attack"),
            y=("detection", "forged_detection", "forged_detection_owner_bits"),
            ylabel="share of matching sign bits",
        ),
        Bars(
            "licence reveal PSNR per key kind: genuine key, forged licence, forged key",
            x=("arch", "attack"),
            y=("reveal_psnr", "forged_reveal_psnr", "forged_key_reveal_psnr"),
            ylabel="reveal PSNR (dB)",
        ),
    )

    @classmethod
    def tiny_params(cls) -> dict:
        return {
            "stages": ["features"], "n_users": 2, "isn_blocks": 1, "isn_growth": 8,
            "isn_steps": 30, "isn_pool": 32, "lr": 0.05,
        }  # fmt: skip

    @classmethod
    def summary_table(cls, df):
        """Per arch and attack: the owner's signature detection, both branches' accuracy and
        their gap, what a forged passport scores against its own hash's bits (and against the
        owner's), and the licence check (reveal PSNR with the genuine key, its margin over
        wrong keys, and what forged licences / keys reveal)."""
        shown = TABLE_METRICS
        d = df.assign(
            attack=label(df, "attack", "attack_params"),
            detected=df["wm_detected"].astype(float),
            **{m: metric(df, m) for m in shown},
        )
        out = d.groupby(["arch", "attack"]).agg(
            detection=("wm_score_attacked", "mean"),
            detected=("detected", "mean"),
            **{m: (m, "mean") for m in shown},
        )
        return out.dropna(axis=1, how="all").reset_index()

    # validation -------------------------------------------------------------------------

    def check_data(self, dataset) -> None:
        p = self.params
        if dataset.image_size % 2:
            raise ConfigError(
                "passports are images of the data's size and the ISN needs an even side: set "
                "dataset.image_size to an even number",
                value=dataset.image_size,
            )
        if p.passport_path is not None:
            path = Path(p.passport_path).expanduser()
            if not path.is_file():
                raise ConfigError(
                    "passport image file does not exist",
                    field="passport_path",
                    value=p.passport_path,
                )
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(
                    "passport_path is not an image file",
                    field="passport_path",
                    value=p.passport_path,
                    allowed=list(IMAGE_SUFFIXES),
                )

    def check_arch(self, arch: str, dataset) -> None:
        """Refuse, before any task starts, an arch whose chosen stages have no BatchNorm2d (or
        a layer wider than the 512 bits one SHA-512 signature holds). Builds the network once,
        never trains it."""
        spec = ModelSpec(arch, max(2, dataset.num_classes), dataset.channels, dataset.image_size)
        try:
            check_passport_stages(create_model(spec), self.params.stages)
        except ConfigError as e:
            raise ConfigError(
                f"arch {arch!r}: {e.message}",
                field=e.field,
                value=e.value,
                allowed=e.allowed,
                hint=e.hint,
            ) from None

    # aux: the ISN -------------------------------------------------------------------------

    def aux_steps(self) -> list[AuxStep]:
        """One ISN per ISN-parameter set and data set: every cell of a scenario shares it."""
        return [AuxStep("isn", self.train_isn, needs=(), params=ISN_PARAMS)]

    def train_isn(self, ctx) -> AuxOutput:
        # the owner's key and the ISN's draws: from the owner secret (isn_seed is in the key)
        p = self.params.model_copy(update={"isn_seed": ctx.owner_seed})
        size = p.isn_patch or ctx.data.image_size
        isn, key_image, stats = train_isn(p, ctx.data.channels, size, ctx.device)
        isn = isn.cpu()
        test = _channels(photo_patches(16, size, p.isn_seed + 3000), ctx.data.channels)
        cover, secret_img = test[:8], test[8:]
        with torch.no_grad():
            stego = isn.hide(cover, secret_img)
        stats["stego_psnr"] = psnr(stego.clamp(0, 1), cover).mean().item()
        stats["reveal_psnr"] = reveal_quality(
            isn, stego, uint8_float(key_image)[None], to_uint8(secret_img)
        )["psnr"]
        meta = {
            "isn": {"blocks": p.isn_blocks, "channels": ctx.data.channels, "growth": p.isn_growth},
            "stats": stats,
        }
        return AuxOutput(model=isn, secret={"key": key_image}, meta=meta)

    # embed --------------------------------------------------------------------------------

    def embed(self, victim, ctx) -> Embedded:
        # passports and user IDs: from the owner secret (passport_seed is in the embed key)
        p, d = self.params.model_copy(update={"passport_seed": ctx.owner_seed}), ctx.data
        isn = load_isn(ctx.inputs["isn"])
        key_image = ctx.inputs["isn"].secret()["key"]
        if key_image.shape[-1] != d.image_size:  # an ISN trained at another patch size
            key_image = to_uint8(_resize(uint8_float(key_image)[None], d.image_size)[0])
        images = owner_passports(p, d.image_size, d.channels)
        # a new module: its state-dict keys differ from the victim's (the embed stage compares)
        model = copy.deepcopy(victim)
        convert_to_passport(model, p.stages, uint8_float(images[0]), uint8_float(images[1]))
        model.to(ctx.device)
        stats = train_two_branch(model, images, ctx, p)
        ids = user_ids(p, d.image_size, d.channels)
        with torch.no_grad():
            cover = uint8_float(images[0])[None].expand(p.n_users, -1, -1, -1)
            user_passports = isn.hide(cover, uint8_float(ids)).clamp(0, 1)
        secret = {
            "passport_gamma": images[0],
            "passport_beta": images[1],
            "stages": p.stages,
            "user_ids": ids,
            "user_passports": user_passports,  # float: the 8-bit round trip is a metric
            "key": key_image,
            "stats": {f"train_{k}": float(v) for k, v in stats.items()},
        }
        spec = ctx.spec.replace(wrapper="passport", wrapper_params={"stages": p.stages})
        return Embedded(model, secret, spec)

    # verify -------------------------------------------------------------------------------

    def verify(self, model, key, ctx) -> WatermarkScore:
        p = self.params
        model, aligned = aligned_suspect(model, ctx, p.align)
        metrics: dict[str, float] = {**key.get("stats", {}), **aligned}
        test = ctx.data.test
        if not passport_layers(model):
            probe = probe_plain(model, key)
            det = detection(probe, layer_bits(probe, key["passport_gamma"])) if probe else 0.0
            metrics.update(passport_layers=0.0, ber=1 - det)
            return WatermarkScore(score=det, detected=False, threshold=p.threshold, metrics=metrics)
        with preserved(model) as layers:
            owner_bits = layer_bits(layers, key["passport_gamma"])
            metrics["passport_layers"] = float(len(layers))
            metrics["acc_dep"] = branch_accuracy(model, Mode.DEPLOYMENT, test, ctx.device)
            # as the model is: buffers an attacker may have replaced
            metrics["detection_current"] = detection(layers, owner_bits)
            metrics["acc_ver_current"] = branch_accuracy(model, Mode.VERIFICATION, test, ctx.device)
            # the owner's claim: its passport images reinstated
            install(model, key["passport_gamma"], key["passport_beta"])
            det = detection(layers, owner_bits)
            acc_ver = branch_accuracy(model, Mode.VERIFICATION, test, ctx.device)
            metrics.update(acc_ver=acc_ver, ber=1 - det, acc_gap=abs(metrics["acc_dep"] - acc_ver))
            metrics.update(self._licences(model, layers, key, ctx))
            if ctx.evidence is not None:
                metrics.update(self._evidence(model, layers, key, ctx))
        gap_ok = metrics["acc_gap"] <= p.acc_gap
        return WatermarkScore(
            score=det,
            detected=bool(det >= p.threshold and gap_ok),
            threshold=p.threshold,
            metrics={k: float(v) for k, v in metrics.items()},
        )

    def _licences(self, model, layers, key: dict, ctx) -> dict[str, float]:
        """User passports as licences: usable in the verification branch, carrying the owner's
        signature response (but not their own hash's), revealing their ID with the key only."""
        out: dict[str, float] = {}
        users = key["user_passports"]
        owner_bits = layer_bits(layers, key["passport_gamma"])
        own, vs_owner = [], []
        for u in range(len(users)):
            install(model, users[u], key["passport_beta"])
            vs_owner.append(detection(layers, owner_bits))
            own.append(detection(layers, layer_bits(layers, users[u])))
        out["user_detection_owner_bits"] = sum(vs_owner) / len(vs_owner)
        out["user_detection_own_hash"] = sum(own) / len(own)
        install(model, users[0], key["passport_beta"])
        out["user_acc_ver"] = branch_accuracy(model, Mode.VERIFICATION, ctx.data.test, ctx.device)
        install(model, key["passport_gamma"], key["passport_beta"])
        if "isn" not in ctx.inputs:  # a bare context (no store): no licence check
            return out
        isn = load_isn(ctx.inputs["isn"])
        size, channels = users.shape[-1], users.shape[1]
        cover = uint8_float(key["passport_gamma"])[None]
        out["stego_psnr"] = psnr(users, cover.expand_as(users)).mean().item()
        genuine = reveal_quality(isn, users, uint8_float(key["key"])[None], key["user_ids"])
        out.update({f"reveal_{k}": v for k, v in genuine.items()})
        rounded = reveal_quality(
            isn, uint8_float(to_uint8(users)), uint8_float(key["key"])[None], key["user_ids"]
        )
        out["reveal_psnr_8bit"] = rounded["psnr"]
        wrong = wrong_keys(size, channels, self.params.passport_seed)
        q = reveal_quality(isn, users, wrong["noise"], key["user_ids"])
        out.update({f"reveal_{k}_noise_key": v for k, v in q.items()})
        others = [reveal_quality(isn, users, k[None], key["user_ids"]) for k in wrong["other"]]
        for name in others[0]:
            values = [o[name] for o in others]
            out[f"reveal_{name}_other_key"] = sum(values) / len(values)
            out[f"reveal_{name}_other_key_max"] = max(values)
        # a typical wrong key (noise, or the mean natural image), and the best one tried
        out["reveal_key_gap_db"] = out["reveal_psnr"] - max(
            out["reveal_psnr_noise_key"], out["reveal_psnr_other_key"]
        )
        out["reveal_key_gap_worst_db"] = out["reveal_psnr"] - out["reveal_psnr_other_key_max"]
        return out

    def _evidence(self, model, layers, key: dict, ctx) -> dict[str, float]:
        """What an attacker claims with: forged passports, a forged licence, a forged key."""
        ev, out = ctx.evidence, {}
        kind = ev.get("kind")
        if kind == "forged_passport":
            gamma, beta = ev["passport_gamma"], ev["passport_beta"]
        elif kind == "forged_user_passport":
            gamma, beta = ev["passport"], key["passport_beta"]
        else:
            gamma = beta = None
        if gamma is not None:
            install(model, gamma, beta)
            # the claimant must show the signature its own passport hashes to
            out["forged_detection"] = detection(layers, layer_bits(layers, gamma))
            out["forged_detection_owner_bits"] = detection(
                layers, layer_bits(layers, key["passport_gamma"])
            )
            out["forged_acc_ver"] = branch_accuracy(
                model, Mode.VERIFICATION, ctx.data.test, ctx.device
            )
            out["forged_near_copy_psnr"] = psnr(
                uint8_float(gamma)[None], uint8_float(key["passport_gamma"])[None]
            ).item()
            install(model, key["passport_gamma"], key["passport_beta"])
        if "isn" not in ctx.inputs or kind not in ("forged_user_passport", "forged_key"):
            return out
        isn = load_isn(ctx.inputs["isn"])
        if kind == "forged_user_passport":
            forged = uint8_float(ev["passport"])[None]
            k = uint8_float(key["key"])[None]
            q = reveal_quality(isn, forged, k, ev["forged_id"][None])
            out.update({f"forged_reveal_{name}": v for name, v in q.items()})
            q = reveal_quality(isn, forged, k, key["user_ids"][ev["user"] : ev["user"] + 1])
            out["forged_reveal_psnr_genuine_id"] = q["psnr"]
        else:
            user = ev["user"]
            stego = key["user_passports"][user : user + 1]
            q = reveal_quality(isn, stego, uint8_float(ev["key"])[None], key["user_ids"][user:][:1])
            out.update({f"forged_key_reveal_{name}": v for name, v in q.items()})
        return out


__all__ = ["StegPassport", "StegPassportParams", "install", "uint8_float"]
