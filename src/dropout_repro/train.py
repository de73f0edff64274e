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
from ._malloc import keep_freed_memory
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
CHECKPOINT_FORMAT = 1


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
    hyperparameters, seed, data or device): ``"error"`` raises ``CheckpointMismatch``;
    ``"restart"`` says so on the log, moves it aside to ``checkpoint.stale.pt`` and starts over.
    Either way it is never used.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs = {epochs!r} is not valid: expected an integer >= 1")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(
            f"checkpoint_every = {checkpoint_every!r} is not valid: expected an integer >= 1"
        )
    if on_stale_checkpoint not in ("error", "restart"):
        raise ValueError(f"on_stale_checkpoint = {on_stale_checkpoint!r}: expected error or restart")
    variant = resolve(variant)
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    if dev.type == "cuda":
        # TF32 matmuls: ~8x the fp32 rate on recent GPUs, 10-bit mantissa products; recorded.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        tf32 = False
        keep_freed_memory()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if data is None:
        if data_root is None:
            raise ValueError("train_run needs data_root or data")
        data = load_mnist(
            str(data_root), dev, variant["input_mean"], variant["input_std"], train_limit
        )
    train, test = data
    if train_limit is not None and len(train) > train_limit:
        train = Split(train.images[:train_limit], train.labels[:train_limit])
    run = Run(variant, seed, train_limit, dev.type, data_digest(train, test))
    ident = run.identity()
    run_fp = fingerprint(ident)

    init_seed, data_seed, mask_seed = seed_streams(seed)
    init_gen = torch.Generator().manual_seed(init_seed)
    data_gen = torch.Generator().manual_seed(data_seed)
    masks = MaskStream(mask_seed)
    model = MLP.from_variant(variant, generator=init_gen).to(dev)
    model.masks = masks
    hidden_w = model.hidden_weights
    others = [model.layers[-1].weight] + [layer.bias for layer in model.layers]
    opt = build_optimizer(variant, hidden_w, others, model.layers[-1].weight)

    rows: list[dict] = []
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    resumed_from = None
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        why = None
        if ckpt.get("fingerprint") != run_fp:
            why = "it was written for another run (" + _describe_mismatch(
                ckpt.get("identity", {}), ident
            ) + ")"
        elif ckpt["epoch"] > epochs:
            why = f"it holds {ckpt['epoch']} epochs, more than the {epochs} asked for"
        if why is not None:
            if on_stale_checkpoint == "error":
                raise CheckpointMismatch(
                    f"{ckpt_path}: {why}; it is not used. "
                    "Delete it, or choose another output directory."
                )
            os.replace(ckpt_path, out / "checkpoint.stale.pt")
            log(f"checkpoint {ckpt_path}: {why}: moved aside to checkpoint.stale.pt, starting over")
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            data_gen.set_state(ckpt["data_rng"])
            masks.counter = ckpt["mask_counter"]
            rows = ckpt["rows"]
            start_epoch = resumed_from = ckpt["epoch"]
            log(f"resuming from checkpoint at epoch {start_epoch}")

    def save_checkpoint(epoch: int) -> None:
        state = {
            "fingerprint": run_fp,
            "identity": ident,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "data_rng": data_gen.get_state(),
            "mask_counter": masks.counter,
            "rows": rows,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write(ckpt_path, buf.getvalue())

    diverged_epoch = None
    reduction = variant["loss_reduction"]
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        lr, mom = schedules.apply(opt, variant, epoch)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        err_sum = torch.zeros((), device=dev, dtype=torch.int64)
        for idx in epoch_batches(len(train), variant["batch_size"], data_gen, dev):
            x, y = train.images[idx], train.labels[idx]
            loss, logits = model.train_step(x, y, reduction)
            opt.step()
            with torch.no_grad():
                batch_sum = loss.detach() if reduction == "sum" else loss.detach() * len(idx)
                loss_sum += batch_sum.double()
                err_sum += (logits.argmax(1) != y).sum()
        test_loss, test_err = evaluate(model, test)
        norm = max_row_norm(hidden_w)
        # One host sync per epoch: everything above stays on the device until here.
        train_loss = loss_sum.item() / len(train)
        test_errors = int(test_err.item())
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "momentum": mom,
            "train_loss": train_loss,
            "train_errors": int(err_sum.item()),
            "test_loss": test_loss.item(),
            "test_errors": test_errors,
            "test_error_pct": 100.0 * test_errors / len(test),
            "max_row_norm": norm.item(),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        log(
            f"epoch {epoch + 1:5d}/{epochs}  test errors {test_errors:5d}  "
            f"lr {lr:.4g}  momentum {mom:.4f}  {row['seconds']:.2f} s"
        )
        if not (math.isfinite(train_loss) and math.isfinite(row["test_loss"])):
            diverged_epoch = epoch + 1
            log(
                f"diverged: the loss is not finite at epoch {diverged_epoch} "
                f"(lr {lr:.4g}); stopping this run"
            )
            _atomic_write(out / "metrics.csv", _metrics_csv(rows))
            break
        _atomic_write(out / "metrics.csv", _metrics_csv(rows))
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs:
            save_checkpoint(epoch + 1)

    # Always: a resumed run that had nothing left to train still owes its metrics file.
    _atomic_write(out / "metrics.csv", _metrics_csv(rows))
    finite = [r for r in rows if math.isfinite(r["train_loss"])]
    best = min(finite or rows, key=lambda r: r["test_errors"]) if rows else None
    summary = {
        "variant_name": variant_name,
        "seed": seed,
        "epochs_requested": epochs,
        "epochs_completed": len(rows),
        "final_test_errors": rows[-1]["test_errors"] if rows else None,
        "best_test_errors": best["test_errors"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "variant": variant,
        "fingerprint": run_fp,
        "device": describe_device(dev),
        "torch_version": torch.__version__,
        "tf32": bool(tf32),
        "threads": torch.get_num_threads(),
        "train_size": len(train),
        "test_size": len(test),
        "resumed_from_epoch": resumed_from,
        "wall_seconds": time.time() - started,
        "package_version": __version__,
    }
    _atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


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
