"""Variant resolution: defaults filled in, every bad key or value refused with a message that
names it and what would be valid."""

from __future__ import annotations

import math
import re

import pytest

from dropout_repro.variant import DEFAULTS, VariantError, fingerprint, resolve


def test_resolve_of_nothing_is_the_defaults():
    assert resolve() == DEFAULTS
    assert resolve({}) == DEFAULTS
    assert resolve(None) == DEFAULTS


def test_resolve_fills_in_every_default_and_keeps_the_overrides():
    v = resolve({"lr0": 0.5, "hidden": (16, 8), "max_norm": None})
    assert set(v) == set(DEFAULTS)
    assert v["lr0"] == 0.5
    assert v["hidden"] == [16, 8]  # a tuple becomes a list, as JSON would store it
    assert v["max_norm"] is None
    assert v["momentum_final"] == DEFAULTS["momentum_final"]


def test_the_default_max_norm_is_the_square_root_of_15():
    # l = 15 read as a bound on the squared length: sqrt(15) = 3.87298...
    assert DEFAULTS["max_norm"] == pytest.approx(3.872983346, rel=1e-9)
    assert DEFAULTS["momentum_initial"] == 0.5 and DEFAULTS["momentum_final"] == 0.99
    assert DEFAULTS["momentum_ramp_epochs"] == 500 and DEFAULTS["lr_decay"] == 0.998
    assert DEFAULTS["batch_size"] == 100 and DEFAULTS["init_std"] == 0.01


def test_resolve_does_not_share_mutable_values_with_the_defaults_or_the_input():
    given = {"hidden": [4, 4]}
    v = resolve(given)
    v["hidden"].append(9)
    v["adam_betas"][0] = 0.0
    assert given["hidden"] == [4, 4]
    assert DEFAULTS["hidden"] == [800, 800]
    assert DEFAULTS["adam_betas"] == [0.9, 0.999]
    assert resolve()["adam_betas"] == [0.9, 0.999]


def test_unknown_key_names_itself_and_lists_the_valid_keys():
    with pytest.raises(VariantError) as err:
        resolve({"lr": 0.1, "dropout": 0.5})
    msg = str(err.value)
    assert "'dropout'" in msg and "'lr'" in msg
    assert "valid keys" in msg
    for key in DEFAULTS:
        assert key in msg


def test_variant_error_is_a_value_error():
    with pytest.raises(ValueError):
        resolve({"lr0": -1})


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("input_dropout", 1.0, "[0, 1)"),
        ("hidden_dropout", 1.0, "[0, 1)"),
        ("hidden_dropout", -0.1, "[0, 1)"),
        ("lr0", 0, "(0, inf"),
        ("lr0", -1.0, "(0, inf"),
        ("lr0", math.nan, "(0, inf"),
        ("lr0", math.inf, "(0, inf"),
        ("lr_decay", 0.0, "(0, 1]"),
        ("lr_decay", 1.5, "(0, 1]"),
        ("momentum_initial", 1.0, "[0, 1)"),
        ("momentum_final", 1.0, "[0, 1)"),
        ("momentum_final", -0.5, "[0, 1)"),
        ("momentum_ramp_epochs", -1, "[0, inf"),
        ("momentum_ramp_epochs", 2.5, "an integer >= 0"),
        ("max_norm", -1.0, "[0, inf"),
        ("weight_decay", -1e-4, "[0, inf"),
        ("dampening", 1.5, "[0, 1]"),
        ("dampening", "none", "[0, 1]"),
        ("adam_eps", 0.0, "(0, inf"),
        ("batch_size", 0, "[1, inf"),
        ("batch_size", 10.0, "an integer >= 1"),
        ("batch_size", True, "an integer >= 1"),
        ("init_std", 0.0, "(0, inf"),
        ("input_std", 0.0, "(0, inf"),
        ("lr0", "1.0", "(0, inf"),
    ],
)
def test_range_checks_name_the_key_the_value_and_the_valid_range(key, value, valid):
    with pytest.raises(VariantError) as err:
        resolve({key: value})
    msg = str(err.value)
    assert f"{key!r} = {value!r}" in msg
    assert valid in msg


@pytest.mark.parametrize("hidden", [[], [0], [800, -1], [800.0], [True], "800", 800, None])
def test_hidden_must_be_a_non_empty_list_of_positive_integers(hidden):
    with pytest.raises(VariantError, match=r"'hidden'.*non-empty list of positive integers"):
        resolve({"hidden": hidden})


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("activation", "tanh", ["relu", "logistic"]),
        ("dropout_style", "scaled", ["inverted", "paper"]),
        ("optimizer", "sgd", ["sgd_hinton", "torch_sgd", "adam"]),
        ("loss_reduction", "none", ["mean", "sum"]),
    ],
)
def test_enum_values_are_checked_and_the_choices_listed(key, value, allowed):
    with pytest.raises(VariantError) as err:
        resolve({key: value})
    msg = str(err.value)
    assert f"{key!r} = {value!r}" in msg
    assert all(repr(a) in msg for a in allowed)


@pytest.mark.parametrize("betas", [[0.9], [0.9, 1.0], [-0.1, 0.9], "0.9,0.999", [0.9, None]])
def test_adam_betas_are_two_numbers_in_0_1(betas):
    with pytest.raises(VariantError, match=re.escape("two numbers in [0, 1)")):
        resolve({"adam_betas": betas})


def test_max_norm_output_must_be_a_boolean():
    with pytest.raises(VariantError, match="'max_norm_output' = 1.*true or false"):
        resolve({"max_norm_output": 1})


@pytest.mark.parametrize(
    "variant",
    [
        {"input_dropout": 0.0, "hidden_dropout": 0.0},
        {"input_dropout": 0.2, "hidden_dropout": 0.5},
        {"max_norm": None},
        {"max_norm": 0},
        {"momentum_ramp_epochs": 0},
        {"momentum_initial": 0.0, "momentum_final": 0.0},
        {"lr_decay": 1.0},
        {"dampening": 0.0},
        {"dampening": "momentum"},
        {"adam_betas": (0.0, 0.5)},
        {"input_mean": 0.0, "input_std": 1.0},
        {"optimizer": "adam", "activation": "logistic", "dropout_style": "paper"},
    ],
)
def test_valid_edge_values_are_accepted(variant):
    v = resolve(variant)
    for key, value in variant.items():
        assert v[key] == (list(value) if isinstance(value, tuple) else value)


def test_fingerprint_is_stable_and_order_independent():
    a = fingerprint({"variant": resolve({"lr0": 0.5}), "seed": 1})
    b = fingerprint({"seed": 1, "variant": resolve({"lr0": 0.5})})
    c = fingerprint({"variant": resolve({"lr0": 0.25}), "seed": 1})
    assert a == b and a != c
    assert re.fullmatch(r"[0-9a-f]{16}", a)


def test_an_unbounded_range_is_printed_open_at_infinity():
    with pytest.raises(VariantError, match=re.escape("(0, inf)")):
        resolve({"lr0": math.inf})
