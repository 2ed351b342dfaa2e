"""DeepMarks (Chen, Rouhani, Fu, Zhao, Koushanfar, ICMR 2019): per-user fingerprints with an
anti-collusion codebook, on top of Uchida's white-box projection of one conv layer.

Codebook (`code: bibd`, the paper's): the AND anti-collusion code (AND-ACC) of a (v, k, 1)
balanced incomplete block design - v points, b blocks of k points, every pair of points in
exactly one block. User j's code is the complement of the j-th column of the v x b incidence
matrix, mapped to +-1: -1 on the points of block j, +1 elsewhere. Any two blocks share at most
one point, so the union of up to k - 1 blocks holds no other block whole: averaging up to
k - 1 codes leaves a pattern only those users explain. The design is built here: projective
planes PG(2, q) (v = b = q^2 + q + 1, k = q + 1; q = 2 is the Fano plane) and affine planes
AG(2, q) (v = q^2, b = q^2 + q, k = q) for primes q <= 31; the chosen one is the smallest
(fewest points, then blocks) with b >= n_users and k >= max_colluders + 1. `code: orthogonal`
(the paper's alternative): rows 1..n_users of a Hadamard matrix of the smallest power-of-two
order above n_users (row 0, all ones, is left out), so the codes are zero-mean and orthogonal.

Embedding: a secret projection X ~ N(0, 1) of T x M, M the marked conv's kernel-mean length
(`harness.methods.uchida`: the same layer rule and kernel mean, the middle conv with at least
`rows` values unless `layer` names one). Each code bit is spread over r = rows // v rows of X
(T = r v; WRT projects on 100 rows), so that a null model's chance correlation shrinks as
1 / sqrt(T), not 1 / sqrt(v). For every user u a copy of the victim is fine-tuned on the
owner's split with CE + gamma * MSE(X w, t_u), t_u the code repeated r times (gamma = 10 as
WRT; its U[0,1) projection is replaced by N(0, 1), as Uchida's, because Pearson correlation
ignores the common offset such a projection adds anyway). User 0's copy is the cell's marked
model; the others are the licensed copies `user1..` (`Embedded.copies`) a collusion attack
reads.

Verification: y = X w of the suspect; the Pearson correlation of y with each user's t_u.
The score (`code_corr`) is the best correlation, `identified_user` its user, `user_margin`
the gap to the second best. Detected iff the best correlation clears WRT's null-model
threshold over `n_null` victims of other seeds (their best correlation over the users; a
one-sided Gaussian at `p_value`, sigma floored at 1 / sqrt(T), the spread of one correlation
of an unrelated projection with a fixed code). `users_flagged`: users whose own correlation
clears that threshold.

Colluder tracing (`accused`), read only from a detected suspect: for `bibd` the AND-ACC rule.
Averaging the weights of colluding copies averages their kernel means exactly, hence their
projections: the per-bit mean b_i of y (over the bit's r rows) is +1 where no colluder's block
holds point i and lower elsewhere (0 for two colluders, -1 on the point all their blocks
share). A bit reads 1 iff b_i >= max_j |b_j| / 2 (half the embedded amplitude, measured on the
suspect itself so that a uniformly shrunk mark reads the same); the accused are the users
whose whole block lies in the bits that read 0. Up to k - 1 colluders this names exactly
them. For `orthogonal` codes the accused are `users_flagged`. When the attack says who
colluded (`collude`'s evidence: the licensed copies it averaged with the marked model,
user 0), `colluders_found` and `innocents_accused` count the accused among and outside them.

`align: true` (verify-only) matches the suspect's hidden channels to the marked model's
before reading the layer (`harness.alignment`), as for Uchida. A suspect without the layer
(another arch) scores 0 with `layer_found` 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats
from scipy.linalg import hadamard

from harness.alignment import ALIGN_METRICS, aligned_suspect
from harness.attacks import ATTACKS
from harness.config import resolve_component
from harness.decision import null_figures, null_model_metrics, null_threshold
from harness.errors import ConfigError
from harness.methods.base import Embedded, Method, Metric, VictimRef, WatermarkScore, register
from harness.methods.uchida import UchidaParams, kernel_mean, pick_layer
from harness.training import fit
from model_zoo import ModelSpec, create_model

MAX_Q = 31  # the largest prime order of the planes built
COPY_PREFIX = "user"  # licensed copies: user1 .. user{n_users - 1}; user 0 is the marked model


class DeepMarksParams(BaseModel):
    n_users: int = Field(4, ge=2, le=512, description="licensed copies, one code each")
    code: Literal["bibd", "orthogonal"] = Field(
        "bibd", description="AND anti-collusion code of a BIBD, or Hadamard rows"
    )
    max_colluders: int = Field(
        2, ge=1, le=MAX_Q, description="bibd: colluders the code resists (block size > this)"
    )
    rows: int = Field(
        100, ge=1, le=4096, description="projection rows T (each code bit on rows // v of them)"
    )
    gamma: float = Field(10.0, ge=0, description="weight of the MSE fingerprint term")
    layer: str | None = Field(
        None, description="module path of the marked conv (default: Uchida's rule for rows)"
    )
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr)")
    n_null: int = Field(3, ge=2, le=50, description="null models for the threshold")
    p_value: float = Field(0.05, gt=0, lt=0.5)
    align: bool = Field(
        False, description="match the suspect's neurons to the marked model's before reading"
    )

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- the codebook


@dataclass(frozen=True)
class Design:
    """A (v, k, 1) BIBD: `incidence[i, j]` is True iff point i lies on block j."""

    name: str
    v: int
    b: int
    k: int

    def incidence(self) -> torch.Tensor:
        kind, q = self.name.split(":")
        return projective_plane(int(q)) if kind == "PG" else affine_plane(int(q))


def primes(upto: int) -> list[int]:
    return [n for n in range(2, upto + 1) if all(n % d for d in range(2, math.isqrt(n) + 1))]


def projective_plane(q: int) -> torch.Tensor:
    """PG(2, q), q prime: points and lines are the 1-dim subspaces of GF(q)^3 (vectors whose
    first nonzero coordinate is 1); a point lies on a line iff their dot product is 0 mod q."""
    vecs = [(1, a, c) for a in range(q) for c in range(q)] + [(0, 1, c) for c in range(q)]
    vecs.append((0, 0, 1))
    pts = torch.tensor(vecs)
    return (pts @ pts.T) % q == 0


def affine_plane(q: int) -> torch.Tensor:
    """AG(2, q), q prime: points (x, y) of Z_q^2 (index x q + y); lines y = m x + c and x = c."""
    lines = [[x * q + (m * x + c) % q for x in range(q)] for m in range(q) for c in range(q)]
    lines += [[c * q + y for y in range(q)] for c in range(q)]
    inc = torch.zeros(q * q, len(lines), dtype=torch.bool)
    for j, pts in enumerate(lines):
        inc[pts, j] = True
    return inc


def designs() -> list[Design]:
    """Every plane built, smallest first (points, then blocks)."""
    out = []
    for q in primes(MAX_Q):
        out.append(Design(f"PG:{q}", q * q + q + 1, q * q + q + 1, q + 1))
        out.append(Design(f"AG:{q}", q * q, q * q + q, q))
    return sorted(out, key=lambda d: (d.v, d.b))


def pick_design(n_users: int, max_colluders: int) -> Design:
    for d in designs():
        if d.b >= n_users and d.k >= max_colluders + 1:
            return d
    raise ConfigError(
        f"no plane of prime order <= {MAX_Q} has {n_users} blocks of more than "
        f"{max_colluders} points",
        field="n_users",
        value=n_users,
    )


def and_acc_codes(incidence: torch.Tensor, n_users: int) -> torch.Tensor:
    """User j's code: the complement of incidence column j as +-1 (-1 on block j's points)."""
    return torch.where(incidence[:, :n_users].T, -1.0, 1.0)


def orthogonal_codes(n_users: int) -> torch.Tensor:
    """Rows 1..n_users of the smallest Hadamard matrix (order a power of two) above n_users."""
    order = 1 << n_users.bit_length()  # > n_users, so row 0 (all ones) can be left out
    return torch.tensor(hadamard(order)[1 : n_users + 1], dtype=torch.float32)


def codebook(p: DeepMarksParams) -> tuple[torch.Tensor, str]:
    """(n_users x v codes in +-1, a description of the code)."""
    if p.code == "orthogonal":
        codes = orthogonal_codes(p.n_users)
        return codes, f"hadamard({codes.shape[1]})"
    d = pick_design(p.n_users, p.max_colluders)
    kind, q = d.name.split(":")
    return and_acc_codes(d.incidence(), p.n_users), f"{kind}(2,{q}) v={d.v} b={d.b} k={d.k}"


def and_acc_accused(bit_means: torch.Tensor, codes: torch.Tensor) -> list[int]:
    """The AND-ACC rule on per-bit readings: a bit reads 1 iff it is at least half the largest
    |reading|; accused: users whose every -1 bit reads 0 (their block lies in the union)."""
    reads_one = bit_means >= bit_means.abs().max() / 2
    return [u for u, c in enumerate(codes) if not reads_one[c < 0].any()]


# ---------------------------------------------------------------------------- reading


def layer_params(p: DeepMarksParams) -> UchidaParams:
    return UchidaParams(n_bits=p.rows, layer=p.layer)


def choose_layer(model: nn.Module, p: DeepMarksParams) -> tuple[str, nn.Conv2d]:
    try:
        return pick_layer(model, layer_params(p))
    except ConfigError as e:
        field = "rows" if e.field == "n_bits" else e.field
        message = e.message.replace("n_bits", "rows")
        raise ConfigError(message, field=field, value=e.value, allowed=e.allowed) from None


def projection(model: nn.Module, key: dict) -> torch.Tensor | None:
    """y = X w of the model's marked layer (None: no such layer)."""
    module = dict(model.named_modules()).get(key["layer"])
    if not isinstance(module, nn.Conv2d) or module.weight[0].numel() != key["X"].shape[1]:
        return None
    with torch.no_grad():
        return key["X"] @ kernel_mean(module).detach().float().cpu()


def correlations(y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of `y` (T) with each row of `targets` (users x T)."""
    yc = y - y.mean()
    tc = targets - targets.mean(1, keepdim=True)
    denom = (tc.norm(dim=1) * yc.norm()).clamp_min(1e-12)
    return (tc @ yc) / denom


def targets_of(key: dict) -> torch.Tensor:
    return key["codes"].repeat_interleave(key["repeat"], dim=1)


def best_corr(model: nn.Module, key: dict) -> float:
    y = projection(model, key)
    return 0.0 if y is None else correlations(y, targets_of(key)).max().item()


def corr_p_value(r: float, n: int, users: int) -> float:
    """One-sided p of the best of `users` Pearson correlations over n values (t test with
    n - 2 degrees of freedom, Bonferroni over the users)."""
    if n <= 2:
        return 1.0
    r = min(max(r, -0.999999), 0.999999)
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return float(min(1.0, users * stats.t.sf(t, n - 2)))


@register("deepmarks")
class DeepMarks(Method):
    Params = DeepMarksParams
    wm_metric = "code_corr"
    metrics = (
        *null_model_metrics("best code correlation")[:2],
        Metric("p_value", "one-sided p of the best code correlation (t test, Bonferroni over "
               "users) against an unrelated projection", False),
        Metric("identified_user", "the user whose code correlates best (0: the marked copy; "
               "-1: no layer)", None),
        Metric("user_margin", "best minus second-best code correlation"),
        Metric("users_flagged", "users whose code correlation clears the threshold", None),
        Metric("accused", "users the colluder tracing accuses (bibd: AND-ACC rule; orthogonal: "
               "users_flagged; none if not detected)", None),
        Metric("code_length", "v: bits of each user's code", None),
        Metric("layer_found", "1 if the suspect has the marked layer (else scored 0)"),
        Metric("colluders", "collusion: users whose copies were averaged (from the attack)",
               None, optional=True),
        Metric("colluders_found", "collusion: true colluders among the accused", optional=True),
        Metric("innocents_accused", "collusion: accused users who did not collude", False,
               optional=True),
        *ALIGN_METRICS,
    )  # fmt: skip
    verify_params = ("align",)  # one marked model serves align: false and true

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_users": 3, "epochs": 2, "n_null": 2, "rows": 70}

    # ------------------------------------------------------------------ validation

    def check_data(self, dataset) -> None:
        p = self.params
        try:
            codes, _ = codebook(p)
        except ConfigError as e:
            raise ConfigError(e.message, field=e.field, value=e.value) from None
        if codes.shape[1] > p.rows:
            raise ConfigError(
                f"shorter than the code ({codes.shape[1]} bits): each bit needs a row",
                field="rows",
                value=p.rows,
            )

    def check_arch(self, arch: str, dataset) -> None:
        spec = ModelSpec(arch, max(2, dataset.num_classes), dataset.channels, dataset.image_size)
        try:
            choose_layer(create_model(spec), self.params)
        except ConfigError as e:
            raise ConfigError(f"arch {arch!r}: {e.message}", field=e.field, value=e.value,
                              allowed=e.allowed) from None  # fmt: skip

    def scenario_warnings(self, scenario) -> list[str]:
        """Collusion beyond the code's guarantee (more colluders than licensed copies is an
        error: `collude`'s `check_method`)."""
        out = []
        p = self.params
        for i, comp in enumerate(scenario.attacks):
            if comp.name != "collude":
                continue
            for params in resolve_component(comp, ATTACKS, f"attacks[{i}]", None):
                k = params.get("k", 0)
                if k <= p.n_users and p.code == "bibd" and k > p.max_colluders:
                    out.append(f"collude k={k} exceeds max_colluders={p.max_colluders}: the "
                               "AND-ACC code does not guarantee to trace them")  # fmt: skip
        return out

    def needs(self):
        """Null models: plain victims of the next `n_null` seeds (shared with those cells)."""
        return tuple(VictimRef(f"null{i}", seed_offset=1 + i) for i in range(self.params.n_null))

    # ------------------------------------------------------------------ embed

    def embed(self, victim, ctx) -> Embedded:
        p = self.params
        layer, conv = choose_layer(victim, p)
        codes, description = codebook(p)
        v = codes.shape[1]
        repeat = max(1, p.rows // v)
        g = torch.Generator().manual_seed(ctx.owner_seed)
        x_proj = torch.randn(v * repeat, conv.weight[0].numel(), generator=g)
        key = {"X": x_proj, "codes": codes, "repeat": repeat, "layer": layer,
               "code": description}  # fmt: skip
        targets = targets_of(key)
        x_dev = x_proj.to(ctx.device)
        pristine = copy.deepcopy(victim)
        copies = {}
        for u in range(p.n_users):
            model = victim if u == 0 else copy.deepcopy(pristine)
            _, marked_conv = choose_layer(model, p)
            self._fingerprint(model, marked_conv, x_dev, targets[u].to(ctx.device), ctx, u)
            if u:
                copies[f"{COPY_PREFIX}{u}"] = model.eval()
        nulls = [best_corr(ctx.inputs[f"null{i}"].model(), key) for i in range(p.n_null)]
        # chance 0.5 over T / 4 "keys": sigma floored at sqrt(0.25 * 4 / T) = 1 / sqrt(T)
        key.update(null_threshold(nulls, 0.5, len(targets[0]) / 4, p.p_value))
        return Embedded(victim.eval(), key, copies=copies)

    def _fingerprint(self, model, conv, x_dev, target, ctx, user: int) -> None:
        p = self.params

        def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            reg = F.mse_loss(x_dev @ kernel_mean(conv).float(), target)
            return F.cross_entropy(logits, y) + p.gamma * reg

        d = ctx.data.owner
        fit(model, d.x, d.y, ctx.train, ctx.device, ctx.seed + user, loss_fn=loss,
            epochs=p.epochs, lr=p.lr)  # fmt: skip

    # ------------------------------------------------------------------ verify

    def verify(self, model, key, ctx) -> WatermarkScore:
        model, aligned = aligned_suspect(model, ctx, self.params.align)
        codes, repeat, threshold = key["codes"], key["repeat"], key["threshold"]
        n_users, v = codes.shape
        y = projection(model, key)
        figures = {**null_figures(key), "code_length": float(v), **aligned}
        colluders = self._colluders(ctx)
        if colluders is not None:
            figures["colluders"] = float(len(colluders))
        if y is None:
            figures.update(p_value=1.0, identified_user=-1.0, user_margin=0.0, users_flagged=0.0,
                           accused=0.0, layer_found=0.0)  # fmt: skip
            if colluders is not None:
                figures.update(colluders_found=0.0, innocents_accused=0.0)
            return WatermarkScore(0.0, False, threshold, figures)
        corr = correlations(y, targets_of(key))
        top = corr.topk(2)
        best = top.values[0].item()
        detected = best >= threshold
        flagged = [u for u in range(n_users) if corr[u].item() >= threshold]
        if not detected:
            accused = []
        elif key["code"].startswith("hadamard"):
            accused = flagged
        else:
            accused = and_acc_accused(y.reshape(v, repeat).mean(1), codes)
        figures.update(
            p_value=corr_p_value(best, len(y), n_users),
            identified_user=float(top.indices[0].item()),
            user_margin=best - top.values[1].item(),
            users_flagged=float(len(flagged)),
            accused=float(len(accused)),
            layer_found=1.0,
        )
        if colluders is not None:
            found = len(set(accused) & colluders)
            figures.update(colluders_found=float(found),
                           innocents_accused=float(len(accused) - found))  # fmt: skip
        return WatermarkScore(best, detected, threshold, figures)

    @staticmethod
    def _colluders(ctx) -> set[int] | None:
        """The users whose copies a collusion attack averaged: the marked one (user 0) and
        the licensed copies it names in its evidence."""
        evidence = ctx.evidence or {}
        if "copies" not in evidence:
            return None
        users = {0}
        for name in evidence["copies"]:
            if name.startswith(COPY_PREFIX) and name[len(COPY_PREFIX) :].isdigit():
                users.add(int(name[len(COPY_PREFIX) :]))
        return users
