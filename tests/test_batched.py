"""The grouped trainer: several runs trained as one stacked model. Each run must come out as it
would alone (on the CPU, bit for bit) whatever company it keeps, its files must be the single-run
trainer's (checkpoints resumable either way, also from a real process killed mid-run), groups
that cannot share a stack are refused, a diverging run stops alone, and each run draws its own
dropout masks."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dropout_repro.__main__ import variant_from_config
from dropout_repro.batched import (
    GroupMasks,
    RunSpec,
    StaticEpoch,
    _renorm_runs_,
    epoch_mode,
    group_key,
    train_group,
)
from dropout_repro.data import load_mnist
from dropout_repro.model import MaskStream, keep_probability
from dropout_repro.optim import renorm_rows_
from dropout_repro.train import CheckpointMismatch, train_run

# Small nets: what is checked here does not depend on the widths.
BASE = {"hidden": [32, 16], "lr0": 0.5}


def quiet(_msg: str) -> None:
    pass


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def metrics(out: Path) -> list[dict[str, str]]:
    return without_seconds(read_metrics(out))


@pytest.fixture(scope="module")
def data(mnist_like_root):
    return load_mnist(str(mnist_like_root))


def alone(variant, seed, epochs, out, data, name="", **kw) -> dict:
    kw.setdefault("log", quiet)
    return train_run(variant, seed, epochs, out, data=data, device="cpu", variant_name=name, **kw)


def together(runs, epochs, data, **kw) -> list[dict]:
    """``runs``: (variant, seed, out_dir[, name]) tuples, trained as one group."""
    kw.setdefault("log", quiet)
    specs = [RunSpec(r[0], r[1], str(r[2]), *r[3:]) for r in runs]
    return train_group(specs, epochs, data=data, device="cpu", **kw)


# --- a run does not depend on its company ----------------------------------------------------

# Each group: the shared settings, then (per-run overrides, seed) for each of its runs.
GROUPS = {
    "sgd_hinton": (
        BASE,
        [
            ({}, 1),
            ({}, 2),
            ({"hidden_dropout": 0.5}, 1),
            ({"input_dropout": 0.2, "hidden_dropout": 0.5}, 3),
            ({"weight_decay": 1e-3, "max_norm": None}, 1),
            ({"lr0": 0.2, "momentum_initial": 0.8, "momentum_final": 0.95}, 4),
            ({"lr0": 0.8, "lr_decay": 0.9, "momentum_ramp_epochs": 2}, 5),
        ],
    ),
    "paper_logistic": (
        {**BASE, "dropout_style": "paper", "activation": "logistic", "lr0": 2.0},
        [
            ({}, 1),
            ({"hidden_dropout": 0.5}, 2),
            ({"input_dropout": 0.2, "hidden_dropout": 0.5, "lr0": 3.0}, 3),
        ],
    ),
    "loss_sum": (
        {**BASE, "loss_reduction": "sum", "lr0": 0.005},
        [({}, 1), ({"hidden_dropout": 0.5}, 2), ({"input_dropout": 0.2, "lr0": 0.002}, 3)],
    ),
    "three_hidden_layers": (
        {**BASE, "hidden": [32, 16, 16]},
        [({}, 1), ({"hidden_dropout": 0.5}, 2), ({"input_dropout": 0.2, "hidden_dropout": 0.3}, 3)],
    ),
    "adam": (
        {**BASE, "optimizer": "adam", "lr0": 0.001},
        [
            ({}, 1),
            ({"lr0": 0.002}, 2),
            ({"hidden_dropout": 0.5}, 3),
            ({"input_dropout": 0.2, "hidden_dropout": 0.5, "lr0": 0.0005}, 1),
        ],
    ),
    "adam_weight_decay": (
        {**BASE, "optimizer": "adam", "lr0": 0.001, "weight_decay": 1e-3},
        [({}, 1), ({"hidden_dropout": 0.5, "lr0": 0.002}, 2)],
    ),
}


@pytest.mark.parametrize("group", GROUPS, ids=list(GROUPS))
def test_each_run_of_a_group_equals_the_same_run_trained_alone(group, data, tmp_path):
    base, members = GROUPS[group]
    runs = [({**base, **over}, seed, tmp_path / f"g{i}") for i, (over, seed) in enumerate(members)]
    together(runs, 3, data)
    for i, (variant, seed, out) in enumerate(runs):
        alone(variant, seed, 3, tmp_path / f"a{i}", data)
        grouped, single = metrics(out), metrics(tmp_path / f"a{i}")
        assert len(grouped) == 3
        # floats are written with repr: equal text is bitwise-equal numbers
        assert grouped == single, f"run {i} ({variant}, seed {seed}) differs from its single run"
    # the runs really differ from one another, so no run can pass by copying another
    losses = {tuple(r["train_loss"] for r in metrics(out)) for _, _, out in runs}
    assert len(losses) == len(runs)


def test_the_same_run_in_different_company_writes_the_same_files(data, tmp_path):
    run = ({**BASE, "input_dropout": 0.2, "hidden_dropout": 0.5}, 7)
    company_a = [({**BASE, "lr0": 0.1}, 1), ({**BASE, "hidden_dropout": 0.3}, 2)]
    company_b = [({**BASE, "weight_decay": 1e-2, "max_norm": None}, 9)]
    together(
        [(v, s, tmp_path / f"a{i}") for i, (v, s) in enumerate(company_a)]
        + [(*run, tmp_path / "in_a", "x")],
        2,
        data,
        checkpoint_every=1,
    )
    together(
        [(*run, tmp_path / "in_b", "x")]
        + [(v, s, tmp_path / f"b{i}") for i, (v, s) in enumerate(company_b)],
        2,
        data,
        checkpoint_every=1,
    )
    a, b = tmp_path / "in_a", tmp_path / "in_b"
    assert metrics(a) == metrics(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa.pop("wall_seconds"), sb.pop("wall_seconds")
    assert sa == sb
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert_same_checkpoint_state(ca, cb)


def assert_same_checkpoint_state(ca: dict, cb: dict) -> None:
    """Everything a checkpoint resumes from, compared bit for bit (the rows' seconds aside)."""
    assert set(ca) == set(cb)
    for key in ("fingerprint", "identity", "epoch", "mask_counter"):
        assert ca[key] == cb[key], key
    assert without_seconds(ca["rows"]) == without_seconds(cb["rows"])
    assert torch.equal(ca["data_rng"], cb["data_rng"])
    assert ca["model"].keys() == cb["model"].keys()
    for name in ca["model"]:
        assert torch.equal(ca["model"][name], cb["model"][name]), name
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for name in sa[i]:
            assert torch.equal(sa[i][name], sb[i][name]), (i, name)
    # The optimiser's settings too: this epoch's learning rate and momentum, the bounds.
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]


# --- the files are the single-run trainer's --------------------------------------------------


def test_a_grouped_run_writes_the_summary_and_checkpoint_of_a_single_run(data, tmp_path):
    variants = [{**BASE, "hidden_dropout": 0.5}, {**BASE, "lr0": 0.2, "input_dropout": 0.2}]
    summaries = together(
        [(v, 3, tmp_path / f"g{i}", f"v{i}") for i, v in enumerate(variants)], 2, data
    )
    for i, v in enumerate(variants):
        single = alone(v, 3, 2, tmp_path / f"a{i}", data, name=f"v{i}")
        grouped = summaries[i]
        assert json.loads((tmp_path / f"g{i}" / "summary.json").read_text()) == grouped
        assert grouped.keys() == single.keys()
        for key in grouped.keys() - {"wall_seconds", "resumed_from_epoch"}:
            assert grouped[key] == single[key], key
        assert grouped["variant_name"] == f"v{i}" and grouped["epochs_completed"] == 2
        assert_same_checkpoint_state(
            torch.load(tmp_path / f"g{i}" / "checkpoint.pt", weights_only=True),
            torch.load(tmp_path / f"a{i}" / "checkpoint.pt", weights_only=True),
        )


OPTIMIZERS = {
    "sgd_hinton": {**BASE, "input_dropout": 0.2, "hidden_dropout": 0.5},
    "adam": {**BASE, "optimizer": "adam", "lr0": 0.001, "hidden_dropout": 0.5},
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_group_checkpoint_is_resumed_by_the_single_run_trainer(optimizer, data, tmp_path):
    variant = OPTIMIZERS[optimizer]
    other = {**variant, "lr0": variant["lr0"] / 2, "hidden_dropout": 0.0}
    together([(variant, 1, tmp_path / "r"), (other, 2, tmp_path / "o")], 1, data)
    log: list[str] = []
    summary = alone(variant, 1, 3, tmp_path / "r", data, log=log.append)
    alone(variant, 1, 3, tmp_path / "ref", data)
    assert summary["resumed_from_epoch"] == 1
    assert any("resuming from checkpoint at epoch 1" in m for m in log)
    assert metrics(tmp_path / "r") == metrics(tmp_path / "ref")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_single_run_checkpoint_is_resumed_by_the_grouped_trainer(optimizer, data, tmp_path):
    variant = OPTIMIZERS[optimizer]
    other = {**variant, "lr0": variant["lr0"] * 2}
    alone(variant, 1, 1, tmp_path / "r", data)
    alone(other, 2, 1, tmp_path / "o", data)
    log: list[str] = []
    summaries = together(
        [(variant, 1, tmp_path / "r"), (other, 2, tmp_path / "o")], 3, data, log=log.append
    )
    assert [s["resumed_from_epoch"] for s in summaries] == [1, 1]
    assert sum("resuming from checkpoint at epoch 1" in m for m in log) == 2
    alone(variant, 1, 3, tmp_path / "ref_r", data)
    alone(other, 2, 3, tmp_path / "ref_o", data)
    assert metrics(tmp_path / "r") == metrics(tmp_path / "ref_r")
    assert metrics(tmp_path / "o") == metrics(tmp_path / "ref_o")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_runs_whose_checkpoints_stand_at_different_epochs_train_correctly(
    optimizer, data, tmp_path
):
    variant = OPTIMIZERS[optimizer]
    runs = [
        (variant, 1, tmp_path / "fresh"),
        ({**variant, "lr0": variant["lr0"] * 2}, 2, tmp_path / "at1"),
        ({**variant, "hidden_dropout": 0.0}, 3, tmp_path / "at2"),
        (variant, 4, tmp_path / "done"),
    ]
    for (v, seed, out), epochs in zip(runs[1:], (1, 2, 4)):
        alone(v, seed, epochs, out, data, checkpoint_every=1)
    summaries = together(runs, 4, data)
    assert [s["resumed_from_epoch"] for s in summaries] == [None, 1, 2, 4]
    for i, (v, seed, out) in enumerate(runs):
        alone(v, seed, 4, tmp_path / f"ref{i}", data)
        assert metrics(out) == metrics(tmp_path / f"ref{i}"), out.name
        assert summaries[i]["epochs_completed"] == 4


# --- a real process killed mid-run -----------------------------------------------------------

KILL_CONFIG = """\
defaults:
  hidden: [32, 16]
  lr0: 0.5
variants:
  a:
    hidden_dropout: 0.5
  b:
    input_dropout: 0.2
    lr0: 0.25
"""


def test_a_killed_group_process_resumes_and_finishes_with_the_same_numbers(
    mnist_like_root, tmp_path
):
    # A grouped epoch of four such runs takes about a tenth of a second: thirty of them leave the
    # poll below ample time to catch the group between its third and its last epoch.
    epochs = 30
    config = tmp_path / "config.yaml"
    config.write_text(KILL_CONFIG)
    out_root = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "dropout_repro", "train-group",
        "--config", str(config), "--variants", "a", "b", "--seeds", "1", "2",
        "--epochs", str(epochs), "--data-root", str(mnist_like_root),
        "--out-root", str(out_root), "--device", "cpu",
        "--checkpoint-every", "1", "--threads", "1",
    ]  # fmt: skip
    outs = [out_root / v / f"seed{s}" for v in "ab" for s in (1, 2)]
    err = tmp_path / "killed.stderr"
    with open(err, "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        # Three rows in every run's metrics.csv: each run's checkpoint of epoch 2 was written
        # before its third row.
        while not all((o / "metrics.csv").exists() and len(read_metrics(o)) >= 3 for o in outs):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "no third epoch in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = [len(read_metrics(o)) for o in outs]
    assert all(3 <= n < epochs for n in done_before_kill), done_before_kill
    assert not any((o / "summary.json").exists() for o in outs)
    ckpt_epochs = [torch.load(o / "checkpoint.pt", weights_only=True)["epoch"] for o in outs]
    assert all(e >= 2 for e in ckpt_epochs), ckpt_epochs

    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stderr.splitlines() if "resuming from checkpoint" in line]
    assert len(said) == len(outs), resumed.stderr
    printed = [json.loads(line) for line in resumed.stdout.strip().splitlines()]
    assert [(p["variant"], p["seed"]) for p in printed] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]

    # The same group, uninterrupted, in this process (one thread, as the subprocesses).
    cfg = yaml.safe_load(KILL_CONFIG)
    reference = tmp_path / "reference"
    specs = [
        RunSpec(variant_from_config(cfg, v), s, str(reference / v / f"seed{s}"), v)
        for v in "ab"
        for s in (1, 2)
    ]
    train_group(specs, epochs, data_root=mnist_like_root, device="cpu", log=quiet)
    for o in outs:
        ref = reference / o.parent.name / o.name
        assert metrics(o) == metrics(ref), o
        summary = json.loads((o / "summary.json").read_text())
        assert 2 <= summary["resumed_from_epoch"] <= done_before_kill[outs.index(o)]
        assert summary["epochs_completed"] == epochs
        assert f"[{o.parent.name} {o.name.replace('seed', 'seed ')}] resuming" in resumed.stderr


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variants",
    [
        [BASE, {**BASE, "hidden": [32]}],
        [BASE, {**BASE, "optimizer": "torch_sgd"}],
        [{**BASE, "optimizer": "torch_sgd"}],
        [{**BASE, "optimizer": "adam"}, {**BASE, "optimizer": "adam", "adam_betas": [0.8, 0.99]}],
        [{**BASE, "optimizer": "adam"}, {**BASE, "optimizer": "adam", "weight_decay": 1e-4}],
        [BASE, {**BASE, "optimizer": "adam"}],
        [BASE, {**BASE, "activation": "logistic"}],
        [BASE, {**BASE, "batch_size": 50}],
    ],
    ids=[
        "hidden",
        "torch_sgd_with_sgd_hinton",
        "torch_sgd_alone",
        "adam_betas",
        "adam_weight_decay",
        "optimizer_family",
        "activation",
        "batch_size",
    ],
)
def test_runs_that_cannot_share_a_stack_are_refused(variants, data, tmp_path):
    runs = [(v, 1, tmp_path / f"r{i}") for i, v in enumerate(variants)]
    with pytest.raises(ValueError, match="cannot share a stack"):
        together(runs, 1, data)
    assert not any(out.exists() for _, _, out in runs)  # refused before anything was written


def test_an_empty_group_is_refused(data):
    with pytest.raises(ValueError, match="at least one run"):
        train_group([], 1, data=data, device="cpu", log=quiet)


def test_group_key_separates_what_must_be_shared_from_what_may_differ():
    assert group_key({"optimizer": "torch_sgd"}) is None
    assert group_key({**BASE, "optimizer": "torch_sgd", "lr0": 0.1}) is None
    key = group_key(BASE)
    assert key is not None
    per_run = [
        {"input_dropout": 0.2},
        {"hidden_dropout": 0.5},
        {"lr0": 0.01},
        {"lr_decay": 0.9},
        {"momentum_initial": 0.9},
        {"momentum_final": 0.5},
        {"momentum_ramp_epochs": 3},
        {"max_norm": None},
        {"max_norm": 2.0},
        {"weight_decay": 1e-3},
    ]
    for change in per_run:
        assert group_key({**BASE, **change}) == key, change
    shared = [
        {"hidden": [32]},
        {"hidden": [16, 32]},
        {"activation": "logistic"},
        {"dropout_style": "paper"},
        {"optimizer": "adam"},
        {"batch_size": 50},
        {"loss_reduction": "sum"},
        {"init_std": 0.1},
        {"input_mean": 0.0},
        {"input_std": 1.0},
        {"max_norm_output": True},
    ]
    for change in shared:
        assert group_key({**BASE, **change}) != key, change
    adam = {**BASE, "optimizer": "adam"}
    adam_key = group_key(adam)
    for change in ({"lr0": 0.01}, {"hidden_dropout": 0.5}, {"input_dropout": 0.2},
                   {"max_norm": None}):  # fmt: skip
        assert group_key({**adam, **change}) == adam_key, change
    for change in ({"adam_betas": [0.8, 0.999]}, {"adam_eps": 1e-6}, {"weight_decay": 1e-4}):
        assert group_key({**adam, **change}) != adam_key, change


def test_a_checkpoint_of_another_run_is_refused(data, tmp_path):
    alone(BASE, 1, 2, tmp_path / "r", data)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    before = ckpt.read_bytes()
    runs = [({**BASE, "lr0": 0.1}, 5, tmp_path / "other"), (BASE, 2, tmp_path / "r")]
    with pytest.raises(CheckpointMismatch, match=r"\bseed\b") as err:
        together(runs, 3, data)
    assert "another run" in str(err.value)
    assert ckpt.read_bytes() == before  # refused, and left as it was
    assert not (tmp_path / "r" / "checkpoint.stale.pt").exists()


def test_a_stale_checkpoint_is_moved_aside_on_restart(data, tmp_path):
    alone(BASE, 1, 2, tmp_path / "r", data)
    stale = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    other = {**BASE, "hidden_dropout": 0.5}
    log: list[str] = []
    summaries = together(
        [(other, 1, tmp_path / "r"), (BASE, 3, tmp_path / "s")],
        2,
        data,
        on_stale_checkpoint="restart",
        log=log.append,
    )
    assert summaries[0]["resumed_from_epoch"] is None
    assert (tmp_path / "r" / "checkpoint.stale.pt").read_bytes() == stale
    assert any("moved aside" in m and "hidden_dropout" in m for m in log)
    alone(other, 1, 2, tmp_path / "ref_r", data)
    alone(BASE, 3, 2, tmp_path / "ref_s", data)
    assert metrics(tmp_path / "r") == metrics(tmp_path / "ref_r")
    assert metrics(tmp_path / "s") == metrics(tmp_path / "ref_s")


# --- divergence ------------------------------------------------------------------------------


def test_a_diverging_run_stops_alone_and_its_company_finishes(data, tmp_path):
    blowup = {**BASE, "lr0": 1e6, "max_norm": None}
    runs = [
        (BASE, 1, tmp_path / "calm"),
        (blowup, 1, tmp_path / "blowup"),
        ({**BASE, "hidden_dropout": 0.5}, 2, tmp_path / "dropout"),
    ]
    log: list[str] = []
    summaries = together(runs, 4, data, log=log.append)
    reference = alone(blowup, 1, 4, tmp_path / "blowup_alone", data)
    assert reference["diverged"] is True  # the setting does diverge
    bad = summaries[1]
    assert bad["diverged"] is True
    assert bad["diverged_epoch"] == reference["diverged_epoch"]
    assert 1 <= bad["diverged_epoch"] < 4
    assert bad["epochs_completed"] == bad["diverged_epoch"]
    assert len(read_metrics(tmp_path / "blowup")) == bad["diverged_epoch"]
    assert metrics(tmp_path / "blowup") == metrics(tmp_path / "blowup_alone")
    assert json.loads((tmp_path / "blowup" / "summary.json").read_text())["diverged"] is True
    assert any(m.startswith("[run seed 1] diverged") for m in log)
    for i in (0, 2):
        v, seed, out = runs[i]
        assert summaries[i]["diverged"] is False and summaries[i]["epochs_completed"] == 4
        alone(v, seed, 4, tmp_path / f"alone{i}", data)
        assert metrics(out) == metrics(tmp_path / f"alone{i}")


# --- the masks of a group --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["inverted", "paper"])
def test_group_masks_are_each_runs_own_masks(style):
    # (input, hidden) dropout per run: none, hidden only, both, input only
    probs = [(0.0, 0.0), (0.0, 0.5), (0.2, 0.5), (0.2, 0.0)]
    seeds = [11, 12, 13, 14]
    starts = [0, 3, 7, 5]  # streams part-way through, as after a resume
    widths = [13, 6, 5]  # 7 x 13 = 91 inputs: not a whole number of 64-bit words
    batch = 7
    variants = [{"input_dropout": a, "hidden_dropout": b} for a, b in probs]
    runs = [SimpleNamespace(masks=MaskStream(s, counter=c)) for s, c in zip(seeds, starts)]
    masks = GroupMasks(runs, variants, style, widths, torch.device("cpu"))
    alone = [MaskStream(s, counter=c) for s, c in zip(seeds, starts)]
    for call in range(3):
        before = [r.masks.counter for r in runs]
        sites = masks(batch, torch.float32, torch.device("cpu"))
        assert len(sites) == len(widths)
        for k, ((p_in, p_hid), stream) in enumerate(zip(probs, alone)):
            ps = [p_in] + [p_hid] * (len(widths) - 1)

            def site(p, w):
                if not p:
                    return None
                keep = keep_probability(p)
                return ((batch, w), keep, 1.0 / keep if style == "inverted" else 1.0)

            own = stream.step_masks([site(p, w) for p, w in zip(ps, widths)], torch.float32, "cpu")
            for s, (p, w) in enumerate(zip(ps, widths)):
                mask, scale = sites[s]
                assert mask.shape == (len(runs), batch, w)
                if p == 0:
                    assert bool((mask[k] == 1.0).all())  # keeps every unit, unscaled
                    assert float(scale[k].flatten()[0]) == 1.0
                else:
                    assert torch.equal(mask[k], own[s])  # bit for bit, scale included
                    assert not bool((own[s] != 0).all())
                    keep = keep_probability(p)
                    expected = 1.0 / keep if style == "inverted" else 1.0
                    assert float(scale[k].flatten()[0]) == pytest.approx(expected, rel=1e-7)
        # the counters live on the device until synced
        assert [r.masks.counter for r in runs] == before
        masks.sync()
        assert [r.masks.counter for r in runs] == [s.counter for s in alone]
    # one value per step for a run that drops anything, none for one that drops nothing
    assert [r.masks.counter for r in runs] == [0, 3 + 3, 7 + 3, 5 + 3]


def _stack_at_epoch(overrides, data, tmp_path):
    """A CPU ``Group`` of runs of ``BASE`` with each of ``overrides``, set up for an epoch at
    momentum 0.5; returns it and its runs."""
    from dropout_repro.batched import Group
    from dropout_repro.train import RunState
    from dropout_repro.variant import resolve

    train, test = data
    dev = torch.device("cpu")
    variants = [resolve({**BASE, **over}) for over in overrides]
    runs = [RunState(v, k, tmp_path / str(k), dev, train, test, None) for k, v in enumerate(variants)]
    group = Group(runs, dev)
    group.opt.set_epoch([v["lr0"] for v in variants], [0.5] * len(runs), dev)
    return group, runs


def _refuse_the_host(monkeypatch, what: str) -> None:
    """Make every way of building a tensor from Python numbers, or reading one back, fail."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} went to the host")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("optimizer", ["sgd_hinton", "adam"])
def test_a_group_step_takes_nothing_from_the_host(optimizer, data, tmp_path, monkeypatch):
    # On a GPU, a step that builds a tensor from Python numbers or reads one back waits on the
    # host. Once a stack is set up for its epoch, its steps must do neither; here every way of
    # doing so is made to fail.
    train, _ = data
    overrides = [
        {"optimizer": optimizer, "input_dropout": 0.2, "hidden_dropout": 0.5},
        {"optimizer": optimizer, "hidden_dropout": 0.5, "lr0": 0.25},
        {"optimizer": optimizer},
    ]
    group, runs = _stack_at_epoch(overrides, data, tmp_path)
    loss_sum = torch.zeros(3, dtype=torch.float64)
    err_sum = torch.zeros(3, dtype=torch.int64)
    batches = torch.split(torch.stack([torch.randperm(len(train)) for _ in runs]), 50, dim=1)
    group.train_batch(train, batches[0], "mean", loss_sum, err_sum)  # the first step sets up
    before = [w.clone() for w in group.weights]
    _refuse_the_host(monkeypatch, "a training step")
    for idx in batches[1:4]:
        group.train_batch(train, idx, "mean", loss_sum, err_sum)
    monkeypatch.undo()
    assert all(not torch.equal(a, b) for a, b in zip(before, group.weights))  # it did train
    assert group.masks.counters.tolist() == [4, 4, 0]
    assert [r.masks.counter for r in runs] == [0, 0, 0]  # synced only for a checkpoint
    group.sync_to_runs(0)
    assert [r.masks.counter for r in runs] == [4, 4, 0]


# --- the epoch a CUDA graph captures -----------------------------------------------------------


@pytest.mark.parametrize("group", ["sgd_hinton", "adam", "adam_weight_decay", "paper_logistic"])
def test_the_captured_epochs_code_gives_the_plain_loops_numbers(group, data, tmp_path):
    # On a GPU the epochs are replayed from a captured graph: fixed index and sum buffers, the
    # optimisers' numbers written into their tensors, Adam's per-step numbers from device
    # tables. Run uncaptured ("static"), that code must give the plain loop's numbers bit for
    # bit, checkpoints and resumes included.
    base, members = GROUPS[group]
    runs = [({**base, **over}, seed) for over, seed in members]
    plain = [(v, seed, tmp_path / f"p{i}") for i, (v, seed) in enumerate(runs)]
    static = [(v, seed, tmp_path / f"s{i}") for i, (v, seed) in enumerate(runs)]
    together(plain, 4, data, checkpoint_every=2, cuda_graphs="off")
    together(static, 2, data, checkpoint_every=2, cuda_graphs="static")
    summaries = together(static, 4, data, checkpoint_every=2, cuda_graphs="static")
    for (_, _, a), (_, _, b), summary in zip(plain, static, summaries):
        assert metrics(a) == metrics(b)
        assert len(metrics(b)) == 4 and summary["resumed_from_epoch"] == 2
        assert summary["cuda_graphs"] is False  # nothing was captured on the CPU
        assert_same_checkpoint_state(
            torch.load(a / "checkpoint.pt", weights_only=True),
            torch.load(b / "checkpoint.pt", weights_only=True),
        )


@pytest.mark.parametrize("optimizer", ["sgd_hinton", "adam"])
def test_the_captured_epoch_takes_nothing_from_the_host(optimizer, data, tmp_path, monkeypatch):
    # What a CUDA graph captures must not read from or write to the host: every way of doing so
    # fails here while the epoch's steps run.
    train, _ = data
    overrides = [
        {"optimizer": optimizer, "input_dropout": 0.2, "hidden_dropout": 0.5},
        {"optimizer": optimizer, "lr0": 0.25, "weight_decay": 1e-3},
    ]
    group, runs = _stack_at_epoch(overrides, data, tmp_path)
    epoch = StaticEpoch(group, train, 50, "mean", capture=False)
    perms = torch.stack([torch.randperm(len(train)) for _ in runs])
    epoch(perms)  # the first epoch builds the caches the capture would find
    steps = len(epoch.batches)
    before = [w.clone() for w in group.weights]
    group.opt.prepare_steps(steps)
    _refuse_the_host(monkeypatch, "a captured step")
    epoch._steps()
    monkeypatch.undo()
    group.opt.finish_steps(steps)
    assert all(not torch.equal(a, b) for a, b in zip(before, group.weights))
    assert group.masks.counters.tolist() == [2 * steps, 0]


def test_a_bad_cuda_graphs_setting_is_refused_by_name():
    with pytest.raises(ValueError, match=r"cuda_graphs = 'sometimes' is not valid.*auto, on, off"):
        epoch_mode("sometimes", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device; this run is on cpu"):
        epoch_mode("on", torch.device("cpu"))
    assert epoch_mode("auto", torch.device("cpu")) == "eager"
    assert epoch_mode("auto", torch.device("cuda")) == "graph"
    assert epoch_mode("off", torch.device("cuda")) == "eager"


# --- the max-norm bound ------------------------------------------------------------------------




def test_the_stacked_bound_renormalises_each_run_as_renorm_rows():
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 50, 40, generator=gen) * 0.1
    bounds = [0.3, 0.5, math.inf]
    expected = stack.clone()
    for k, c in enumerate(bounds):
        if math.isfinite(c):
            renorm_rows_(expected[k], c)
    got = stack.clone()
    _renorm_runs_(got, torch.tensor(bounds).view(-1, 1))
    assert torch.equal(got[2], stack[2])  # no bound: untouched
    for k in range(len(bounds)):
        assert torch.equal(got[k], expected[k]), k


def test_a_run_whose_max_norm_binds_equals_its_single_run(data, tmp_path):
    # The initial row norms are about 0.01 * sqrt(784) = 0.28: a bound of 0.2 binds from the
    # first step.
    bounded = {**BASE, "max_norm": 0.2}
    runs = [
        (bounded, 1, tmp_path / "g0"),
        ({**bounded, "hidden_dropout": 0.5}, 1, tmp_path / "g1"),
        ({**bounded, "input_dropout": 0.2, "max_norm": 0.25}, 2, tmp_path / "g2"),
    ]
    together(runs, 3, data)
    for i, (v, seed, out) in enumerate(runs):
        alone(v, seed, 3, tmp_path / f"a{i}", data)
        rows = metrics(out)
        assert all(float(r["max_row_norm"]) <= v["max_norm"] * (1 + 1e-6) for r in rows)
        assert rows == metrics(tmp_path / f"a{i}"), i


# --- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_grouped_run_on_the_gpu_equals_its_run_alone_within_rounding(
    optimizer, mnist_like_root, tmp_path
):
    # On a GPU the stack is one batched product, summed in another order than the single
    # products: equal up to rounding, not bit for bit (TF32 off, so that rounding stays fp32's).
    variant = OPTIMIZERS[optimizer]
    family = [variant, {**variant, "lr0": variant["lr0"] / 2, "hidden_dropout": 0.0}]
    kw = dict(data_root=mnist_like_root, device="cuda", tf32=False, log=quiet)
    specs = [RunSpec(v, i + 1, str(tmp_path / f"g{i}")) for i, v in enumerate(family)]
    summaries = train_group(specs, 3, **kw)
    for i, v in enumerate(family):
        assert summaries[i]["device"].startswith("cuda")
        train_run(v, i + 1, 3, tmp_path / f"a{i}", **kw)
        grouped, single = read_metrics(tmp_path / f"g{i}"), read_metrics(tmp_path / f"a{i}")
        assert len(grouped) == len(single) == 3
        for g, s in zip(grouped, single):
            assert all(math.isfinite(float(g[k])) for k in ("train_loss", "test_loss"))
            assert abs(int(g["test_errors"]) - int(s["test_errors"])) <= 2
            assert float(g["test_loss"]) == pytest.approx(float(s["test_loss"]), rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_epochs_replayed_from_a_cuda_graph_equal_the_plain_loop_within_rounding(
    optimizer, mnist_like_root, tmp_path
):
    variant = OPTIMIZERS[optimizer]
    family = [variant, {**variant, "lr0": variant["lr0"] / 2, "hidden_dropout": 0.0}]
    kw = dict(data_root=mnist_like_root, device="cuda", tf32=False, log=quiet)
    results = {}
    for mode in ("off", "on"):
        specs = [RunSpec(v, i + 1, str(tmp_path / mode / str(i))) for i, v in enumerate(family)]
        results[mode] = train_group(specs, 4, cuda_graphs=mode, **kw)
    assert all(s["cuda_graphs"] for s in results["on"])
    assert not any(s["cuda_graphs"] for s in results["off"])
    for i in range(len(family)):
        plain, graphed = (read_metrics(tmp_path / m / str(i)) for m in ("off", "on"))
        assert plain[0]["test_errors"] == graphed[0]["test_errors"]  # epoch 1 is plain in both
        for a, b in zip(plain, graphed):
            # the same kernels on the same buffers: equal but for any reordered reduction
            assert abs(int(a["test_errors"]) - int(b["test_errors"])) <= 2
            assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
