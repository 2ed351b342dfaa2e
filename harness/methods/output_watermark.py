"""Output watermarking of image-processing networks (Zhang et al., AAAI 2020 / TPAMI 2021).

The owner serves M followed by a barrier H that hides a watermark image delta in every output
(B' = H(B, delta)); a secret extractor R recovers delta from B' - and from the outputs of any
surrogate an attacker trains on (A, B') pairs - while returning a blank image delta0 for
unmarked images. Two-stage training:

1. initial (`aux/initial`, shared by every setting of the adversarial stage): H, R and a
   PatchGAN D jointly, L = L_emb + L_ext with
   L_emb = l1 MSE(B', B) + l2 perceptual(B', B) + l3 adv(D(B')),
   L_ext = l4 MSE(R(B'), delta) + l5 [MSE(R(A), delta0) + MSE(R(B), delta0)]
           + l6 consistency (MSE between extractions of different watermarked outputs);
   every MSE x `mse_scale` (the public code's 10,000); Adam 2e-4, beta1 0.5.
2. adversarial (`adversarial: true`): the owner simulates the attacker on its own data - a
   surrogate per entry of `sim_arch` trained on (A, B') and, as negatives (`sim_clean`), one
   of the same architecture on the unmarked (A, B) - then fine-tunes R alone on all their
   outputs (-> delta, resp. -> delta0) beside B' (-> delta), A and B (-> delta0), Adam 1e-4.

Simulated surrogates. `sim_arch` is one image2image name or a list of them; `sim_loss` is one
loss for every entry or a list of the same length, paired with `sim_arch` entry by entry
(`sim_arch: [unet, unet], sim_loss: [l1, l2]` simulates one U-Net per loss). Each surrogate
is its own cached aux step (`aux/output_watermark/sim_<arch>_<loss>`, and
`sim_clean_<arch>_<loss>` for its unmarked twin), keyed by what it depends on only - the
stage-1 model (resp. the victim), its arch and loss, `sim_epochs`, `lr`, `batch_size` - so a
{U-Net, ResNet-9} setting reuses the U-Net surrogates of a {U-Net} setting. A list is one
value, not a grid axis; a list of lists sweeps (`sim_arch: [[unet], [unet, resnet9]]`).

Departures from the paper (METHODS.md: stage 2 trains one surrogate, then fine-tunes R on its
outputs -> delta and on clean images -> delta0):
- several simulated surrogates at once (a list): at laptop scale one simulated U-Net teaches R
  nothing that transfers to ResNet surrogates, and one simulated ResNet-9 costs the U-Net ones;
- the negatives also hold a surrogate of unmarked outputs per simulated pair (`sim_clean`,
  the control the paper reports false positives on);
- each negative sample weighs `neg_weight` against 1 per positive sample (1: the paper's
  l4 = l5 = 1); with more simulated surrogates R sees more surrogate-like positives, and a
  larger weight keeps it from firing on unmarked surrogates' outputs.

Verification queries the suspect with the test inputs, rounds its outputs to 8 bits (as a
service returns them) and scores the share of outputs whose extraction has NC > 0.95.
"""

from __future__ import annotations

import functools
import json
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.errors import ConfigError
from harness.image_metrics import centred_nc, nc, psnr, ssim, success_rate
from harness.image_training import (
    GAN_MIN_SIZE,
    PerceptualLoss,
    adam,
    discriminator_step,
    lsgan,
    quantised_outputs,
    train_image_model,
)
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
from harness.training import as_float, predict_images, train_loop
from model_zoo.image2image import (
    Barrier,
    Extractor,
    PatchDiscriminator,
    check_image2image,
    check_image_size,
    create_image2image,
    unet_min_size,
)
from results.analysis import label, metric

BUILTIN_WATERMARKS = ("cameraman", "coins", "text")
MIN_DARK_AREA = 0.4  # plain NC of a white image against a logo is sqrt(1 - dark share)
NC_THRESHOLD = 0.95
# Parameters of the adversarial stage and of verification: stage 1 does not depend on them.
STAGE2_PARAMS = {
    "adversarial", "sim_arch", "sim_loss", "sim_epochs", "r_epochs", "r_lr", "sim_clean",
    "neg_weight", "detect_rate",
}  # fmt: skip
# What a simulated surrogate's aux step is keyed by besides its step name (arch, loss) and
# its upstream (the stage-1 model, or the victim for the unmarked twin).
SIM_KEY = ("sim_epochs", "lr", "batch_size")
SimLoss = Literal["l1", "l2"]


class OutputWatermarkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    watermark: Literal["cameraman", "coins", "text"] = Field(
        "cameraman", description="built-in watermark (a shipped photo, median-thresholded)"
    )
    watermark_path: str | None = Field(
        None, description="a user watermark image (image_size x image_size); overrides watermark"
    )
    h_width: int = Field(64, ge=1, le=512, description="barrier U-Net base width")
    h_depth: int = Field(5, ge=1, le=9, description="barrier U-Net depth (input >= 2**depth)")
    r_width: int = Field(64, ge=1, le=512, description="extractor base width")
    d_width: int = Field(64, ge=1, le=512, description="PatchGAN base width")
    lambda1: float = Field(1.0, ge=0, description="MSE(B', B)")
    lambda2: float = Field(0.0, ge=0, description="perceptual(B', B); the code's default: off")
    lambda3: float = Field(0.01, ge=0, description="adversarial (PatchGAN) on B'")
    lambda4: float = Field(1.0, ge=0, description="MSE(R(B'), delta)")
    lambda5: float = Field(1.0, ge=0, description="MSE(R(A), delta0) + MSE(R(B), delta0)")
    lambda6: float = Field(1.0, ge=0, description="consistency of extractions")
    mse_scale: float = Field(10_000.0, gt=0, description="every MSE x this (the public code)")
    epochs: int = Field(30, ge=1, description="initial stage epochs")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    adversarial: bool = Field(True, description="run the second (adversarial) stage")
    sim_arch: str | list[str] = Field(
        "unet",
        description="the owner's simulated surrogate(s) (image2image names); a list trains one "
        "per entry (not a grid axis: a list of lists sweeps)",
    )
    sim_loss: SimLoss | list[SimLoss] = Field(
        "l2", description="one loss for every simulated surrogate, or one per sim_arch entry"
    )
    sim_epochs: int = Field(20, ge=1)
    r_epochs: int = Field(10, ge=1, description="extractor fine-tuning epochs (stage 2)")
    r_lr: float = Field(1e-4, gt=0)
    sim_clean: bool = Field(
        True, description="stage 2 also shows R a surrogate of unmarked outputs (-> delta0)"
    )
    neg_weight: float = Field(
        1.0, ge=0, description="stage 2: weight of each negative sample (A, B, unmarked "
        "surrogates' outputs -> delta0) against 1 per positive; 1 = the paper's l4 = l5",
    )  # fmt: skip
    detect_rate: float = Field(
        0.5, gt=0, lt=1, description="detected iff the success rate reaches this"
    )

    @field_validator("sim_arch")
    @classmethod
    def _known_arch(cls, v: str | list[str]) -> str | list[str]:
        for i, name in enumerate(as_list(v)):
            try:
                check_image2image(name)
            except ConfigError as e:
                where = f"sim_arch[{i}] " if isinstance(v, list) else ""
                raise type(e)(
                    f"{where}{e.message}", value=e.value, allowed=e.allowed, hint=e.hint
                ) from None
        return v

    @model_validator(mode="after")
    def _pairs(self) -> OutputWatermarkParams:
        archs, losses = as_list(self.sim_arch), as_list(self.sim_loss)
        if not archs:
            raise ConfigError(
                "an empty list simulates no surrogate", field="sim_arch", value=[],
                allowed="an image2image name or a non-empty list of them",
            )  # fmt: skip
        if not losses or len(losses) not in (1, len(archs)):
            raise ConfigError(
                f"sim_loss pairs with sim_arch entry by entry: {len(archs)} archs, "
                f"{len(losses)} losses",
                field="sim_loss",
                value=self.sim_loss,
                allowed=f"one loss (l1 or l2) or a list of {len(archs)}",
            )
        seen: set[tuple[str, str]] = set()
        for i, pair in enumerate(sim_pairs(self)):
            if pair in seen:
                raise ConfigError(
                    f"{pair[0]} with {pair[1]} is simulated twice",
                    field=f"sim_arch[{i}]",
                    value=pair[0],
                    allowed="distinct (sim_arch, sim_loss) pairs",
                )
            seen.add(pair)
        return self


def as_list(value: str | list[str]) -> list[str]:
    return list(value) if isinstance(value, list) else [value]


def sim_pairs(p: OutputWatermarkParams) -> list[tuple[str, str]]:
    """(arch, loss) of each simulated surrogate: sim_loss pairs with sim_arch entry by entry,
    or one loss goes with every arch."""
    archs, losses = as_list(p.sim_arch), as_list(p.sim_loss)
    return list(zip(archs, losses * len(archs) if len(losses) == 1 else losses, strict=True))


def sim_step(arch: str, loss: str, clean: bool) -> str:
    """The aux step (and artifact folder) of a simulated surrogate; ':' of timm names is kept
    out of the path."""
    return f"sim{'_clean' if clean else ''}_{arch.replace(':', '-')}_{loss}"


def _threshold_dark(grey: np.ndarray, size: int) -> torch.Tensor:
    """A photo as a binary (1, size, size) logo: below its median -> 0 (dark), else 1."""
    img = torch.from_numpy(grey.astype(np.float32))[None, None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)[0]
    return (img > img.median()).float()


@functools.lru_cache(maxsize=16)
def builtin_watermark(name: str, size: int) -> torch.Tensor:
    import skimage.data  # lazy: start-up time
    from skimage.color import rgb2gray  # lazy: start-up time

    photo = np.asarray(getattr(skimage.data, {"cameraman": "camera"}.get(name, name))())
    return _threshold_dark(rgb2gray(photo) if photo.ndim == 3 else photo, size)


def _user_watermark(path: str, size: int) -> torch.Tensor:
    from PIL import Image  # lazy: start-up time

    try:
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255
    except FileNotFoundError:
        raise ConfigError(
            "watermark image not found", field="watermark_path", value=path
        ) from None
    except OSError as e:
        raise ConfigError(
            f"not a readable image: {e}", field="watermark_path", value=path
        ) from None
    if grey.shape != (size, size):
        raise ConfigError(
            f"the watermark must be image_size x image_size ({size}x{size}), got "
            f"{grey.shape[1]}x{grey.shape[0]}",
            field="watermark_path",
            value=path,
            allowed=f"{size}x{size}",
        )
    return torch.from_numpy(grey)[None]


def dark_area(delta: torch.Tensor) -> float:
    return float((delta < 0.5).float().mean())


@register("output_watermark")
class OutputWatermark(Method):
    Params = OutputWatermarkParams
    version = "2"  # stage 2: simulated surrogates as aux steps, a list of them, neg_weight
    wm_metric = "success_rate"
    tasks = ("image2image",)
    metrics = (
        Metric("nc", "mean NC of the extractions against the watermark"),
        Metric("centred_nc", "mean NC after centring (a blank extraction scores ~0)"),
        Metric("fp_clean", "false-positive rate on clean inputs and ground truth", False),
        Metric("nc_clean", "mean NC of clean images' extractions", False),
        Metric("wm_psnr", "invisibility: served output vs the model's own (dB)", optional=True),
        Metric("wm_ssim", "invisibility: SSIM of served vs own output", optional=True),
    )
    summary_title = "output watermarking (success = share of outputs with NC > 0.95)"
    report_figures = (
        Bars(
            "success rate per surrogate (outputs: unmarked = the false-positive control)",
            x=("settings", "attack", "outputs"),
            y=("success_rate", "fp_clean"),
            ylabel="share of outputs with NC > 0.95",
        ),
        Bars(
            "invisibility of the served watermark and the surrogate's task PSNR",
            x=("settings", "attack", "outputs"),
            y=("wm_psnr", "task_psnr"),
            ylabel="PSNR (dB)",
            hline=30.0,
        ),
    )

    @classmethod
    def tiny_params(cls) -> dict:
        return {
            "h_width": 8, "r_width": 8, "d_width": 8, "epochs": 20, "lr": 0.002,
            "batch_size": 8, "sim_arch": "cnet@8", "sim_epochs": 1, "r_epochs": 1,
        }  # fmt: skip

    @classmethod
    def summary_table(cls, df):
        """Per setting and attack: the success rate (share of outputs whose extraction has
        NC > 0.95), mean NC and centred NC, the false-positive rate on clean images, the served
        model's invisibility (PSNR / SSIM of B' vs B) and the attacked model's task PSNR. Rows
        of `surrogate` with `outputs: unmarked` are the control: their success rate is the
        false-positive rate on a surrogate of unmarked outputs."""
        attack = df["attack_params"].map(lambda p: json.loads(p or "{}"))
        d = df.assign(
            settings=label(df, "method", "method_params"),
            attack=label(df, "attack", "attack_params"),
            outputs=attack.map(lambda p: p.get("outputs", "marked")),
            **{m: metric(df, m) for m in ("nc", "centred_nc", "fp_clean")},
            wm_psnr=metric(df, "wm_psnr_marked"),
            wm_ssim=metric(df, "wm_ssim_marked"),
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

    # ------------------------------------------------------------------ validation

    def watermark(self, size: int, channels: int) -> torch.Tensor:
        p = self.params
        grey = _user_watermark(p.watermark_path, size) if p.watermark_path else None
        grey = builtin_watermark(p.watermark, size) if grey is None else grey
        if dark_area(grey) < MIN_DARK_AREA:
            raise ConfigError(
                f"the watermark's dark area is {dark_area(grey):.0%}, below "
                f"{MIN_DARK_AREA:.0%}: plain NC of a blank extraction against it would be "
                f"{(1 - dark_area(grey)) ** 0.5:.2f}, too close to the 0.95 threshold",
                field="watermark_path" if p.watermark_path else "watermark",
                value=p.watermark_path or p.watermark,
            )
        return grey.expand(channels, -1, -1).clone()

    def check_data(self, dataset) -> None:
        p, size = self.params, dataset.image_size
        need = unet_min_size(p.h_depth)
        if size < need or size % need:
            raise ConfigError(
                f"a barrier U-Net of depth {p.h_depth} needs an image size that is a multiple "
                f"of {need}; dataset.image_size is {size}",
                field="h_depth",
                value=p.h_depth,
                allowed=[d for d in range(1, 10) if size % unet_min_size(d) == 0],
            )
        if p.lambda3 > 0 and size < GAN_MIN_SIZE:
            raise ConfigError(
                f"the PatchGAN needs images of at least {GAN_MIN_SIZE} px (image_size {size})",
                field="lambda3",
                value=p.lambda3,
                allowed="0 (no adversarial loss) or a larger dataset.image_size",
            )
        self.watermark(size, dataset.channels)
        if p.adversarial:
            for i, arch in enumerate(as_list(p.sim_arch)):
                try:
                    check_image_size(arch, size, dataset.channels)
                except ConfigError as e:
                    field = f"sim_arch[{i}]" if isinstance(p.sim_arch, list) else "sim_arch"
                    raise e.with_location(None, field) from None

    # ------------------------------------------------------------------ stages

    def aux_steps(self) -> list[AuxStep]:
        """Stage 1 depends on the victim and the stage-1 params only: the with / without
        adversarial-stage rows of a grid share it. Stage 2's simulated surrogates: one step
        per (arch, loss) on the stage-1 model's outputs, and its twin on the victim's (the
        unmarked outputs), each shared by every setting that simulates that pair."""
        steps = [AuxStep("initial", self.initial, params="all", exclude=STAGE2_PARAMS)]
        if not self.params.adversarial:
            return steps
        for arch, loss in sim_pairs(self.params):
            run = functools.partial(self.simulate, arch, loss, clean=False)
            steps.append(AuxStep(sim_step(arch, loss, False), run, ("initial",), SIM_KEY))
            if self.params.sim_clean:
                run = functools.partial(self.simulate, arch, loss, clean=True)
                steps.append(AuxStep(sim_step(arch, loss, True), run, (VictimRef(),), SIM_KEY))
        return steps

    def initial(self, ctx) -> AuxOutput:
        p, data = self.params, ctx.data
        victim_art = ctx.inputs["victim"]
        victim, spec = victim_art.model(), victim_art.spec
        delta = self.watermark(data.image_size, data.channels)
        wrap = {"width": p.h_width, "depth": p.h_depth}
        spec = spec.replace(wrapper="barrier", wrapper_params=wrap)
        marked = Barrier(victim, data.channels, data.image_size, p.h_width, p.h_depth)
        marked.delta.copy_(delta[None])
        marked.to(ctx.device)
        extractor = Extractor(data.channels, data.channels, p.r_width).to(ctx.device)
        stats = self._initial(marked, extractor, ctx)
        secret = {"extractor": extractor.state_dict(), "delta": delta, "r_width": p.r_width}
        return AuxOutput(model=marked, spec=spec, secret=secret, meta={"train": stats})

    def simulate(self, arch: str, loss: str, ctx, clean: bool) -> AuxOutput:
        """The owner's simulated attacker: a surrogate `arch` trained with `loss` on the owner's
        inputs and the stage-1 model's outputs B' (`clean`: the victim's own outputs B)."""
        p, dev, owner = self.params, ctx.device, ctx.data.owner
        source = ctx.inputs["victim" if clean else "initial"]
        targets = quantised_outputs(source.model(), owner.x, dev)
        channels = owner.x.shape[1]
        sim = create_image2image(arch, channels, channels).to(dev)
        stats = train_image_model(
            sim, owner.x, targets, loss=loss, epochs=p.sim_epochs, lr=p.lr,
            batch_size=p.batch_size, device=dev, seed=ctx.seed + 1, amp=ctx.train.amp,
        )  # fmt: skip
        spec = source.spec.replace(arch=arch, wrapper=None, wrapper_params=None)
        meta = {"train": stats, "outputs": "unmarked" if clean else "marked", "loss": loss}
        return AuxOutput(model=sim.eval(), spec=spec, meta=meta)

    def embed(self, victim, ctx) -> Embedded:
        initial = ctx.inputs["initial"]
        marked, spec = initial.model(), initial.spec
        secret = initial.secret()
        if self.params.adversarial:
            extractor = self._extractor(secret, ctx.device)
            pairs, p = sim_pairs(self.params), self.params
            sims = [ctx.inputs[sim_step(a, lo, False)].model() for a, lo in pairs]
            clean = [ctx.inputs[sim_step(a, lo, True)].model() for a, lo in pairs if p.sim_clean]
            self._adversarial(marked, extractor, sims, clean, ctx)
            secret = {**secret, "extractor": extractor.state_dict()}
        return Embedded(marked, secret, spec)

    # ------------------------------------------------------------------ training

    def _initial(self, marked: Barrier, extractor: Extractor, ctx) -> dict[str, float]:
        p, dev = self.params, ctx.device
        owner = ctx.data.owner
        b_all = quantised_outputs(marked.base, owner.x, dev)  # M's outputs: what H watermarks
        marked.base.requires_grad_(False).eval()
        delta = marked.delta
        delta0 = torch.ones_like(delta)
        disc = PatchDiscriminator(delta.shape[1], p.d_width).to(dev) if p.lambda3 > 0 else None
        perceptual = PerceptualLoss(delta.shape[1]).to(dev) if p.lambda2 > 0 else None
        opt = adam([*marked.barrier.parameters(), *extractor.parameters()], p.lr)
        opt_d = adam(disc.parameters(), p.lr) if disc is not None else None
        last: dict[str, torch.Tensor] = {}  # the step's B and B', for the discriminator

        def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return p.mse_scale * F.mse_loss(a, b)

        def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return as_float(owner.x[idx], dev), as_float(b_all[idx], dev)

        def loss_fn(ab: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            a, b = ab
            marked_b = marked.hide(b).float()
            last.update(b=b, marked_b=marked_b)
            loss = p.lambda1 * mse(marked_b, b)
            if perceptual is not None:
                loss = loss + p.lambda2 * perceptual(marked_b, b)
            if disc is not None:
                loss = loss + p.lambda3 * lsgan(disc(marked_b).float(), True)
            ext = extractor(marked_b).float()
            target = delta.expand_as(ext)
            loss = loss + p.lambda4 * mse(ext, target)
            blank = delta0.expand(2 * len(b), -1, -1, -1)
            loss = loss + p.lambda5 * mse(extractor(torch.cat([a, b])).float(), blank)
            if len(b) > 1:
                loss = loss + p.lambda6 * mse(ext, ext.roll(1, dims=0))
            return loss

        def disc_step() -> None:
            discriminator_step(disc, opt_d, last["b"], last["marked_b"], dev, ctx.train.amp)

        stats = train_loop(
            loss_fn, opt, n=len(b_all), batch_size=p.batch_size, epochs=p.epochs,
            generator=torch.Generator().manual_seed(ctx.seed), batch=batch, device=dev,
            amp=ctx.train.amp, modules=[marked.barrier, extractor],
            after_step=disc_step if disc is not None else None,
        )  # fmt: skip
        marked.eval()
        return stats

    def _adversarial(
        self, marked: Barrier, extractor: Extractor, sims: list, clean_sims: list, ctx
    ) -> None:
        """Fine-tune R alone: B' and the simulated surrogates' outputs -> delta (weight 1 per
        sample); A, B and the unmarked surrogates' outputs -> delta0 (`neg_weight` each)."""
        p, dev, owner = self.params, ctx.device, ctx.data.owner
        positives = [quantised_outputs(m, owner.x, dev) for m in (marked, *sims)]
        negatives = [owner.x] + [quantised_outputs(m, owner.x, dev)
                                 for m in (marked.base, *clean_sims)]  # fmt: skip
        x = torch.cat(positives + negatives)
        is_marked = torch.cat([torch.ones(len(t)) for t in positives]
                              + [torch.zeros(len(t)) for t in negatives])  # fmt: skip
        delta, delta0 = marked.delta, torch.ones_like(marked.delta)
        opt = adam(extractor.parameters(), p.r_lr)

        def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return as_float(x[idx], dev), is_marked[idx].to(dev).view(-1, 1, 1, 1)

        def loss_fn(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            xb, pos = b
            target = pos * delta + (1 - pos) * delta0
            per_sample = (extractor(xb).float() - target).pow(2).flatten(1).mean(1)
            weight = pos.flatten() + (1 - pos.flatten()) * p.neg_weight
            return p.mse_scale * (weight * per_sample).mean()

        train_loop(
            loss_fn, opt, n=len(x), batch_size=p.batch_size, epochs=p.r_epochs,
            generator=torch.Generator().manual_seed(ctx.seed + 2), batch=batch, device=dev,
            amp=ctx.train.amp, modules=[extractor],
        )  # fmt: skip

    # ------------------------------------------------------------------ verification

    @staticmethod
    def _extractor(secret: dict, device) -> Extractor:
        channels = secret["delta"].shape[0]
        extractor = Extractor(channels, channels, secret["r_width"])
        extractor.load_state_dict(secret["extractor"])
        return extractor.to(device).eval()

    def verify(self, model, key, ctx) -> WatermarkScore:
        test = ctx.data.test
        extractor = self._extractor(key, ctx.device)
        delta = key["delta"][None]
        outputs = quantised_outputs(model, test.x, ctx.device)
        ext = predict_images(extractor, outputs, ctx.device)
        nc_values = nc(ext, delta.expand_as(ext))
        rate = success_rate(nc_values, NC_THRESHOLD)
        clean = torch.cat([test.x, test.y])  # unprocessed inputs and ground-truth images
        clean_ext = predict_images(extractor, clean, ctx.device)
        metrics = {
            "nc": nc_values.mean().item(),
            "centred_nc": centred_nc(ext, delta.expand_as(ext)).mean().item(),
            "fp_clean": success_rate(nc(clean_ext, delta.expand_as(clean_ext)), NC_THRESHOLD),
            "nc_clean": nc(clean_ext, delta.expand_as(clean_ext)).mean().item(),
        }
        if isinstance(model, Barrier):  # invisibility: B' against M's own output B
            unmarked = as_float(quantised_outputs(model.base, test.x, ctx.device))
            served = as_float(outputs)
            metrics["wm_psnr"] = psnr(served, unmarked).mean().item()
            metrics["wm_ssim"] = ssim(served, unmarked).mean().item()
        threshold = self.params.detect_rate
        return WatermarkScore(
            score=rate, detected=rate >= threshold, threshold=threshold, metrics=metrics
        )
