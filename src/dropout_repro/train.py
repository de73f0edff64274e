"""One training run: a variant, a seed, an epoch count and an output directory.

Writes ``metrics.csv`` (one row per epoch) and, at the end, ``summary.json``; keeps a checkpoint
beside them so a killed run resumes where it stopped and finishes with the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import __version__, schedules
from ._cpu import flush_denormals, flushing_denormals, keep_freed_memory
from .data import Split, epoch_batches, load_mnist
from .model import MLP, MaskStream
from .optim import build_optimizer, max_row_norm
from .variant import fingerprint, resolve

COLUMNS = [
    "epoch",
    "lr",
    "momentum",
    "train_loss",
    "train_errors",
    "test_loss",
    "test_errors",
    "test_error_pct",
    "max_row_norm",
    "seconds",
]
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: one mask counter value per training step


class CheckpointMismatch(RuntimeError):
    """A checkpoint that belongs to another run."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device = {name!r} is not valid: expected auto, cpu or cuda")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu"


def seed_streams(seed: int) -> tuple[int, int, int]:
    """Three independent seeds (weights, data order, dropout masks) derived from the run's seed."""
    a, b, c = np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1, int(c) >> 1


@dataclass
class Run:
    """Everything that determines a run's trajectory; its fingerprint guards the checkpoint."""

    variant: dict
    seed: int
    train_limit: int | None
    device_type: str
    data_digest: str

    def identity(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "variant": self.variant,
            "seed": self.seed,
            "train_limit": self.train_limit,
            "device_type": self.device_type,
            "data": self.data_digest,
        }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _metrics_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue().encode()


@torch.no_grad()
def data_digest(train: Split, test: Split) -> str:
    """A cheap fingerprint of the data a run sees (sizes, label counts, pixel sums), so that a
    checkpoint made on other data is refused."""
    parts = []
    for split in (train, test):
        counts = torch.bincount(split.labels, minlength=10).tolist()
        parts.append(f"{len(split)}:{counts}:{split.images.double().sum().item():.6e}")
    return "|".join(parts)


@torch.no_grad()
def evaluate(model: MLP, split: Split, chunk: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, error count) over a split, as 0-d tensors on the device."""
    model.eval()
    loss = torch.zeros((), device=split.images.device, dtype=torch.float64)
    errors = torch.zeros((), device=split.images.device, dtype=torch.int64)
    for start in range(0, len(split), chunk):
        x, y = split.images[start : start + chunk], split.labels[start : start + chunk]
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        errors += (logits.argmax(1) != y).sum()
    model.train()
    return loss / len(split), errors


class RunState:
    """One run's identity, network, optimiser, random streams and recorded epochs, and the files
    it owns in its output directory (metrics.csv, summary.json, checkpoint.pt).

    Both trainers use it: ``train_run`` trains its network directly; the grouped trainer
    (``dropout_repro.batched``) trains a stack of networks and copies each run's slice in and out
    of its ``RunState`` to read and write checkpoints, so the files are the same either way.
    """

    def __init__(
        self,
        variant: dict,
        seed: int,
        out_dir,
        dev: torch.device,
        train: Split,
        test: Split,
        train_limit: int | None,
        variant_name: str = "",
    ):
        self.variant = variant
        self.seed = seed
        self.variant_name = variant_name
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dev = dev
        self.train_size, self.test_size = len(train), len(test)
        self.identity = Run(
            variant, seed, train_limit, dev.type, data_digest(train, test)
        ).identity()
        self.fingerprint = fingerprint(self.identity)
        init_seed, data_seed, mask_seed = seed_streams(seed)
        self.data_gen = torch.Generator().manual_seed(data_seed)
        self.masks = MaskStream(mask_seed)
        self.model = MLP.from_variant(
            variant, generator=torch.Generator().manual_seed(init_seed)
        ).to(dev)
        self.model.masks = self.masks
        others = [self.model.layers[-1].weight] + [layer.bias for layer in self.model.layers]
        self.opt = build_optimizer(
            variant, self.model.hidden_weights, others, self.model.layers[-1].weight
        )
        self.rows: list[dict] = []
        self.start_epoch = 0
        self.resumed_from: int | None = None
        self.diverged_epoch: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def logger(self, log, prefix: str = ""):
        """``log`` that also appends to ``train.log`` beside the results: a workflow deletes a
        job's own log before a retry, and this file keeps every attempt (where it resumed)."""

        def both(msg: str) -> None:
            log(prefix + msg)
            with open(self.out / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

        return both

    def resume(self, epochs: int, on_stale_checkpoint: str, log) -> None:
        """Load this run's checkpoint if there is one and it is this run's; refuse it otherwise."""
        path = self.checkpoint_path
        if not path.exists():
            return
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        why = None
        if ckpt.get("fingerprint") != self.fingerprint:
            why = (
                "it was written for another run ("
                + _describe_mismatch(ckpt.get("identity", {}), self.identity)
                + ")"
            )
        elif ckpt["epoch"] > epochs:
            why = f"it holds {ckpt['epoch']} epochs, more than the {epochs} asked for"
        if why is not None:
            if on_stale_checkpoint == "error":
                raise CheckpointMismatch(
                    f"{path}: {why}; it is not used. Delete it, or choose another output directory."
                )
            os.replace(path, self.out / "checkpoint.stale.pt")
            log(f"checkpoint {path}: {why}: moved aside to checkpoint.stale.pt, starting over")
            return
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.data_gen.set_state(ckpt["data_rng"])
        self.masks.counter = ckpt["mask_counter"]
        self.rows = ckpt["rows"]
        self.start_epoch = self.resumed_from = ckpt["epoch"]
        log(f"resuming from checkpoint at epoch {self.start_epoch}")

    def save_checkpoint(self, epoch: int) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "data_rng": self.data_gen.get_state(),
            "mask_counter": self.masks.counter,
            "rows": self.rows,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write(self.checkpoint_path, buf.getvalue())

    def record(self, row: dict, epochs: int, checkpoint_every: int, log) -> bool:
        """Keep an epoch's row, write metrics.csv (and a checkpoint when due); False once the
        run has diverged."""
        self.rows.append(row)
        epoch = row["epoch"]
        log(
            f"epoch {epoch:5d}/{epochs}  test errors {row['test_errors']:5d}  "
            f"lr {row['lr']:.4g}  momentum {row['momentum']:.4f}  {row['seconds']:.2f} s"
        )
        self.write_metrics()
        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])):
            self.diverged_epoch = epoch
            log(
                f"diverged: the loss is not finite at epoch {epoch} "
                f"(lr {row['lr']:.4g}); stopping this run"
            )
            return False
        if epoch % checkpoint_every == 0 or epoch == epochs:
            self.save_checkpoint(epoch)
        return True

    def write_metrics(self) -> None:
        _atomic_write(self.out / "metrics.csv", _metrics_csv(self.rows))

    def finish(
        self, epochs: int, tf32: bool, wall_seconds: float, cuda_graphs: bool = False
    ) -> dict:
        # Always: a resumed run that had nothing left to train still owes its metrics file.
        self.write_metrics()
        rows = self.rows
        finite = [r for r in rows if math.isfinite(r["train_loss"])]
        best = min(finite or rows, key=lambda r: r["test_errors"]) if rows else None
        summary = {
            "variant_name": self.variant_name,
            "seed": self.seed,
            "epochs_requested": epochs,
            "epochs_completed": len(rows),
            "final_test_errors": rows[-1]["test_errors"] if rows else None,
            "best_test_errors": best["test_errors"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "diverged": self.diverged_epoch is not None,
            "diverged_epoch": self.diverged_epoch,
            "variant": self.variant,
            "fingerprint": self.fingerprint,
            "device": describe_device(self.dev),
            "torch_version": torch.__version__,
            "tf32": bool(tf32),
            "cuda_graphs": bool(cuda_graphs),  # epochs replayed from a captured graph (grouped)
            "denormals_flushed": self.dev.type == "cpu" and flushing_denormals(),
            "threads": torch.get_num_threads(),
            "train_size": self.train_size,
            "test_size": self.test_size,
            "resumed_from_epoch": self.resumed_from,
            "wall_seconds": wall_seconds,
            "package_version": __version__,
        }
        _atomic_write(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def check_run_arguments(epochs, checkpoint_every, on_stale_checkpoint) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs = {epochs!r} is not valid: expected an integer >= 1")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(
            f"checkpoint_every = {checkpoint_every!r} is not valid: expected an integer >= 1"
        )
    if on_stale_checkpoint not in ("error", "restart"):
        raise ValueError(
            f"on_stale_checkpoint = {on_stale_checkpoint!r}: expected error or restart"
        )


def prepare_device(device: str, threads: int | None, tf32: bool) -> tuple[torch.device, bool]:
    """The training device, set up; returns it and whether TF32 is in effect."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    if dev.type == "cuda":
        # TF32 matmuls: ~8x the fp32 rate on recent GPUs, 10-bit mantissa products; recorded.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        return dev, tf32
    keep_freed_memory()
    flush_denormals()
    return dev, False


def prepare_data(variant, data_root, data, dev, train_limit) -> tuple[Split, Split]:
    if data is None:
        if data_root is None:
            raise ValueError("training needs data_root or data")
        data = load_mnist(
            str(data_root), dev, variant["input_mean"], variant["input_std"], train_limit
        )
    train, test = data
    if train_limit is not None and len(train) > train_limit:
        train = Split(train.images[:train_limit], train.labels[:train_limit])
    return train, test


def train_run(
    variant: dict,
    seed: int,
    epochs: int,
    out_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    data: tuple[Split, Split] | None = None,
    device: str = "auto",
    checkpoint_every: int = 10,
    train_limit: int | None = None,
    threads: int | None = None,
    tf32: bool = True,
    variant_name: str = "",
    on_stale_checkpoint: str = "error",
    log=None,
) -> dict:
    """Train one run and return its summary (also written to ``summary.json``).

    ``on_stale_checkpoint``: what to do with a checkpoint written for another run (other
    hyperparameters, seed, data or device) or holding more epochs than asked for: ``"error"``
    raises ``CheckpointMismatch``; ``"restart"`` says so on the log, moves it aside to
    ``checkpoint.stale.pt`` and starts over. Either way it is never used.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_run_arguments(epochs, checkpoint_every, on_stale_checkpoint)
    variant = resolve(variant)
    dev, tf32 = prepare_device(device, threads, tf32)
    started = time.time()
    train, test = prepare_data(variant, data_root, data, dev, train_limit)
    run = RunState(variant, seed, out_dir, dev, train, test, train_limit, variant_name)
    log = run.logger(log)
    run.resume(epochs, on_stale_checkpoint, log)
    model, opt = run.model, run.opt
    reduction = variant["loss_reduction"]
    fold = getattr(opt, "fold_gradient", None)  # SGDHinton takes its gradients as products
    for epoch in range(run.start_epoch, epochs):
        t0 = time.perf_counter()
        lr, mom = schedules.apply(opt, variant, epoch)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        err_sum = torch.zeros((), device=dev, dtype=torch.int64)
        for idx in epoch_batches(len(train), variant["batch_size"], run.data_gen, dev):
            train_batch(model, opt, fold, train, idx, reduction, loss_sum, err_sum)
        test_loss, test_err = evaluate(model, test)
        norm = max_row_norm(model.hidden_weights)
        # One host sync per epoch: everything above stays on the device until here.
        row = epoch_row(
            epoch,
            lr,
            mom,
            loss_sum.item(),
            int(err_sum.item()),
            len(train),
            test_loss.item(),
            int(test_err.item()),
            len(test),
            norm.item(),
            t0,
        )
        if not run.record(row, epochs, checkpoint_every, log):
            break
    return run.finish(epochs, tf32, time.time() - started)


@torch.no_grad()
def train_batch(model, opt, fold, split, idx, reduction, loss_sum, err_sum) -> None:
    """One training step on the examples ``idx`` of ``split``; adds the batch's summed loss and
    its error count to the running (device) totals."""
    x, y = split.batch(idx)
    loss, logits = model.train_step(x, y, reduction, fold)
    opt.step()
    loss_sum += (loss if reduction == "sum" else loss * len(idx)).double()
    err_sum += (logits.argmax(-1) != y).sum()


def epoch_row(
    epoch, lr, mom, loss_sum, train_errors, n_train, test_loss, test_errors, n_test, norm, t0
) -> dict:
    """One line of metrics.csv (``epoch`` counted from 0 here, from 1 in the file)."""
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "momentum": mom,
        "train_loss": loss_sum / n_train,
        "train_errors": train_errors,
        "test_loss": test_loss,
        "test_errors": test_errors,
        "test_error_pct": 100.0 * test_errors / n_test,
        "max_row_norm": norm,
        "seconds": time.perf_counter() - t0,
    }


def _describe_mismatch(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "variant" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here")
        elif a != b:
            diffs.append(f"{key}: {a!r} there, {b!r} here")
    return "; ".join(diffs) or "unreadable identity"
