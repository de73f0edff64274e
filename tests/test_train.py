"""One training run on small generated data: its files, its determinism, checkpoints and resumption
(including a real process killed mid-run), divergence, and argument checks."""

from __future__ import annotations

import csv
import json
import math
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import N_TEST, N_TRAIN, blob_digits, write_idx_images, write_idx_labels
from dropout_repro import schedules
from dropout_repro.data import epoch_batches, load_mnist
from dropout_repro.train import COLUMNS, CheckpointMismatch, train_run
from dropout_repro.variant import resolve

# A small net with both dropouts, so that the masks are part of every trajectory checked here.
SMALL = {"hidden": [32], "lr0": 0.5, "input_dropout": 0.2, "hidden_dropout": 0.5}


def quiet(_msg: str) -> None:
    pass


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def run(variant, out, root, seed=1, epochs=3, **kw) -> dict:
    kw.setdefault("log", quiet)
    return train_run(variant, seed, epochs, out, data_root=root, device="cpu", **kw)


# --- what a run writes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_run(mnist_like_root, tmp_path_factory):
    """Four epochs with a tight max-norm bound (0.3; the initial row norms are about
    0.01 * sqrt(784) = 0.28), so the constraint binds."""
    out = tmp_path_factory.mktemp("bounded")
    variant = {**SMALL, "max_norm": 0.3}
    summary = run(variant, out, mnist_like_root, seed=3, epochs=4)
    return variant, out, summary


def test_metrics_csv_has_the_columns_and_one_row_per_epoch(bounded_run):
    variant, out, summary = bounded_run
    with open(out / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        errors = int(r["test_errors"])  # an integer, not "12.0"
        assert 0 <= errors <= N_TEST
        assert 0 <= int(r["train_errors"]) <= N_TRAIN
        assert float(r["test_error_pct"]) == pytest.approx(100.0 * errors / N_TEST, abs=1e-12)
        assert math.isfinite(float(r["train_loss"])) and float(r["test_loss"]) > 0
        assert float(r["seconds"]) > 0


def test_metrics_lr_and_momentum_are_the_schedules(bounded_run):
    variant, out, _ = bounded_run
    v = resolve(variant)
    for r in read_metrics(out):
        t = int(r["epoch"]) - 1  # row "epoch 1" is trained with the schedules at t = 0
        # lr = 0.5 * 0.998^t;  momentum = 0.5 + (t / 500) * (0.99 - 0.5) = 0.5 + 0.00098 t
        assert float(r["lr"]) == pytest.approx(0.5 * 0.998**t, rel=1e-12)
        assert float(r["momentum"]) == pytest.approx(0.5 + 0.00098 * t, rel=1e-12)
        assert float(r["lr"]) == schedules.learning_rate(t, v["lr0"], v["lr_decay"])


def test_max_row_norm_stays_within_the_bound(bounded_run, mnist_like_root, tmp_path):
    _, out, _ = bounded_run
    norms = [float(r["max_row_norm"]) for r in read_metrics(out)]
    assert all(n <= 0.3 + 1e-6 for n in norms)
    # and the bound does bind: the same run without it goes past 0.3
    run({**SMALL, "max_norm": None}, tmp_path, mnist_like_root, seed=3, epochs=4)
    assert max(float(r["max_row_norm"]) for r in read_metrics(tmp_path)) > 0.3 + 1e-3


def test_summary_json(bounded_run):
    variant, out, summary = bounded_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    rows = read_metrics(out)
    errors = [int(r["test_errors"]) for r in rows]
    assert summary["final_test_errors"] == errors[-1]
    assert summary["best_test_errors"] == min(errors)
    assert errors[summary["best_epoch"] - 1] == min(errors)
    assert summary["epochs_requested"] == summary["epochs_completed"] == 4
    assert summary["seed"] == 3
    assert summary["variant"] == resolve(variant)
    assert summary["device"] == "cpu"
    assert summary["torch_version"] == torch.__version__
    assert summary["tf32"] is False
    # a CPU run flushes denormal floats to zero (x86 can; elsewhere it is recorded as not done)
    assert summary["denormals_flushed"] is (platform.machine().lower() in ("x86_64", "amd64"))
    if summary["denormals_flushed"]:
        assert (torch.tensor([1e-39]) * 1.0).item() == 0.0
    assert summary["wall_seconds"] > 0
    assert summary["diverged"] is False and summary["diverged_epoch"] is None
    assert summary["resumed_from_epoch"] is None
    assert (summary["train_size"], summary["test_size"]) == (N_TRAIN, N_TEST)
    assert len(summary["fingerprint"]) == 16


def test_the_model_learns(mnist_like_root, tmp_path):
    summary = run({**SMALL, "max_norm": None}, tmp_path, mnist_like_root, epochs=5)
    rows = read_metrics(tmp_path)
    # chance is 90 % errors, 180 of 200; the blobs are easy to tell apart
    assert summary["final_test_errors"] < 40
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


# --- data ----------------------------------------------------------------------------------------


def test_load_mnist_reads_the_idx_files_and_standardises(mnist_like_root):
    train, test = load_mnist(str(mnist_like_root))
    assert train.images.shape == (N_TRAIN, 784) and test.images.shape == (N_TEST, 784)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    raw = mnist_like_root / "MNIST" / "raw"
    pixels = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:], dtype=np.uint8)
    expected = (
        torch.from_numpy(pixels.reshape(N_TEST, 784).astype(np.float32)) / 255 - 0.1307
    ) / 0.3081
    torch.testing.assert_close(test.images, expected, rtol=1e-6, atol=1e-6)
    assert test.labels.tolist() == labels.tolist()


def test_train_limit_keeps_the_first_images(mnist_like_root, tmp_path):
    full, test = load_mnist(str(mnist_like_root))
    part, test2 = load_mnist(str(mnist_like_root), train_limit=100)
    assert torch.equal(part.images, full.images[:100]) and torch.equal(
        part.labels, full.labels[:100]
    )
    assert torch.equal(test2.images, test.images)  # the test set is never cut
    summary = run(SMALL, tmp_path, mnist_like_root, epochs=1, train_limit=100)
    assert summary["train_size"] == 100 and summary["test_size"] == N_TEST
    assert int(read_metrics(tmp_path)[0]["train_errors"]) <= 100
    with pytest.raises(ValueError, match="train_limit = 0"):
        load_mnist(str(mnist_like_root), train_limit=0)


def test_epoch_batches_cover_every_image_once():
    batches = epoch_batches(250, 100, torch.Generator().manual_seed(0), "cpu")
    assert [len(b) for b in batches] == [100, 100, 50]  # the last, smaller batch is kept
    assert sorted(torch.cat(batches).tolist()) == list(range(250))


def test_data_passed_in_gives_the_same_run_as_data_root(mnist_like_root, tmp_path):
    data = load_mnist(str(mnist_like_root))
    a = tmp_path / "a"
    b = tmp_path / "b"
    run(SMALL, a, mnist_like_root, epochs=2)
    train_run(SMALL, 1, 2, b, data=data, device="cpu", log=quiet)
    assert without_seconds(read_metrics(a)) == without_seconds(read_metrics(b))


def test_train_limit_applies_to_data_passed_in(mnist_like_root, tmp_path):
    data = load_mnist(str(mnist_like_root))
    summary = train_run(SMALL, 1, 1, tmp_path, data=data, device="cpu", train_limit=100, log=quiet)
    assert summary["train_size"] == 100


# --- determinism ---------------------------------------------------------------------------------


def test_same_variant_and_seed_give_identical_metrics(mnist_like_root, tmp_path):
    run(SMALL, tmp_path / "a", mnist_like_root, seed=5)
    run(SMALL, tmp_path / "b", mnist_like_root, seed=5)
    run(SMALL, tmp_path / "c", mnist_like_root, seed=6)
    a, b, c = (without_seconds(read_metrics(tmp_path / d)) for d in "abc")
    assert a == b  # the floats are written with repr: equal text is bitwise-equal numbers
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in c]
    assert [r["test_loss"] for r in a] != [r["test_loss"] for r in c]


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        SMALL,
        {**SMALL, "optimizer": "torch_sgd"},
        {**SMALL, "optimizer": "adam", "lr0": 0.001},
    ],
    ids=["sgd_hinton", "torch_sgd", "adam"],
)
def test_a_resumed_run_equals_an_uninterrupted_one(variant, mnist_like_root, tmp_path):
    log: list[str] = []
    run(variant, tmp_path / "a", mnist_like_root, epochs=2, checkpoint_every=1)
    summary = run(variant, tmp_path / "a", mnist_like_root, epochs=4, log=log.append)
    run(variant, tmp_path / "b", mnist_like_root, epochs=4)
    assert summary["resumed_from_epoch"] == 2
    assert any("resuming from checkpoint at epoch 2" in m for m in log)
    assert without_seconds(read_metrics(tmp_path / "a")) == without_seconds(
        read_metrics(tmp_path / "b")
    )


def test_a_checkpoint_with_more_epochs_than_asked_is_refused(mnist_like_root, tmp_path):
    run(SMALL, tmp_path, mnist_like_root, epochs=2)
    with pytest.raises(CheckpointMismatch, match="holds 2 epochs, more than the 1"):
        run(SMALL, tmp_path, mnist_like_root, epochs=1)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"variant": {**SMALL, "lr0": 0.25}}, "lr0"),
        ({"seed": 2}, "seed"),
        ({"train_limit": 300}, "train_limit"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused(change, key, mnist_like_root, tmp_path):
    run(SMALL, tmp_path, mnist_like_root, seed=1, epochs=2)
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    kwargs = {"variant": SMALL, "seed": 1, **change}
    with pytest.raises(CheckpointMismatch, match=rf"\b{key}\b") as err:
        run(kwargs.pop("variant"), tmp_path, mnist_like_root, epochs=3, **kwargs)
    assert "another run" in str(err.value)
    assert ckpt.read_bytes() == before  # refused, and left as it was


def test_a_stale_checkpoint_is_moved_aside_and_not_used_on_restart(mnist_like_root, tmp_path):
    other = {**SMALL, "lr0": 0.25}
    run(SMALL, tmp_path / "a", mnist_like_root, epochs=2)
    stale = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    log: list[str] = []
    summary = run(
        other,
        tmp_path / "a",
        mnist_like_root,
        epochs=2,
        on_stale_checkpoint="restart",
        log=log.append,
    )
    assert summary["resumed_from_epoch"] is None
    assert (tmp_path / "a" / "checkpoint.stale.pt").read_bytes() == stale
    assert any("moved aside" in m and "lr0" in m for m in log)
    run(other, tmp_path / "b", mnist_like_root, epochs=2)  # the same run from scratch
    assert without_seconds(read_metrics(tmp_path / "a")) == without_seconds(
        read_metrics(tmp_path / "b")
    )


def test_a_completed_run_rerun_after_its_outputs_were_removed_writes_them_again(
    mnist_like_root, tmp_path
):
    run(SMALL, tmp_path, mnist_like_root, epochs=2)
    expected = without_seconds(read_metrics(tmp_path))
    (tmp_path / "metrics.csv").unlink()
    (tmp_path / "summary.json").unlink()
    summary = run(SMALL, tmp_path, mnist_like_root, epochs=2)
    assert summary["resumed_from_epoch"] == 2 and (tmp_path / "summary.json").exists()
    assert without_seconds(read_metrics(tmp_path)) == expected


def test_a_checkpoint_made_on_other_data_is_refused(mnist_like_root, tmp_path):
    other_root = tmp_path / "other_data"
    raw = other_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images, labels = blob_digits(n, rng)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    run(SMALL, tmp_path / "out", other_root, epochs=1)
    with pytest.raises(CheckpointMismatch):
        run(SMALL, tmp_path / "out", mnist_like_root, epochs=2)


def cli_train(root: Path, out: Path, epochs: int, variant: dict, checkpoint_every: int):
    return [
        sys.executable, "-m", "dropout_repro", "train",
        "--variant-json", json.dumps(variant),
        "--seed", "4", "--epochs", str(epochs),
        "--data-root", str(root), "--out", str(out),
        "--device", "cpu", "--threads", "1",
        "--checkpoint-every", str(checkpoint_every),
    ]  # fmt: skip


def test_a_killed_process_resumes_and_finishes_with_the_same_numbers(mnist_like_root, tmp_path):
    # An epoch takes a few hundredths of a second; forty of them leave the poll below ample time
    # to catch the run between its third and its last epoch.
    variant = {**SMALL, "hidden": [64]}
    epochs = 40
    out = tmp_path / "killed"
    cmd = cli_train(mnist_like_root, out, epochs, variant, checkpoint_every=1)
    err = tmp_path / "killed.stderr"
    with open(err, "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        # Three rows in metrics.csv: the checkpoint of epoch 2 was written before epoch 3 began.
        while not ((out / "metrics.csv").exists() and len(read_metrics(out)) >= 3):
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
    done_before_kill = len(read_metrics(out))
    assert 3 <= done_before_kill < epochs  # really stopped mid-run
    assert not (out / "summary.json").exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    match = [line for line in resumed.stderr.splitlines() if "resuming from checkpoint" in line]
    assert match, resumed.stderr
    start = int(match[0].rsplit(" ", 1)[1])
    assert 2 <= start <= done_before_kill

    # The same run, uninterrupted, in this process (one thread, as the subprocesses).
    reference = tmp_path / "reference"
    train_run(variant, 4, epochs, reference, data_root=mnist_like_root, device="cpu", log=quiet)
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(reference))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == start
    assert summary["epochs_completed"] == epochs


# --- divergence and arguments --------------------------------------------------------------------


def test_a_diverging_run_stops_and_says_so(mnist_like_root, tmp_path):
    log: list[str] = []
    variant = {"hidden": [32], "lr0": 1e6, "max_norm": None}
    summary = run(variant, tmp_path, mnist_like_root, epochs=5, log=log.append)
    assert summary["diverged"] is True
    assert summary["diverged_epoch"] is not None and 1 <= summary["diverged_epoch"] < 5
    assert summary["epochs_completed"] == summary["diverged_epoch"]
    rows = read_metrics(tmp_path)
    assert len(rows) == summary["diverged_epoch"]
    last = rows[-1]
    assert not (
        math.isfinite(float(last["train_loss"])) and math.isfinite(float(last["test_loss"]))
    )
    assert any("diverged" in m for m in log)
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs = 0"),
        ({"epochs": 2.5}, "epochs = 2.5"),
        ({"checkpoint_every": 0}, "checkpoint_every = 0"),
        ({"on_stale_checkpoint": "ignore"}, "on_stale_checkpoint = 'ignore'"),
        ({"device": "tpu"}, "device = 'tpu'"),
        ({"data_root": None}, "data_root or data"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match, mnist_like_root, tmp_path):
    args = {"variant": SMALL, "seed": 1, "epochs": 1, "out_dir": tmp_path,
            "data_root": mnist_like_root, "device": "cpu", "log": quiet, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        train_run(**args)


def test_a_bad_variant_is_refused_before_anything_runs(mnist_like_root, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="'hidden_dropout' = 1.0"):
        run({"hidden_dropout": 1.0}, out, mnist_like_root)
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_on_the_gpu(mnist_like_root, tmp_path):
    summary = train_run(SMALL, 1, 2, tmp_path, data_root=mnist_like_root, device="cuda", log=quiet)
    assert summary["device"].startswith("cuda")
    assert summary["final_test_errors"] < N_TEST
