"""The learning-rate and momentum schedules of Appendix A, and how they are set on an optimiser."""

from __future__ import annotations

import math

import pytest
import torch

from dropout_repro import schedules
from dropout_repro.optim import build_optimizer
from dropout_repro.variant import resolve


def test_learning_rate_decays_geometrically():
    # lr0 = 8, f = 0.5: 8, 4, 8 / 2^10 = 0.0078125 (all exact in binary)
    assert schedules.learning_rate(0, 8.0, 0.5) == 8.0
    assert schedules.learning_rate(1, 8.0, 0.5) == 4.0
    assert schedules.learning_rate(10, 8.0, 0.5) == 0.0078125


def test_learning_rate_with_the_papers_numbers():
    # 10 * 0.998 = 9.98; 10 * 0.998^10 = 10 exp(10 ln 0.998) = 9.8018 (to 4 decimals)
    assert schedules.learning_rate(0, 10.0, 0.998) == 10.0
    assert schedules.learning_rate(1, 10.0, 0.998) == pytest.approx(9.98, rel=1e-12)
    assert schedules.learning_rate(10, 10.0, 0.998) == pytest.approx(
        10.0 * math.exp(10.0 * math.log(0.998)), rel=1e-12
    )
    assert schedules.learning_rate(10, 10.0, 0.998) == pytest.approx(9.8018, abs=5e-5)


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, 0.5),  # p_i
        (100, 0.598),  # 0.2 * 0.99 + 0.8 * 0.5 = 0.198 + 0.4
        (250, 0.745),  # 0.5 * 0.99 + 0.5 * 0.5 = 0.495 + 0.25
        (499, 0.98902),  # 0.998 * 0.99 + 0.002 * 0.5 = 0.98802 + 0.001, just before T
        (500, 0.99),  # p_f at T
        (501, 0.99),  # and after it
        (3000, 0.99),
    ],
)
def test_momentum_ramps_up_linearly_then_stays(epoch, expected):
    assert schedules.momentum(epoch, 0.5, 0.99, 500) == pytest.approx(expected, rel=1e-12)


def test_momentum_is_final_and_exact_from_T_on():
    assert schedules.momentum(500, 0.5, 0.99, 500) == 0.99
    assert schedules.momentum(10_000, 0.5, 0.99, 500) == 0.99


def test_momentum_rises_monotonically():
    values = [schedules.momentum(t, 0.5, 0.99, 500) for t in range(0, 600, 10)]
    assert values == sorted(values)
    assert values[0] == 0.5 and values[-1] == 0.99


def test_momentum_ramp_of_zero_epochs_starts_at_the_final_value():
    assert schedules.momentum(0, 0.5, 0.99, 0) == 0.99
    assert schedules.momentum(7, 0.5, 0.99, 0) == 0.99


def tiny_params():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    out = torch.nn.Parameter(torch.zeros(1, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    return [w], [out, b], out


def build(variant):
    hidden, other, out = tiny_params()
    return build_optimizer(variant, hidden, other, out)


@pytest.mark.parametrize("optimizer", ["sgd_hinton", "torch_sgd"])
def test_apply_sets_lr_and_momentum_in_every_group(optimizer):
    variant = resolve({"optimizer": optimizer, "lr0": 8.0, "lr_decay": 0.5})
    opt = build(variant)
    lr, mom = schedules.apply(opt, variant, 250)
    # lr = 8 * 0.5^250 = 2^3 * 2^-250 = 2^-247; momentum at T/2 = 0.745
    assert lr == 2.0**-247
    assert mom == pytest.approx(0.745, rel=1e-12)
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        assert group["lr"] == lr
        assert group["momentum"] == mom


def test_apply_makes_torch_sgd_dampening_follow_the_momentum():
    variant = resolve({"optimizer": "torch_sgd", "dampening": "momentum"})
    opt = build(variant)
    for epoch in (0, 100, 600):
        _, mom = schedules.apply(opt, variant, epoch)
        assert all(g["dampening"] == mom for g in opt.param_groups)
    assert mom == 0.99


def test_apply_leaves_a_fixed_torch_sgd_dampening_alone():
    variant = resolve({"optimizer": "torch_sgd", "dampening": 0.25})
    opt = build(variant)
    schedules.apply(opt, variant, 100)
    assert all(g["dampening"] == 0.25 for g in opt.param_groups)
    assert all(g["momentum"] == pytest.approx(0.598) for g in opt.param_groups)


def test_apply_sets_only_the_learning_rate_of_adam():
    variant = resolve(
        {"optimizer": "adam", "lr0": 0.001, "lr_decay": 0.5, "adam_betas": [0.8, 0.9]}
    )
    opt = build(variant)
    before = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    lr, _ = schedules.apply(opt, variant, 1)
    assert lr == 0.0005  # 0.001 * 0.5
    for group, old in zip(opt.param_groups, before):
        assert group["lr"] == lr
        assert "momentum" not in group and "dampening" not in group
        assert {k: v for k, v in group.items() if k not in ("params", "lr")} == old
        assert group["betas"] == (0.8, 0.9)


def test_apply_sgd_hinton_groups_keep_their_max_norm():
    variant = resolve({"max_norm": 2.0, "max_norm_output": False})
    opt = build(variant)
    schedules.apply(opt, variant, 3)
    assert [g["max_norm"] for g in opt.param_groups] == [2.0, None]
