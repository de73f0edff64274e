"""A variant: a named set of hyperparameters, in the paper's words.

Every key a variant may set is in ``DEFAULTS`` with its default. A variant is a plain dict that
overrides some of them; ``resolve`` fills in the rest and checks every value, naming the bad key and
the valid range. The workflow's JSON schema checks the same keys before anything runs; this check is
for researchers who call the library or the CLI directly.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# The defaults are the paper's recipe for the 784-800-800-10 net (Appendix A), with the readings
# explained in config/README.md. Variants override what differs.
DEFAULTS: dict[str, Any] = {
    "hidden": [800, 800],  # hidden layer widths
    "activation": "relu",  # "relu" (the blog's choice) or "logistic" (the paper's era)
    "input_dropout": 0.0,  # probability of dropping an input pixel
    "hidden_dropout": 0.0,  # probability of dropping a hidden unit
    "dropout_style": "inverted",  # "inverted" (PyTorch) or "paper" (scale at test time)
    "optimizer": "sgd_hinton",  # "sgd_hinton", "torch_sgd" or "adam"
    "lr0": 1.0,  # epsilon_0, the learning rate at epoch 0
    "lr_decay": 0.998,  # f: lr_t = lr0 * f**t
    "momentum_initial": 0.5,  # p_i
    "momentum_final": 0.99,  # p_f
    "momentum_ramp_epochs": 500,  # T: momentum reaches p_f at epoch T
    "max_norm": math.sqrt(15.0),  # bound on each hidden unit's incoming weight norm; null: none
    "max_norm_output": False,  # also bound the output units' incoming weights
    "weight_decay": 0.0,  # L2 penalty coefficient added to the gradient
    "dampening": "momentum",  # torch_sgd only: a number, or "momentum" to follow the schedule
    "adam_betas": [0.9, 0.999],  # adam only
    "adam_eps": 1e-8,  # adam only
    "batch_size": 100,  # mini-batch size
    "init_std": 0.01,  # weights ~ N(0, init_std^2), biases 0
    "loss_reduction": "mean",  # cross-entropy over the batch: "mean" or "sum"
    "input_mean": 0.1307,  # pixels in [0, 1] are standardised: (x - mean) / std
    "input_std": 0.3081,
}

ACTIVATIONS = ("relu", "logistic")
DROPOUT_STYLES = ("inverted", "paper")
OPTIMIZERS = ("sgd_hinton", "torch_sgd", "adam")
LOSS_REDUCTIONS = ("mean", "sum")


class VariantError(ValueError):
    """A variant key or value that is not valid."""


def _fail(key: str, value: Any, valid: str) -> None:
    raise VariantError(f"variant key {key!r} = {value!r} is not valid: expected {valid}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_range(
    key: str, value: Any, lo: float, hi: float | None, lo_open=False, hi_open=False
) -> None:
    ok = _number(value)
    if ok:
        ok = (value > lo) if lo_open else (value >= lo)
    if ok and hi is not None:
        ok = (value < hi) if hi_open else (value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        right = ")" if hi is None else right
        _fail(key, value, f"a number in {left}{lo}, {'inf' if hi is None else hi}{right}")


def resolve(variant: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the variant with every default filled in, after checking every key and value."""
    variant = dict(variant or {})
    unknown = sorted(set(variant) - set(DEFAULTS))
    if unknown:
        raise VariantError(
            f"unknown variant key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(DEFAULTS)}"
        )
    v = {**DEFAULTS, **variant}
    v["hidden"] = list(v["hidden"]) if isinstance(v["hidden"], (list, tuple)) else v["hidden"]
    if (
        not isinstance(v["hidden"], list)
        or not v["hidden"]
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in v["hidden"])
    ):
        _fail("hidden", v["hidden"], "a non-empty list of positive integers, e.g. [800, 800]")
    for key, allowed in (
        ("activation", ACTIVATIONS),
        ("dropout_style", DROPOUT_STYLES),
        ("optimizer", OPTIMIZERS),
        ("loss_reduction", LOSS_REDUCTIONS),
    ):
        if v[key] not in allowed:
            _fail(key, v[key], "one of " + ", ".join(map(repr, allowed)))
    for key in ("input_dropout", "hidden_dropout"):
        _check_range(key, v[key], 0, 1, hi_open=True)
        if v[key] > 1 - 2**-16:  # masks draw 16-bit numbers: keep at least 1 unit in 2^16
            _fail(key, v[key], "a number in [0, 1) keeping at least 2^-16 of the units")
    _check_range("lr0", v["lr0"], 0, None, lo_open=True)
    _check_range("lr_decay", v["lr_decay"], 0, 1, lo_open=True)
    _check_range("momentum_initial", v["momentum_initial"], 0, 1, hi_open=True)
    _check_range("momentum_final", v["momentum_final"], 0, 1, hi_open=True)
    if not isinstance(v["momentum_ramp_epochs"], int) or isinstance(v["momentum_ramp_epochs"], bool):
        _fail("momentum_ramp_epochs", v["momentum_ramp_epochs"], "an integer >= 0")
    _check_range("momentum_ramp_epochs", v["momentum_ramp_epochs"], 0, None)
    if v["max_norm"] is not None:
        _check_range("max_norm", v["max_norm"], 0, None)
    if not isinstance(v["max_norm_output"], bool):
        _fail("max_norm_output", v["max_norm_output"], "true or false")
    _check_range("weight_decay", v["weight_decay"], 0, None)
    if v["dampening"] != "momentum":
        _check_range("dampening", v["dampening"], 0, 1)
    betas = v["adam_betas"]
    if not (
        isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        _fail("adam_betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    v["adam_betas"] = list(betas)
    _check_range("adam_eps", v["adam_eps"], 0, None, lo_open=True)
    if not isinstance(v["batch_size"], int) or isinstance(v["batch_size"], bool):
        _fail("batch_size", v["batch_size"], "an integer >= 1")
    _check_range("batch_size", v["batch_size"], 1, None)
    _check_range("init_std", v["init_std"], 0, None, lo_open=True)
    _check_range("input_mean", v["input_mean"], -1e9, 1e9)
    _check_range("input_std", v["input_std"], 0, None, lo_open=True)
    return v


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (a resolved variant plus run settings)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
