"""Write run directories with made-up numbers, in exactly the format training writes.

The tests use them to pin the aggregation against hand-computed values; ``demo_runs`` gives a whole
set of plausible-looking runs for restyling the report without training anything. Nothing written
here is a measurement.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dropout_repro import __version__
from dropout_repro.variant import resolve


def _schedule(v: Mapping[str, Any], epochs: int) -> tuple[list[float], list[float]]:
    lrs, moms = [], []
    for t in range(1, epochs + 1):
        lrs.append(v["lr0"] * v["lr_decay"] ** t)
        T = v["momentum_ramp_epochs"]
        p = (
            v["momentum_final"]
            if t >= T
            else (t / T) * v["momentum_final"] + (1 - t / T) * v["momentum_initial"]
        )
        moms.append(p)
    return lrs, moms


def write_run(
    run_dir: str | Path,
    variant_name: str,
    seed: int,
    test_errors: Sequence[float],
    *,
    overrides: Mapping[str, Any] | None = None,
    epochs_requested: int | None = None,
    diverged_epoch: int | None = None,
    train_size: int = 60_000,
    test_size: int = 10_000,
    wall_seconds: float | None = None,
    device: str = "cpu",
) -> Path:
    """Write ``metrics.csv`` and ``summary.json`` for one run whose test errors per epoch are given.

    With ``diverged_epoch`` the losses of that epoch (the last row written) are NaN and the summary
    marks the run diverged.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    v = resolve(overrides)
    errors = [float(e) for e in test_errors]
    epochs = len(errors)
    requested = epochs_requested or epochs
    lrs, moms = _schedule(v, epochs)
    epoch = np.arange(1, epochs + 1)
    test_loss = np.array(errors) / test_size * 4.0 + 0.02
    train_loss = test_loss * 0.6
    train_errors = np.round(np.array(errors) * 0.5 * train_size / test_size)
    seconds = np.full(epochs, 1.0 if wall_seconds is None else wall_seconds / epochs)
    bound = v["max_norm"] if v["max_norm"] is not None else 10.0
    # Nets that end with more errors are drawn with faster-growing weights, so the demo's lines differ.
    row_norm = np.minimum(bound, (0.3 + 0.5 * np.log1p(epoch)) * (errors[-1] / 130.0))
    if diverged_epoch is not None:
        train_loss[-1] = math.nan
        test_loss[-1] = math.nan
    metrics = pd.DataFrame(
        {
            "epoch": epoch,
            "lr": lrs,
            "momentum": moms,
            "train_loss": train_loss,
            "train_errors": train_errors.astype(int),
            "test_loss": test_loss,
            "test_errors": np.array(errors).astype(int),
            "test_error_pct": np.array(errors) / test_size * 100,
            "max_row_norm": row_norm,
            "seconds": seconds,
        }
    )
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    finite = errors if diverged_epoch is None else errors[:-1] or errors
    best = int(np.argmin(finite))
    summary = {
        "variant_name": variant_name,
        "seed": seed,
        "epochs_requested": requested,
        "epochs_completed": epochs,
        "final_test_errors": int(errors[-1]),
        "best_test_errors": int(finite[best]),
        "best_epoch": best + 1,
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "variant": v,
        "device": device,
        "torch_version": "0.0.0+synthetic",
        "tf32": False,
        "cuda_graphs": False,
        "denormals_flushed": True,
        "threads": 1,
        "train_size": train_size,
        "test_size": test_size,
        "wall_seconds": float(seconds.sum()),
        "package_version": __version__,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def write_benchmark(path: str | Path, seconds: float, max_rss_mb: float = 500.0) -> Path:
    """A benchmark TSV in the layout Snakemake's ``benchmark:`` directive writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    path.write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        f"{seconds:.4f}\t{h}:{m:02d}:{s:02d}\t{max_rss_mb:.2f}\t{max_rss_mb * 2:.2f}\t"
        f"{max_rss_mb * 0.9:.2f}\t{max_rss_mb * 0.95:.2f}\t0.00\t0.10\t95.00\t{seconds * 0.95:.2f}\n"
    )
    return path


# Name -> (overrides, level the made-up curve settles at).
DEMO_VARIANTS: dict[str, tuple[dict[str, Any], float]] = {
    "standard": ({"max_norm": None}, 165.0),
    "dropout": ({"hidden_dropout": 0.5}, 132.0),
    "dropout_input": ({"hidden_dropout": 0.5, "input_dropout": 0.2}, 112.0),
    "torch_sgd_dampening": ({"hidden_dropout": 0.5, "optimizer": "torch_sgd"}, 134.0),
    "no_max_norm": ({"hidden_dropout": 0.5, "max_norm": None}, 150.0),
    "adam": ({"hidden_dropout": 0.5, "optimizer": "adam", "lr0": 0.001}, 145.0),
}


def demo_runs(
    root: str | Path,
    epochs: int = 60,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Mapping[str, tuple[dict[str, Any], float]] | None = None,
) -> tuple[list[Path], list[Path], dict[str, Any]]:
    """Made-up runs in the workflow's layout under ``root`` (normally ``results``), and their config.

    Runs go to ``root/runs/{variant}/seed{seed}``, benchmarks to
    ``root/benchmarks/train/{variant}/seed{seed}.tsv``.

    Returns (run directories, benchmark files, config dict as the workflow would pass it).
    """
    root = Path(root)
    variants = DEMO_VARIANTS if variants is None else variants
    run_dirs, benches = [], []
    t = np.arange(1, epochs + 1)
    for i, (name, (overrides, level)) in enumerate(variants.items()):
        for seed in seeds:
            rng = np.random.default_rng(1000 * i + seed)
            curve = level + (900 - level) * np.exp(-t / max(epochs / 12, 1.0))
            noisy = np.maximum(0, np.round(curve + rng.normal(0, 4, epochs) + rng.normal(0, 3)))
            d = root / "runs" / name / f"seed{seed}"
            write_run(d, name, seed, noisy, overrides=overrides, wall_seconds=2.0 * epochs)
            run_dirs.append(d)
            benches.append(
                write_benchmark(
                    root / "benchmarks" / "train" / name / f"seed{seed}.tsv", 2.0 * epochs + 3
                )
            )
    config = {
        "epochs": epochs,
        "seeds": list(seeds),
        "device": "cpu",
        "defaults": {},
        "variants": {name: ov for name, (ov, _) in variants.items()},
        "data": {"train_limit": None},
    }
    return run_dirs, benches, config
