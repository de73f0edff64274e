"""SGDHinton, the max-norm constraint and build_optimizer, against updates worked out by hand.

The numbers are sums and products of small powers of two, exact in float32, so most checks are
exact equality.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dropout_repro.optim import (
    MaxNormAfterStep,
    SGDHinton,
    build_optimizer,
    max_row_norm,
    renorm_rows_,
)
from dropout_repro.variant import resolve


def param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def set_grad(p: torch.Tensor, values) -> None:
    p.grad = torch.tensor(values, dtype=p.dtype, device=p.device)


def assert_exact(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    assert torch.equal(actual.detach(), expected), f"{actual.tolist()} != {expected.tolist()}"


# --- the update rule -----------------------------------------------------------------------------


def test_first_step_from_zero_velocity_is_a_damped_descent_step():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5)
    set_grad(w, [[0.5, -1.0]])
    opt.step()
    # v1 = 0.5 * 0 - (1 - 0.5) * 0.5 * g = -0.25 * [0.5, -1] = [-0.125, 0.25]
    # w1 = [1, 2] + v1 = [0.875, 2.25]
    assert_exact(opt.state[w]["velocity"], [[-0.125, 0.25]])
    assert_exact(w, [[0.875, 2.25]])
    # The blog's first step adds the raw gradient: [1 + 0.5, 2 - 1] = [1.5, 1.0] (ascent).
    assert not torch.equal(w.detach(), torch.tensor([[1.5, 1.0]]))


def test_two_steps_with_momentum():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5)
    set_grad(w, [[0.5, -1.0]])
    opt.step()  # v1 = [-0.125, 0.25], w1 = [0.875, 2.25] (as above)
    set_grad(w, [[1.0, 0.25]])
    opt.step()
    # v2 = 0.5 * v1 - 0.25 * g2 = [-0.0625 - 0.25, 0.125 - 0.0625] = [-0.3125, 0.0625]
    # w2 = w1 + v2 = [0.5625, 2.3125]
    assert_exact(opt.state[w]["velocity"], [[-0.3125, 0.0625]])
    assert_exact(w, [[0.5625, 2.3125]])


def test_lr_and_momentum_are_read_from_the_param_groups_at_every_step():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5)
    set_grad(w, [[0.5, -1.0]])
    opt.step()  # v1 = [-0.125, 0.25], w1 = [0.875, 2.25]
    opt.param_groups[0]["lr"] = 0.25
    opt.param_groups[0]["momentum"] = 0.75
    set_grad(w, [[1.0, 0.25]])
    opt.step()
    # v2 = 0.75 * v1 - (1 - 0.75) * 0.25 * g2 = [-0.09375, 0.1875] - 0.0625 * [1, 0.25]
    #    = [-0.15625, 0.171875];  w2 = [0.875 - 0.15625, 2.25 + 0.171875] = [0.71875, 2.421875]
    assert_exact(w, [[0.71875, 2.421875]])


def test_momentum_zero_is_plain_gradient_descent():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.0)
    for expected in ([[0.75, 2.5]], [[0.5, 3.0]]):
        set_grad(w, [[0.5, -1.0]])
        opt.step()
        # w <- w - 0.5 * [0.5, -1] = w + [-0.25, 0.5]: against the gradient, never along it
        assert_exact(w, expected)


def test_weight_decay_is_added_to_the_gradient():
    w = param([[1.0, -2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5, weight_decay=0.25)
    set_grad(w, [[0.5, 0.5]])
    opt.step()
    # g + lambda w = [0.5 + 0.25, 0.5 - 0.5] = [0.75, 0];  v1 = -0.25 * [0.75, 0] = [-0.1875, 0]
    # w1 = [0.8125, -2.0]
    assert_exact(w, [[0.8125, -2.0]])
    assert_exact(w.grad, [[0.5, 0.5]])  # the penalty does not leak into .grad


def test_params_without_grad_are_skipped():
    w, frozen = param([[1.0, 2.0]]), param([[3.0, 4.0]])
    opt = SGDHinton([w, frozen], lr=0.5, momentum=0.5, max_norm=1.0)
    set_grad(w, [[0.0, 0.0]])
    opt.step()
    assert_exact(frozen, [[3.0, 4.0]])
    assert frozen not in opt.state


# --- the max-norm constraint ---------------------------------------------------------------------


def test_a_row_pushed_over_the_bound_by_the_update_is_renormalised_after_it():
    # Row 0: norm sqrt(3^2 + 3.5^2) = sqrt(21.25) ~ 4.61 < 5 before; the update (lr 1, momentum 0,
    # so w - g) makes it [3, 4], norm 5 > c = 2.5, so it is divided by 5 / 2.5 = 2: [1.5, 2].
    # Row 1 stays under the bound and must come out bit for bit as the plain update left it.
    w = param([[3.0, 3.5], [0.1, 0.3]])
    g = [[0.0, -0.5], [0.07, -0.11]]
    expected_row1 = w.detach()[1] - torch.tensor(g[1])
    opt = SGDHinton([w], lr=1.0, momentum=0.0, max_norm=2.5)
    set_grad(w, g)
    opt.step()
    assert_exact(w[0], [1.5, 2.0])
    assert torch.linalg.vector_norm(w[0]).item() == 2.5
    assert torch.equal(w.detach()[1], expected_row1)


def test_a_row_over_the_bound_before_the_step_but_under_after_is_not_touched():
    # [3, 4] (norm 5 > 2.5) minus g = [2.5, 3.5] gives [0.5, 0.5], norm ~0.71 < 2.5: unchanged.
    # A check on the weights before the update would have halved it to [0.25, 0.25].
    w = param([[3.0, 4.0]])
    opt = SGDHinton([w], lr=1.0, momentum=0.0, max_norm=2.5)
    set_grad(w, [[2.5, 3.5]])
    opt.step()
    assert_exact(w, [[0.5, 0.5]])


def test_biases_are_never_renormalised():
    w, b = param([[3.0, 4.0]]), param([100.0, 0.0])
    opt = SGDHinton([w, b], lr=1.0, momentum=0.0, max_norm=2.5)
    set_grad(w, [[0.0, 0.0]])
    set_grad(b, [-1.0, 0.0])
    opt.step()
    assert_exact(w, [[1.5, 2.0]])  # [3, 4] / 2
    assert_exact(b, [101.0, 0.0])  # 100 - (-1), norm 101 far over the bound, left alone


@pytest.mark.parametrize("max_norm", [None, 0, 0.0])
def test_max_norm_none_or_zero_means_no_constraint(max_norm):
    w = param([[3.0, 3.5]])
    opt = SGDHinton([w], lr=1.0, momentum=0.0, max_norm=max_norm)
    set_grad(w, [[0.0, -0.5]])
    opt.step()
    assert_exact(w, [[3.0, 4.0]])


def test_max_norm_is_read_from_the_param_group():
    w = param([[3.0, 3.5]])
    opt = SGDHinton([w], lr=1.0, momentum=0.0, max_norm=None)
    opt.param_groups[0]["max_norm"] = 2.5
    set_grad(w, [[0.0, -0.5]])
    opt.step()
    assert_exact(w, [[1.5, 2.0]])  # [3, 4] / 2


def test_renorm_rows_leaves_a_zero_row_zero():
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.3, 0.4]])
    renorm_rows_(w, 2.5)
    assert not torch.isnan(w).any()
    # row 0: 0 stays 0; row 1: [3, 4] / (5 / 2.5); row 2: norm 0.5 <= 2.5, unchanged
    assert_exact(w[:2], [[0.0, 0.0], [1.5, 2.0]])
    assert torch.equal(w[2], torch.tensor([0.3, 0.4]))


def test_renorm_rows_flattens_dimensions_past_the_first():
    # Each (2, 2) block is one unit's row: norm sqrt(4 * 2^2) = 4 over 2 -> halved; a block of
    # ones has norm 2, exactly at the bound, and is left alone.
    w = torch.stack([torch.full((2, 2), 2.0), torch.ones(2, 2)])
    renorm_rows_(w, 2.0)
    assert_exact(w, torch.stack([torch.ones(2, 2), torch.ones(2, 2)]))


def test_max_row_norm_is_the_largest_row_norm_over_all_matrices():
    a = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5, 1
    b = torch.tensor([[6.0, 8.0, 0.0]])  # row norm 10
    assert max_row_norm([a, b]).item() == 10.0
    assert max_row_norm([a]).item() == 5.0


# --- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, r"lr = 0\.0"),
        ({"lr": -1.0}, r"lr = -1\.0"),
        ({"lr": 0.1, "momentum": 1.0}, r"momentum = 1\.0"),
        ({"lr": 0.1, "momentum": -0.1}, r"momentum = -0\.1"),
        ({"lr": 0.1, "max_norm": -1.0}, r"max_norm = -1\.0"),
        ({"lr": 0.1, "weight_decay": -0.5}, r"weight_decay = -0\.5"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGDHinton([param([1.0])], **kwargs)


def test_bad_values_set_in_a_param_group_are_refused_at_the_step():
    w = param([[1.0]])
    opt = SGDHinton([w], lr=0.1, momentum=0.5)
    opt.param_groups[0]["momentum"] = 1.5
    set_grad(w, [[1.0]])
    with pytest.raises(ValueError, match=r"momentum = 1\.5"):
        opt.step()


# --- build_optimizer -----------------------------------------------------------------------------


def tiny_net(hidden_row=(3.0, 4.0), out_row=(6.0, 8.0), bias=(50.0, 0.0)):
    """One hidden weight matrix, an output weight and a bias, with zero gradients: a step changes
    nothing but the constraint (and Adam/SGD move nothing with a zero gradient)."""
    hidden = param([list(hidden_row)])
    out = param([list(out_row)])
    b = param(list(bias))
    for p in (hidden, out, b):
        p.grad = torch.zeros_like(p)
    return hidden, out, b


@pytest.mark.parametrize("optimizer", ["sgd_hinton", "torch_sgd", "adam"])
@pytest.mark.parametrize("max_norm_output", [False, True])
def test_build_optimizer_bounds_the_output_weight_only_when_asked(optimizer, max_norm_output):
    variant = resolve(
        {
            "optimizer": optimizer,
            "max_norm": 2.5,
            "max_norm_output": max_norm_output,
            "lr0": 0.5,
        }
    )
    hidden, out, b = tiny_net()
    opt = build_optimizer(variant, [hidden], [out, b], out)
    opt.step()
    assert_exact(hidden, [[1.5, 2.0]])  # [3, 4]: norm 5 -> halved
    # [6, 8]: norm 10 -> divided by 4 when bounded
    assert_exact(out, [[1.5, 2.0]] if max_norm_output else [[6.0, 8.0]])
    assert_exact(b, [50.0, 0.0])
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("optimizer", ["sgd_hinton", "torch_sgd", "adam"])
def test_build_optimizer_without_max_norm_bounds_nothing(optimizer):
    variant = resolve({"optimizer": optimizer, "max_norm": None, "max_norm_output": True})
    hidden, out, b = tiny_net()
    opt = build_optimizer(variant, [hidden], [out, b], out)
    opt.step()
    assert_exact(hidden, [[3.0, 4.0]])
    assert_exact(out, [[6.0, 8.0]])


def test_build_optimizer_sgd_hinton_uses_the_variant_settings():
    variant = resolve({"lr0": 0.5, "momentum_initial": 0.5, "max_norm": None, "weight_decay": 0.25})
    w, out, b = param([[1.0, -2.0]]), param([[0.0]]), param([0.0])
    opt = build_optimizer(variant, [w], [out, b], out)
    assert isinstance(opt, SGDHinton)
    set_grad(w, [[0.5, 0.5]])
    opt.step()
    assert_exact(w, [[0.8125, -2.0]])  # as in test_weight_decay_is_added_to_the_gradient


def test_torch_sgd_with_dampening_momentum_follows_torch_semantics():
    variant = resolve(
        {
            "optimizer": "torch_sgd",
            "dampening": "momentum",
            "lr0": 0.5,
            "momentum_initial": 0.5,
            "max_norm": None,
        }
    )
    w, out, b = param([[1.0, 2.0]]), param([[0.0]]), param([0.0])
    opt = build_optimizer(variant, [w], [out, b], out)
    assert isinstance(opt, MaxNormAfterStep)
    assert all(g["dampening"] == 0.5 for g in opt.param_groups)
    set_grad(w, [[0.5, -1.0]])
    opt.step()
    # torch.optim.SGD's first step: buffer = g, undamped; w1 = w0 - lr * g
    #   = [1 - 0.25, 2 + 0.5] = [0.75, 2.5]  (SGDHinton would give [0.875, 2.25])
    assert_exact(w, [[0.75, 2.5]])
    set_grad(w, [[1.0, 0.25]])
    opt.step()
    # buf2 = 0.5 * [0.5, -1] + (1 - 0.5) * [1, 0.25] = [0.75, -0.375]
    # w2 = w1 - 0.5 * buf2 = [0.75 - 0.375, 2.5 + 0.1875] = [0.375, 2.6875]
    assert_exact(w, [[0.375, 2.6875]])


def test_torch_sgd_with_a_fixed_dampening():
    variant = resolve(
        {
            "optimizer": "torch_sgd",
            "dampening": 0.0,
            "lr0": 0.5,
            "momentum_initial": 0.5,
            "max_norm": None,
        }
    )
    w, out, b = param([[1.0, 2.0]]), param([[0.0]]), param([0.0])
    opt = build_optimizer(variant, [w], [out, b], out)
    set_grad(w, [[0.5, -1.0]])
    opt.step()  # buf = g; w1 = [0.75, 2.5]
    set_grad(w, [[1.0, 0.25]])
    opt.step()
    # buf2 = 0.5 * [0.5, -1] + 1 * [1, 0.25] = [1.25, -0.25]; w2 = w1 - 0.5 * buf2 = [0.125, 2.625]
    assert_exact(w, [[0.125, 2.625]])


def test_max_norm_after_step_applies_the_bound_after_an_adam_step():
    w = param([[3.0, 3.5]])
    adam = torch.optim.Adam([w], lr=0.5)
    opt = MaxNormAfterStep(adam, [(w, 2.5)])
    set_grad(w, [[0.0, -1.0]])
    opt.step()
    # Adam's first step moves each coordinate by lr * g / (|g| + eps) ~ lr * sign(g):
    # [3, 3.5 + 0.5] = [3, 4], norm 5 > 2.5, then divided by 2: [1.5, 2].
    torch.testing.assert_close(w.detach(), torch.tensor([[1.5, 2.0]]), rtol=1e-6, atol=1e-6)
    assert torch.linalg.vector_norm(w).item() <= 2.5 + 1e-6


def test_max_norm_after_step_state_round_trip():
    w = param([[1.0, 2.0]])
    opt = MaxNormAfterStep(torch.optim.SGD([w], lr=0.5, momentum=0.5), [(w, None)])
    set_grad(w, [[0.5, -1.0]])
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint would: no shared buffers
    w2 = param([[0.75, 2.5]])
    opt2 = MaxNormAfterStep(torch.optim.SGD([w2], lr=0.5, momentum=0.5), [(w2, None)])
    opt2.load_state_dict(state)
    set_grad(w, [[1.0, 0.25]])
    set_grad(w2, [[1.0, 0.25]])
    opt.step()
    opt2.step()
    assert torch.equal(w.detach(), w2.detach())
    opt2.zero_grad()
    assert w2.grad is None


# --- gradients folded into the update (the fused training step's path) -----------------------


def test_fold_gradient_first_step_by_hand():
    # The gradient [[0.5, -1], [0, 0.25]] given as a @ b (a column times a row, plus nothing).
    w = param([[1.0, 2.0], [0.0, 1.0]])
    b_ = param([0.5, 0.0])
    opt = SGDHinton([w, b_], lr=0.5, momentum=0.5, weight_decay=0.25)
    a = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    b = torch.tensor([[0.5, -1.0], [0.0, 0.5]])
    opt.fold_gradient(w, a, b)
    opt.fold_gradient(b_, torch.tensor([1.0, -1.0]))
    # v1 = -(1 - 0.5) * 0.5 * (g + 0.25 w) = -0.25 * ([[0.5, -1], [0, 0.25]] + [[0.25, 0.5], [0, 0.25]])
    #    = -0.25 * [[0.75, -0.5], [0, 0.5]] = [[-0.1875, 0.125], [0, -0.125]]
    assert_exact(opt.state[w]["velocity"], [[-0.1875, 0.125], [0.0, -0.125]])
    # the bias: -0.25 * ([1, -1] + 0.25 * [0.5, 0]) = [-0.28125, 0.25]
    assert_exact(opt.state[b_]["velocity"], [-0.28125, 0.25])
    assert_exact(w, [[1.0, 2.0], [0.0, 1.0]])  # the weights move at the step, not before
    opt.step()
    assert_exact(w, [[0.8125, 2.125], [0.0, 0.875]])
    assert_exact(b_, [0.21875, 0.25])


def test_fold_gradient_equals_the_step_from_grad_over_several_steps():
    gen = torch.Generator().manual_seed(3)
    kw = dict(lr=0.3, momentum=0.7, max_norm=0.9, weight_decay=0.01)

    def params():
        w = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.4
        b = torch.randn(5, generator=gen, dtype=torch.float64)
        return [torch.nn.Parameter(w), torch.nn.Parameter(b)]

    by_grad = params()
    folded = [torch.nn.Parameter(p.detach().clone()) for p in by_grad]
    opt_g = SGDHinton([{"params": by_grad[:1]}, {"params": by_grad[1:], "max_norm": None}], **kw)
    opt_f = SGDHinton([{"params": folded[:1]}, {"params": folded[1:], "max_norm": None}], **kw)
    for step in range(4):
        a = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        b = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        gb = torch.randn(5, generator=gen, dtype=torch.float64)
        if step == 2:  # a schedule changes lr and momentum between steps
            for opt in (opt_g, opt_f):
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = 0.2, 0.8
        by_grad[0].grad, by_grad[1].grad = a @ b, gb.clone()
        # a stale .grad on the folded side must be ignored
        folded[0].grad = torch.full((5, 4), 1e3, dtype=torch.float64)
        opt_f.fold_gradient(folded[0], a, b)
        opt_f.fold_gradient(folded[1], gb)
        opt_g.step()
        opt_f.step()
        for p, q in zip(by_grad, folded):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-13, atol=1e-15)
    assert torch.linalg.vector_norm(folded[0], dim=1).max().item() <= 0.9 + 1e-12


def test_fold_gradient_reads_the_groups_after_load_state_dict():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5)
    opt.fold_gradient(w, torch.tensor([[1.0]]), torch.tensor([[0.5, -1.0]]))
    opt.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new param_group dicts
    opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"] = 1.0, 0.0
    opt.fold_gradient(w, torch.tensor([[1.0]]), torch.tensor([[0.25, 0.5]]))
    # v = 0 * v - 1 * 1 * [0.25, 0.5]: the new values, not the cached group's
    assert_exact(opt.state[w]["velocity"], [[-0.25, -0.5]])


def test_fold_gradient_refuses_a_tensor_it_does_not_optimise():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5)
    with pytest.raises(ValueError, match="not a parameter of this optimiser"):
        opt.fold_gradient(param([[1.0, 2.0]]), torch.ones(1, 1), torch.ones(1, 2))


def test_fold_gradient_validates_the_group_values():
    w = param([[1.0, 2.0]])
    opt = SGDHinton([w], lr=0.5, momentum=0.5)
    opt.param_groups[0]["momentum"] = 1.0
    with pytest.raises(ValueError, match="momentum = 1.0"):
        opt.fold_gradient(w, torch.ones(1, 1), torch.ones(1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sgd_hinton_runs_on_the_gpu():
    w = torch.nn.Parameter(torch.tensor([[3.0, 3.5], [0.5, 0.25]], device="cuda"))
    b = torch.nn.Parameter(torch.tensor([100.0, 0.0], device="cuda"))
    opt = SGDHinton([w, b], lr=1.0, momentum=0.5, max_norm=2.5)
    for _ in range(2):
        w.grad = torch.tensor([[0.0, -0.5], [0.0, 0.0]], device="cuda")
        b.grad = torch.zeros(2, device="cuda")
        opt.step()
    assert w.device.type == "cuda" and opt.state[w]["velocity"].device.type == "cuda"
    norms = torch.linalg.vector_norm(w, dim=1)
    assert norms[0].item() <= 2.5 + 1e-6
    assert math.isfinite(norms.sum().item())
