"""The network, its dropout conventions, the mask stream, and the hand-fused training step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from dropout_repro import model as model_mod
from dropout_repro.model import (
    MLP,
    N_CLASSES,
    N_INPUTS,
    MaskStream,
    dropout,
    keep_probability,
    splitmix64,
)
from dropout_repro.variant import VariantError, resolve

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# --- architecture and initialisation -------------------------------------------------------------


@pytest.mark.parametrize("hidden", [[800, 800], [1200, 1200], [2000, 2000], [1200, 1200, 1200]])
def test_the_papers_architectures_have_the_right_shapes(hidden):
    net = MLP(hidden, generator=torch.Generator().manual_seed(0))
    sizes = [N_INPUTS, *hidden, N_CLASSES]
    assert N_INPUTS == 784 and N_CLASSES == 10  # 28 x 28 pixels, ten digits
    assert [tuple(layer.weight.shape) for layer in net.layers] == list(zip(sizes[1:], sizes[:-1]))
    assert [tuple(layer.bias.shape) for layer in net.layers] == [(s,) for s in sizes[1:]]
    assert net.hidden_weights == [layer.weight for layer in net.layers[:-1]]
    net.eval()
    assert net(torch.zeros(3, 784)).shape == (3, 10)


def test_initial_weights_are_normal_with_std_0_01_and_biases_zero():
    net = MLP([800, 800], generator=torch.Generator().manual_seed(0))
    w = torch.cat([layer.weight.detach().flatten() for layer in net.layers])
    # 1,275,200 draws: the sample std is within ~1e-5 of 0.01 (std of the estimate ~ 0.01/sqrt(2n))
    assert w.std().item() == pytest.approx(0.01, abs=1e-4)
    assert abs(w.mean().item()) < 1e-4
    for layer in net.layers:
        assert torch.count_nonzero(layer.bias) == 0


def test_initialisation_follows_the_generator():
    a = MLP([16], generator=torch.Generator().manual_seed(3))
    b = MLP([16], generator=torch.Generator().manual_seed(3))
    c = MLP([16], generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_from_variant_uses_the_variant_keys():
    v = resolve(
        {
            "hidden": [7, 5],
            "activation": "logistic",
            "input_dropout": 0.2,
            "hidden_dropout": 0.5,
            "dropout_style": "paper",
            "init_std": 0.5,
        }
    )
    net = MLP.from_variant(v, generator=torch.Generator().manual_seed(0))
    assert [layer.out_features for layer in net.layers] == [7, 5, 10]
    assert net.activation is torch.sigmoid
    assert (net.input_dropout, net.hidden_dropout, net.dropout_style) == (0.2, 0.5, "paper")
    assert net.layers[0].weight.std().item() == pytest.approx(0.5, rel=0.1)


# --- the mask stream -----------------------------------------------------------------------------


def test_splitmix64_reference_values():
    # The first outputs of SplitMix64 seeded with 0 (state 0x9E3779B97F4A7C15, then twice that),
    # as published with the generator (Vigna's splitmix64.c).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(GOLDEN) == 0x6E789E6AA1B965F4


def test_keep_probability():
    assert keep_probability(0.5) == 0.5
    assert keep_probability(0.0) == 1.0
    # 0.8 * 65536 = 52428.8 -> 52429 / 65536, 0.2 / 65536 above 0.8: within 2^-17
    assert keep_probability(0.2) == 52429 / 65536
    assert abs(keep_probability(0.2) - 0.8) <= 2.0**-17


def test_tensor_hash_equals_the_python_splitmix64():
    # The tensor computes the finaliser (no leading + golden) of base + j * golden, which is
    # splitmix64's output for the argument base + (j - 1) * golden.
    base = 0x0123456789ABCDEF
    j = torch.arange(6, dtype=torch.int64)
    z = j * model_mod._signed(GOLDEN) + model_mod._signed(base)
    words = model_mod._mix_(z).tolist()
    expected = [splitmix64((base + (k - 1) * GOLDEN) & MASK64) for k in range(6)]
    assert [w & MASK64 for w in words] == expected


def python_keep_mask(stream_key: int, counter: int, n: int, keep: float) -> list[bool]:
    """The mask ``keep_mask`` should draw, from Python integers: word j of mask number
    ``counter`` is splitmix64(base + (j - 1) golden) with base = splitmix64(key + counter golden);
    each word gives four 16-bit draws, least significant first, read as signed."""
    base = splitmix64((stream_key + counter * GOLDEN) & MASK64)
    draws = []
    for j in range((n + 3) // 4):
        word = splitmix64((base + (j - 1) * GOLDEN) & MASK64)
        for k in range(4):
            d = (word >> (16 * k)) & 0xFFFF
            draws.append(d - (1 << 16) if d >= 1 << 15 else d)
    threshold = round(keep * 65536) - 32768
    return [d < threshold for d in draws[:n]]


def test_keep_mask_equals_the_python_reference():
    stream = MaskStream(seed=42)
    key = splitmix64(42 ^ 0x5EED_D209_0C0A_7A7E)
    assert stream.key == key
    keep = keep_probability(0.2)
    for counter, shape in enumerate([(3, 5), (2, 2), (11,)]):
        mask = stream.keep_mask(shape, keep, "cpu")
        assert mask.dtype == torch.bool and mask.shape == shape
        assert mask.flatten().tolist() == python_keep_mask(key, counter, math.prod(shape), keep)
    assert stream.counter == 3


def test_masks_are_deterministic_per_seed_and_differ_between_seeds():
    a, b, c = MaskStream(1), MaskStream(1), MaskStream(2)
    ma = [a.keep_mask((64, 32), 0.5, "cpu") for _ in range(3)]
    mb = [b.keep_mask((64, 32), 0.5, "cpu") for _ in range(3)]
    mc = [c.keep_mask((64, 32), 0.5, "cpu") for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not any(torch.equal(x, y) for x, y in zip(ma, mc))
    # successive masks of one stream differ
    assert not torch.equal(ma[0], ma[1]) and not torch.equal(ma[1], ma[2])


def test_a_stream_restarted_at_its_counter_continues_it():
    a = MaskStream(5)
    a.keep_mask((10, 10), 0.5, "cpu")
    second = a.keep_mask((10, 10), 0.5, "cpu")
    resumed = MaskStream(5, counter=1)
    assert torch.equal(resumed.keep_mask((10, 10), 0.5, "cpu"), second)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_keep_fraction_is_within_five_sigma_of_the_keep_probability(p):
    q = keep_probability(p)
    n = 1 << 20
    stream = MaskStream(123)
    frac = stream.keep_mask((n,), q, "cpu").double().mean().item()
    sigma = math.sqrt(q * (1 - q) / n)  # p = 0.5: 0.00049; p = 0.2: 0.00039
    assert abs(frac - q) < 5 * sigma


def test_keep_fraction_is_even_across_positions():
    # Each of the four 16-bit draws cut from a 64-bit word must be fair, not just their mean.
    q, n = 0.5, 1 << 20
    mask = MaskStream(9).keep_mask((n // 4, 4), q, "cpu").double().mean(0)
    sigma = math.sqrt(q * (1 - q) / (n // 4))
    assert ((mask - q).abs() < 5 * sigma).all()


# --- the two dropout conventions -----------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_styles_give_the_same_expected_activations(p):
    q = keep_probability(p)
    x = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    rows = 1 << 17
    xs = x.expand(rows, 4).contiguous()
    paper_train = dropout(xs, p, "paper", True, MaskStream(1)).mean(0)
    inverted_train = dropout(xs, p, "inverted", True, MaskStream(1)).mean(0)
    paper_test = dropout(x, p, "paper", False, None)
    inverted_test = dropout(x, p, "inverted", False, None)
    # paper: E[train] = q x, test x q;  inverted: E[train] = x, test x
    assert torch.equal(inverted_test, x)
    assert torch.equal(paper_test, x * q)
    assert torch.equal(paper_test, q * inverted_test)
    # standard error of a mean of kept-or-not: |x| sqrt(q (1 - q) / rows) (over q for inverted)
    se = x.abs() * math.sqrt(q * (1 - q) / rows)
    assert ((paper_train - paper_test).abs() < 5 * se).all()
    assert ((inverted_train - inverted_test).abs() < 5 * se / q).all()


def test_dropout_kept_values_are_scaled_by_one_over_q_or_left_alone():
    q = keep_probability(0.5)  # 0.5: 1 / q = 2 exactly
    x = torch.linspace(1.0, 2.0, 100)
    inv = dropout(x, 0.5, "inverted", True, MaskStream(3))
    pap = dropout(x, 0.5, "paper", True, MaskStream(3))
    kept = pap != 0
    assert torch.equal(pap[kept], x[kept]) and torch.equal(inv[kept], x[kept] / q)
    assert torch.equal(inv != 0, kept)
    assert 0 < kept.sum() < 100


def test_dropout_of_zero_probability_is_the_identity():
    x = torch.randn(5, generator=torch.Generator().manual_seed(0))
    stream = MaskStream(0)
    assert dropout(x, 0.0, "paper", True, stream) is x
    assert stream.counter == 0


def test_inverted_dropout_scale_keeps_the_input_precision():
    q = keep_probability(0.2)  # 52429 / 65536, whose reciprocal is not a float32
    x = torch.ones(1000, dtype=torch.float64)
    y = dropout(x, 0.2, "inverted", True, MaskStream(0))
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1.0 / q))


def test_every_dropout_probability_the_variant_accepts_can_be_used():
    # Masks draw 16-bit numbers, so the largest dropout a variant accepts keeps 1 unit in 2^16;
    # anything above is refused by name rather than dividing by a zero keep probability.
    largest = 1 - 2**-16
    v = resolve({"hidden": [4], "hidden_dropout": largest, "input_dropout": largest})
    assert keep_probability(largest) == 2**-16
    net = MLP.from_variant(v, generator=torch.Generator().manual_seed(0))
    net.masks = MaskStream(0)
    out = net(torch.ones(2, 784))
    assert torch.isfinite(out).all()
    with pytest.raises(VariantError, match="hidden_dropout"):
        resolve({"hidden_dropout": 0.999999})
    with pytest.raises(ValueError, match="keeps no unit"):
        keep_probability(0.999999)


def test_mean_network_of_paper_dropout_equals_inverted_with_weights_times_q():
    # Paper style at test time scales what each dropped layer passes on by q; an inverted net whose
    # weights after a dropped layer are q times larger computes the same function.
    gen = torch.Generator().manual_seed(0)
    paper = MLP([16, 8], "relu", 0.2, 0.5, "paper", init_std=0.1, generator=gen).double()
    inverted = copy.deepcopy(paper)
    inverted.dropout_style = "inverted"
    with torch.no_grad():
        inverted.layers[0].weight.mul_(keep_probability(0.2))
        for layer in inverted.layers[1:]:
            layer.weight.mul_(keep_probability(0.5))
    paper.eval()
    inverted.eval()
    x = torch.randn(4, 784, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(paper(x), inverted(x), rtol=1e-12, atol=1e-12)


# --- the hand-fused training step against autograd -----------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("drop", [(0.0, 0.0), (0.2, 0.5)], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("style", ["paper", "inverted"])
@pytest.mark.parametrize("activation", ["relu", "logistic"])
def test_train_step_equals_autograd(activation, style, drop, reduction):
    input_dropout, hidden_dropout = drop
    gen = torch.Generator().manual_seed(11)
    net = MLP(
        [32, 16, 8], activation, input_dropout, hidden_dropout, style, init_std=0.1, generator=gen
    ).double()
    ref = copy.deepcopy(net)
    x = torch.randn(20, 784, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (20,), generator=gen)

    # autograd: forward in training mode, cross-entropy, backward
    ref.train()
    ref.masks = MaskStream(77)
    logits_ref = ref(x)
    loss_ref = F.cross_entropy(logits_ref, y, reduction=reduction)
    loss_ref.backward()

    # the fused step, with garbage in .grad that it must overwrite, not add to
    net.train()
    net.masks = MaskStream(77)
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    loss, logits = net.train_step(x, y, reduction)

    assert net.masks.counter == ref.masks.counter  # the same number of masks, drawn in order
    # In float64 the two paths differ only in the order of roundings.
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, logits_ref.detach(), **tol)
    torch.testing.assert_close(loss, loss_ref.detach(), **tol)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        scale = q.grad.abs().max().item()
        assert scale > 0, name  # every layer really receives a gradient in this set-up
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12 * scale, msg=name)


def test_train_step_twice_reuses_the_grad_buffers_and_stays_equal_to_autograd():
    gen = torch.Generator().manual_seed(2)
    net = MLP([16, 8], "relu", 0.2, 0.5, "inverted", init_std=0.1, generator=gen).double()
    ref = copy.deepcopy(net)
    net.masks, ref.masks = MaskStream(5), MaskStream(5)
    for _ in range(2):
        x = torch.randn(10, 784, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (10,), generator=gen)
        buffers = [p.grad for p in net.parameters()]
        net.train_step(x, y)
        if buffers[0] is not None:
            assert all(p.grad is b for p, b in zip(net.parameters(), buffers))
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-12)


def test_train_step_in_float32_matches_autograd():
    gen = torch.Generator().manual_seed(4)
    net = MLP([64, 32], "relu", 0.2, 0.5, "inverted", generator=gen)
    ref = copy.deepcopy(net)
    net.masks, ref.masks = MaskStream(8), MaskStream(8)
    x = torch.randn(100, 784, generator=gen)
    y = torch.randint(0, 10, (100,), generator=gen)
    loss, _ = net.train_step(x, y)
    loss_ref = F.cross_entropy(ref(x), y)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(net.parameters(), ref.parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_train_step_folded_into_sgd_hinton_equals_train_step_then_step(weight_decay):
    from dropout_repro.optim import SGDHinton

    gen = torch.Generator().manual_seed(6)
    net = MLP([24, 12], "relu", 0.2, 0.5, "inverted", init_std=0.1, generator=gen).double()
    ref = copy.deepcopy(net)
    net.masks, ref.masks = MaskStream(9), MaskStream(9)

    def opt(m):
        groups = [
            {"params": m.hidden_weights, "max_norm": 0.5},
            {"params": [m.layers[-1].weight] + [layer.bias for layer in m.layers]},
        ]
        return SGDHinton(groups, lr=0.5, momentum=0.6, weight_decay=weight_decay)

    opt_net, opt_ref = opt(net), opt(ref)
    for _ in range(3):
        x = torch.randn(10, 784, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (10,), generator=gen)
        loss, _ = net.train_step(x, y, fold=opt_net.fold_gradient)
        opt_net.step()
        loss_ref, _ = ref.train_step(x, y)
        opt_ref.step()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
    assert all(p.grad is None for p in net.parameters())  # nothing went through .grad
    assert max(torch.linalg.vector_norm(w, dim=1).max().item() for w in net.hidden_weights) > 0.49


# --- a step's masks ----------------------------------------------------------------------------


def python_draws(stream_key: int, counter: int, words: int) -> list[int]:
    base = splitmix64((stream_key + counter * GOLDEN) & MASK64)
    draws = []
    for j in range(words):
        word = splitmix64((base + (j - 1) * GOLDEN) & MASK64)
        for k in range(4):
            d = (word >> (16 * k)) & 0xFFFF
            draws.append(d - (1 << 16) if d >= 1 << 15 else d)
    return draws


def test_a_steps_masks_take_consecutive_words_of_one_draw():
    stream = MaskStream(seed=5, counter=2)
    keep_in, keep_h = keep_probability(0.2), keep_probability(0.5)
    sites = [((3, 5), keep_in, 1.25), None, ((2, 7), keep_h, 2.0), ((1, 3), keep_h, 2.0)]
    masks = stream.step_masks(sites, torch.float64, "cpu")
    assert stream.counter == 3  # one counter value for the whole step
    # 15 draws take words 0-3 (one draw to spare), 14 take words 4-7, 3 take word 8
    draws = python_draws(stream.key, 2, 9)
    expected = [
        [1.25 if d < round(keep_in * 65536) - 32768 else 0.0 for d in draws[0:15]],
        None,
        [2.0 if d < 0 else 0.0 for d in draws[16:30]],
        [2.0 if d < 0 else 0.0 for d in draws[32:35]],
    ]
    for mask, site, exp in zip(masks, sites, expected):
        if site is None:
            assert mask is None
        else:
            assert mask.shape == site[0] and mask.dtype == torch.float64
            assert mask.flatten().tolist() == exp
    # a step that drops nothing draws nothing
    assert stream.step_masks([None, None], torch.float32, "cpu") == [None, None]
    assert stream.counter == 3


def test_the_networks_step_masks_are_its_sites_in_order():
    net = MLP([6, 4], "relu", 0.2, 0.5, "paper")
    assert net.dropout_sites(3) == [
        ((3, 784), keep_probability(0.2), 1.0),
        ((3, 6), 0.5, 1.0),
        ((3, 4), 0.5, 1.0),
    ]
    net = MLP([6, 4], "relu", 0.0, 0.5, "inverted")
    assert net.dropout_sites(3) == [None, ((3, 6), 0.5, 2.0), ((3, 4), 0.5, 2.0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_are_the_same_on_the_gpu():
    cpu = MaskStream(3).keep_mask((300, 7), keep_probability(0.2), "cpu")
    gpu = MaskStream(3).keep_mask((300, 7), keep_probability(0.2), torch.device("cuda"))
    assert torch.equal(cpu, gpu.cpu())
