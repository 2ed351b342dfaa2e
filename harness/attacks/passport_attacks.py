"""Ambiguity attacks on Steganographic Passport models (CVPR 2024, section 5).

Ownership ambiguity: the attacker holds the stolen model's weights and tries to stand a forged
passport beside the owner's - `erb_ambiguity` (forged passport images plus a new residual TLP
trained on a share of the attacker's data, the paper's ERB) and `random_passport` (a random
passport, no training). Their passport images are the evidence; `verify` measures the forged
passport's signature detection against the bits its own SHA-512 hash gives (what a claimant
has to show), its detection against the owner's bits, and the verification accuracy it gets.

Licence ambiguity works on the ISN alone: `forged_user_passport` optimises a licence so that
the genuine key reveals a forged ID; `forged_key` optimises a key that reveals a user's genuine
ID from that user's passport. Both read what a licensed user holds (its user passport and ID
image) and the owner's ISN from the embed artifact; `forged_user_passport` also assumes the
owner's key has leaked (the worst case). The model is left unchanged.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, register
from harness.data import photo_patches
from harness.image_metrics import to_uint8
from harness.training import as_float, random_shift, train_loop
from model_zoo.isn import load_isn
from model_zoo.passport import (
    Mode,
    add_residual_tlp,
    capture_passports,
    passport_layers,
    set_mode,
    set_passports,
)

METHOD = ("steg_passport",)


def _forged_images(kind: str, channels: int, size: int, seed: int) -> torch.Tensor:
    """Two seeded starting passports (gamma, beta), float (2, C, size, size)."""
    if kind == "noise":
        g = torch.Generator().manual_seed(seed + 17)
        return torch.rand(2, channels, size, size, generator=g)
    x = photo_patches(2, size, seed + 7777)
    return x.mean(1, keepdim=True) if channels == 1 else x


def _install(model, images: torch.Tensor, grad: bool = False) -> None:
    captured = capture_passports(model, images, grad=grad)
    set_passports(model, [c[:1] for c in captured], [c[1:] for c in captured])


def _require_passports(model) -> None:
    if not passport_layers(model):
        raise ValueError("the marked model has no passport layers (not a steg_passport model)")


class RandomPassportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init: Literal["noise", "photo"] = Field("noise", description="uniform noise or photo patches")


@register("random_passport")
class RandomPassport(Attack):
    """A random forged passport pair put in the stolen model; no training."""

    Params = RandomPassportParams
    methods = METHOD

    def apply(self, model, ctx):
        _require_passports(model)
        spec = ctx.spec
        images = _forged_images(self.params.init, spec.in_chans, spec.img_size, ctx.seed)
        images = to_uint8(images)
        _install(model, images.float() / 255)
        evidence = {
            "kind": "forged_passport",
            "passport_gamma": images[0],
            "passport_beta": images[1],
        }
        return Attacked(model, spec, evidence)


class ErbParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_fraction: float = Field(0.1, gt=0, le=1, description="share of the attacker split")
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-4, gt=0, description="SGD lr (the paper's 1e-4)")
    momentum: float = Field(0.9, ge=0, lt=1)
    init: Literal["noise", "photo"] = "noise"


@register("erb_ambiguity")
class ErbAmbiguity(Attack):
    """ERB: forged passport images and a residual TLP on top of each passport layer's TLP,
    trained (CE on the verification branch) on a share of the attacker's data so the forged
    passports give a working verification branch; conv weights and BNs stay as stolen."""

    Params = ErbParams
    methods = METHOD

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1}

    def apply(self, model, ctx):
        _require_passports(model)
        p, spec, device = self.params, ctx.spec, ctx.device
        start = _forged_images(p.init, spec.in_chans, spec.img_size, ctx.seed)
        logits = torch.logit(start.clamp(0.02, 0.98)).to(device).requires_grad_(True)
        model = copy.deepcopy(model)  # new state-dict keys: a new module, not an edit in place
        residual = add_residual_tlp(model)
        model.to(device)
        params = [logits, *(q for r in residual for q in r.residual.parameters())]
        for q in model.parameters():
            q.requires_grad_(False)
        for r in residual:
            for q in r.residual.parameters():
                q.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum)
        split = ctx.data.attacker
        data = split.take(max(1, round(p.data_fraction * len(split))), seed=ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)

        def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xb, yb = as_float(data.x[idx], device), data.y[idx].to(device)
            if ctx.train.augment:
                xb = random_shift(xb, gen)
            _install(model, torch.sigmoid(logits), grad=True)
            model.eval()  # statistics stay the stolen model's; only the forgery learns
            set_mode(model, Mode.VERIFICATION)
            return xb, yb

        def loss_fn(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            loss = F.cross_entropy(model(b[0]).float(), b[1])
            set_mode(model, Mode.DEPLOYMENT)
            return loss

        train_loop(
            loss_fn, opt, n=len(data), batch_size=ctx.train.batch_size, epochs=p.epochs,
            generator=gen, batch=batch, device=device, amp=ctx.train.amp, cosine=False,
        )  # fmt: skip
        for q in model.parameters():
            q.requires_grad_(True)
        images = to_uint8(torch.sigmoid(logits))
        _install(model, images.float() / 255)
        wrapper = {**(spec.wrapper_params or {}), "residual_tlp": True}
        evidence = {
            "kind": "forged_passport",
            "passport_gamma": images[0],
            "passport_beta": images[1],
        }
        return Attacked(model.eval(), spec.replace(wrapper_params=wrapper), evidence)


class ForgeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam lr (the paper's 1e-3)")
    user: int = Field(0, ge=0, description="which user's licence is attacked")


def _isn_and_user(ctx, user: int):
    """The owner's ISN (public with the embed artifact) and the embed secret's material (the
    attacks below say which parts of it they use: what a licensed user holds)."""
    secret = ctx.marked.secret()
    n = len(secret["user_passports"])
    if user >= n:
        raise ValueError(f"`user` must be below the {n} issued licences but got {user}")
    return load_isn(ctx.marked.inputs["isn"]).to(ctx.device), secret


def _optimise(init: torch.Tensor, loss_fn, steps: int, lr: float) -> torch.Tensor:
    """Adam on an image kept in [0, 1] through a sigmoid."""
    logits = torch.logit(init.clamp(1e-3, 1 - 1e-3)).detach().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    train_loop(lambda _: loss_fn(torch.sigmoid(logits)), opt, steps=steps, amp=False, cosine=False)
    return torch.sigmoid(logits).detach()


class ForgedUserPassportParams(ForgeParams):
    fidelity_weight: float = Field(
        1.0, ge=0, description="weight of MSE to the genuine licence (keeps a near copy)"
    )


@register("forged_user_passport")
class ForgedUserPassport(Attack):
    """A licence forged from a genuine one (held by the user) so that the owner's key (assumed
    leaked) reveals a forged ID: Adam on the passport pixels, from the genuine licence."""

    Params = ForgedUserPassportParams
    methods = METHOD

    @classmethod
    def tiny_params(cls) -> dict:
        return {"steps": 5}

    def apply(self, model, ctx):
        p = self.params
        isn, secret = _isn_and_user(ctx, p.user)
        dev = ctx.device
        genuine = secret["user_passports"][p.user : p.user + 1].float().to(dev)
        key = (secret["key"].float() / 255)[None].to(dev)
        forged_id = photo_patches(1, genuine.shape[-1], ctx.seed + 9191)
        if genuine.shape[1] == 1:
            forged_id = forged_id.mean(1, keepdim=True)
        forged_id = forged_id.to(dev)

        def loss(x):
            reveal = F.mse_loss(isn.reveal(x, key), forged_id)
            return reveal + p.fidelity_weight * F.mse_loss(x, genuine)

        forged = _optimise(genuine, loss, p.steps, p.lr)
        evidence = {
            "kind": "forged_user_passport",
            "passport": forged[0].cpu(),
            "forged_id": to_uint8(forged_id[0]),
            "user": p.user,
        }
        return Attacked(model, evidence=evidence)


@register("forged_key")
class ForgedKey(Attack):
    """A key forged to reveal a user's genuine ID from that user's passport (both user-held):
    Adam on the key pixels from uniform noise."""

    Params = ForgeParams
    methods = METHOD

    @classmethod
    def tiny_params(cls) -> dict:
        return {"steps": 5}

    def apply(self, model, ctx):
        p = self.params
        isn, secret = _isn_and_user(ctx, p.user)
        dev = ctx.device
        stego = secret["user_passports"][p.user : p.user + 1].float().to(dev)
        target = (secret["user_ids"][p.user : p.user + 1].float() / 255).to(dev)
        g = torch.Generator().manual_seed(ctx.seed + 31)
        init = torch.rand(stego.shape, generator=g).to(dev)
        key = _optimise(init, lambda k: F.mse_loss(isn.reveal(stego, k), target), p.steps, p.lr)
        evidence = {"kind": "forged_key", "key": key[0].cpu(), "user": p.user}
        return Attacked(model, evidence=evidence)
