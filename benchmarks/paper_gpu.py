"""The paper's main figure on one GPU: the five main variants x 3 seeds x 3000 epochs.

    python benchmarks/paper_gpu.py                 # from a checkout, with the package installed

Fetches MNIST (MD5-checked) if needed, trains the runs of config/paper.yaml's five main variants
as stacked groups (one process; runs sharing an architecture and optimiser family share a stack),
and prints the wall time and each variant's final test errors against the paper's numbers. It
stops by itself before --time-limit seconds (default 570, inside a 10-minute slot); stopped
early, it prints the rate it reached and what the whole run would take, and running it again
resumes from the checkpoints.

Eager stacks against the same stacks replayed from CUDA graphs, on the same GPU:

    python -m dropout_repro bench --device cuda --runs 3 12 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dropout_repro.batched import RunSpec, group_key, train_group  # noqa: E402
from dropout_repro.data import load_mnist  # noqa: E402
from dropout_repro.mnist import DEFAULT_SOURCES, fetch_mnist  # noqa: E402
from dropout_repro.train import pick_device  # noqa: E402
from dropout_repro.variant import resolve  # noqa: E402

MAIN = ["no_dropout", "dropout", "dropout_input", "adam", "weight_decay"]
PAPER = {"no_dropout": 160, "dropout": 130, "dropout_input": 110}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config/paper.yaml"))
    ap.add_argument("--epochs", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data-root", default=str(ROOT / "resources/mnist"))
    ap.add_argument("--out-root", default=str(ROOT / "results/gpu_bench/runs"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    ap.add_argument("--time-limit", type=float, default=570.0, help="seconds for the training")
    ap.add_argument(
        "--chunk",
        type=int,
        default=500,
        help="epochs between progress reports (each chunk's first epoch runs before its capture)",
    )
    ap.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="replay each stack's epochs from one captured CUDA graph (auto: on CUDA)",
    )
    args = ap.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    defaults = config.get("defaults") or {}
    variants = {n: {**defaults, **(config["variants"][n] or {})} for n in MAIN}
    for name, v in variants.items():
        v.pop("paper_errors", None)
        variants[name] = resolve(v)
    fetch_mnist(args.data_root, DEFAULT_SOURCES, log=lambda m: print(m, file=sys.stderr))

    groups: dict = {}
    for name, v in variants.items():
        groups.setdefault(group_key(v), []).append(name)
    specs = {
        key: [
            RunSpec(variants[n], s, f"{args.out_root}/{n}/seed{s}", n)
            for n in names
            for s in args.seeds
        ]
        for key, names in groups.items()
    }
    print(
        f"device {args.device}, torch {torch.__version__}; groups: "
        + "; ".join(", ".join(names) for names in groups.values()),
        flush=True,
    )
    quiet = lambda msg: None  # noqa: E731
    dev = pick_device(args.device)
    data = {
        key: load_mnist(args.data_root, dev, g[0].variant["input_mean"], g[0].variant["input_std"])
        for key, g in specs.items()
    }
    start = time.time()
    done = 0
    summaries = {}
    # Train every group a chunk of epochs at a time, so the time limit is kept and a stopped
    # benchmark reports how far it got; checkpoints make each chunk resume the last.
    while done < args.epochs:
        target = min(done + args.chunk, args.epochs)
        for key, group in specs.items():
            for spec, summary in zip(
                group,
                train_group(
                    group,
                    target,
                    data=data[key],
                    device=args.device,
                    checkpoint_every=args.chunk,
                    log=quiet,
                    cuda_graphs=args.cuda_graphs,
                ),
            ):
                summaries[(spec.name, spec.seed)] = summary
        done = target
        elapsed = time.time() - start
        rate = done * sum(len(g) for g in specs.values()) / elapsed
        print(
            f"{done:5d}/{args.epochs} epochs  {elapsed:7.1f} s  {rate:8.1f} run-epochs/s",
            flush=True,
        )
        if done < args.epochs and elapsed * target / done > args.time_limit:
            if elapsed * (done + args.chunk) / done > args.time_limit:
                full = elapsed * args.epochs / done
                print(
                    f"stopping before the time limit: the whole run would take about "
                    f"{full / 60:.1f} min at this rate; run again to continue",
                    flush=True,
                )
                break

    elapsed = time.time() - start
    graphed = sorted({s["cuda_graphs"] for s in summaries.values()})
    print(
        f"\nwall time {elapsed:.1f} s for {done} epochs of "
        f"{sum(len(g) for g in specs.values())} runs; epochs replayed from CUDA graphs: "
        + ", ".join(str(g) for g in graphed)
    )
    print(f"{'variant':15s} {'final test errors (mean, per seed)':40s} paper")
    result = {}
    for name in MAIN:
        finals = [summaries[(name, s)]["final_test_errors"] for s in args.seeds]
        mean = statistics.mean(finals)
        result[name] = finals
        print(f"{name:15s} {mean:8.1f}  {finals!s:30s} {PAPER.get(name, '-')}")
    record = {"epochs": done, "wall_seconds": elapsed, "cuda_graphs": graphed}
    print(json.dumps({**record, "final_test_errors": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
