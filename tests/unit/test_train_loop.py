"""`train_loop`, the one optimisation loop: batching and shuffling, both modes, the shared
non-finite-loss failure, gradient clipping, the cosine schedule, hooks and statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from harness.config import TrainCfg
from harness.errors import CellFailed
from harness.training import fit, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(seed: int = 0) -> tuple[nn.Linear, torch.optim.SGD]:
    torch.manual_seed(seed)
    net = nn.Linear(4, 1)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def _mse(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda idx: ((net(x[idx]) - y[idx]) ** 2).mean()


def test_epoch_mode_slices_a_seeded_permutation_per_epoch_last_batch_partial():
    net, opt = _linear()
    seen: list[torch.Tensor] = []

    def loss_fn(idx):
        seen.append(idx)
        return net(torch.ones(len(idx), 4)).sum() * 0

    stats = train_loop(
        loss_fn, opt, n=10, batch_size=4, epochs=2, generator=torch.Generator().manual_seed(5)
    )
    assert [len(i) for i in seen] == [4, 4, 2, 4, 4, 2]
    g = torch.Generator().manual_seed(5)
    assert torch.equal(torch.cat(seen[:3]), torch.randperm(10, generator=g))
    assert torch.equal(torch.cat(seen[3:]), torch.randperm(10, generator=g))
    assert stats["steps"] == 6


def test_batch_runs_before_the_loss_and_draws_after_the_epoch_permutation():
    """What `fit`'s augmentation relies on: a draw from the generator in `batch` comes after
    that epoch's permutation, so the sequence is perm, draw, draw, perm, draw, draw."""
    net, opt = _linear()
    g = torch.Generator().manual_seed(1)
    draws: list[int] = []

    def batch(idx):
        draws.append(int(torch.randint(0, 1000, (1,), generator=g)))
        return idx

    train_loop(lambda idx: net(torch.ones(1, 4)).sum() * 0, opt, n=4, batch_size=2, epochs=2,
               generator=g, batch=batch)  # fmt: skip
    ref = torch.Generator().manual_seed(1)
    expected = []
    for _ in range(2):
        torch.randperm(4, generator=ref)
        expected += [int(torch.randint(0, 1000, (1,), generator=ref)) for _ in range(2)]
    assert draws == expected


def test_step_mode_passes_the_step_number_and_counts_batch_size_examples():
    net, opt = _linear()
    steps: list[int] = []

    def loss_fn(step):
        steps.append(step)
        return (net(torch.ones(1, 4)) ** 2).mean()

    stats = train_loop(loss_fn, opt, steps=5, batch_size=8)
    assert steps == [0, 1, 2, 3, 4]
    assert stats["steps"] == 5
    assert stats["images_per_s"] > 0


def test_one_of_n_or_steps():
    net, opt = _linear()
    with pytest.raises(ValueError, match="either `n`"):
        train_loop(lambda s: net(torch.ones(1, 4)).sum(), opt)
    with pytest.raises(ValueError, match="either `n`"):
        train_loop(lambda s: net(torch.ones(1, 4)).sum(), opt, n=3, steps=3)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_fails_the_cell_with_the_shared_message(bad: float):
    net, opt = _linear()
    calls: list[int] = []

    def loss_fn(idx):
        calls.append(len(idx))
        value = net(torch.ones(len(idx), 4)).mean()
        return value * 0 + bad if len(calls) == 5 else value  # epoch 1, step 1

    with pytest.raises(CellFailed, match=rf"^non-finite loss \({bad}\) at epoch 1, step 1$"):
        train_loop(loss_fn, opt, n=9, batch_size=3, epochs=3,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    with pytest.raises(CellFailed, match=r"^non-finite loss \(nan\) at step 2$"):
        train_loop(lambda s: net(torch.ones(1, 4)).sum() * (math.nan if s == 2 else 1.0),
                   opt, steps=4)  # fmt: skip


def test_a_non_finite_term_of_a_dict_loss_fails_too():
    net, opt = _linear()
    with pytest.raises(CellFailed, match=r"non-finite loss \(nan\) at step 0"):
        train_loop(lambda s: {"a": net(torch.ones(1, 4)).sum(), "b": torch.tensor(math.nan)},
                   opt, steps=1)  # fmt: skip


def test_fit_fails_the_cell_on_a_non_finite_loss():
    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(CellFailed, match=r"^non-finite loss \(nan\) at epoch 0, step 0$"):
        fit(model, x, torch.zeros(8, dtype=torch.long), TrainCfg(epochs=1, batch_size=4),
            "cpu", 0, loss_fn=lambda out, t: out.sum() * math.nan)  # fmt: skip


def _grad_norms(clip: float | None) -> list[float]:
    torch.manual_seed(0)
    net = nn.Linear(16, 16)
    opt = torch.optim.SGD(net.parameters(), lr=10.0)
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [q.grad for g in optimizer.param_groups for q in g["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    opt.register_step_pre_hook(record)
    x = torch.randn(32, 16) * 100
    train_loop(lambda s: (net(x) ** 2).mean(), opt, steps=3, clip=clip, cosine=False)
    return norms


def test_clip_bounds_the_gradient_norm_the_optimiser_sees():
    assert max(_grad_norms(None)) > 10
    assert max(_grad_norms(1.0)) <= 1.0 + 1e-5


def test_cosine_schedule_ends_at_zero_and_can_be_off():
    net, opt = _linear()
    train_loop(lambda s: (net(torch.ones(1, 4)) ** 2).mean(), opt, steps=7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    net, opt = _linear()
    x, y = torch.randn(10, 4), torch.randn(10, 1)
    train_loop(_mse(net, x, y), opt, n=10, batch_size=3, epochs=2,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    net, opt = _linear()
    train_loop(lambda s: (net(torch.ones(1, 4)) ** 2).mean(), opt, steps=7, cosine=False)
    assert opt.param_groups[0]["lr"] == 0.1


def test_stats_are_per_example_means_with_dict_terms():
    net, opt = _linear()

    def loss_fn(idx):
        zero = net(torch.ones(1, 4)).sum() * 0
        return {"a": zero + float(len(idx)), "b": zero + 1.0}

    stats = train_loop(loss_fn, opt, n=5, batch_size=3, epochs=1,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert set(stats) == {"loss", "a", "b", "seconds", "images_per_s", "steps"}
    # batches of 3 and 2: a = (3 * 3 + 2 * 2) / 5, b = 1, loss = a + b
    assert stats["a"] == pytest.approx(13 / 5)
    assert stats["b"] == pytest.approx(1.0)
    assert stats["loss"] == pytest.approx(18 / 5)
    assert stats["steps"] == 2 and stats["seconds"] >= 0 and stats["images_per_s"] > 0


def test_modules_train_during_the_loop_and_eval_after_and_after_step_follows_the_step():
    net, opt = _linear()
    bn = nn.BatchNorm1d(4)
    modes: list[tuple[bool, bool]] = []
    weights: list[torch.Tensor] = []

    def loss_fn(step):
        modes.append((net.training, bn.training))
        return (net(torch.full((2, 4), 0.3)) ** 2).mean()

    net.eval()
    weights.append(net.weight.detach().clone())
    train_loop(loss_fn, opt, steps=2, modules=[net, bn],
               after_step=lambda: weights.append(net.weight.detach().clone()))  # fmt: skip
    assert modes == [(True, True)] * 2
    assert not net.training and not bn.training
    assert len(weights) == 3  # the start, then after each optimiser step
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    modes.clear()
    train_loop(loss_fn, opt, steps=1, modules=[net, bn], freeze_bn=True)
    assert modes == [(False, False)]
