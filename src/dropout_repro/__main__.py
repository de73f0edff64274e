"""Command line: ``python -m dropout_repro train ...`` and ``python -m dropout_repro bench``."""

from __future__ import annotations

import argparse
import json
import sys


def variant_from_config(config: dict, name: str) -> dict:
    """A variant as the workflow config defines it: ``defaults`` overridden by ``variants[name]``."""
    variants = config.get("variants") or {}
    if name not in variants:
        raise SystemExit(
            f"variant {name!r} is not in the config; its variants are: {', '.join(variants)}"
        )
    return {**(config.get("defaults") or {}), **(variants[name] or {})}


def _train(args) -> int:
    from .train import train_run

    if (args.variant_json is None) == (args.config is None):
        raise SystemExit("give the variant either as --variant-json or as --config with --variant")
    if args.config:
        import yaml

        with open(args.config) as f:
            config = yaml.safe_load(f)
        if not args.variant:
            raise SystemExit("--config needs --variant NAME")
        variant, name = variant_from_config(config, args.variant), args.variant
    else:
        variant, name = json.loads(args.variant_json), args.variant or ""
    summary = train_run(
        variant,
        seed=args.seed,
        epochs=args.epochs,
        out_dir=args.out,
        data_root=args.data_root,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        train_limit=args.train_limit,
        threads=args.threads,
        tf32=not args.no_tf32,
        variant_name=name,
        on_stale_checkpoint="restart" if args.restart_stale else "error",
    )
    print(
        json.dumps({k: summary[k] for k in ("final_test_errors", "best_test_errors", "diverged")})
    )
    return 0


def _train_group(args) -> int:
    import yaml

    from .batched import RunSpec, train_group

    with open(args.config) as f:
        config = yaml.safe_load(f)
    specs = [
        RunSpec(variant_from_config(config, name), seed, f"{args.out_root}/{name}/seed{seed}", name)
        for name in args.variants
        for seed in args.seeds
    ]
    summaries = train_group(
        specs,
        epochs=args.epochs,
        data_root=args.data_root,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        train_limit=args.train_limit,
        threads=args.threads,
        tf32=not args.no_tf32,
        on_stale_checkpoint="restart" if args.restart_stale else "error",
        cuda_graphs=args.cuda_graphs,
    )
    for spec, summary in zip(specs, summaries):
        print(
            json.dumps(
                {
                    "variant": spec.name,
                    "seed": spec.seed,
                    "final_test_errors": summary["final_test_errors"],
                    "diverged": summary["diverged"],
                }
            )
        )
    return 0


def _bench(args) -> int:
    from .bench import bench

    bench(
        steps=args.steps,
        threads=args.threads,
        device=args.device,
        rounds=args.rounds,
        runs=args.runs,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dropout_repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run (a variant and a seed)")
    t.add_argument("--variant-json", help="the variant as a JSON object of overrides")
    t.add_argument("--config", help="a workflow config file (YAML) with defaults and variants")
    t.add_argument("--variant", help="the variant's name (in --config), also recorded")
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--data-root", required=True, help="directory holding MNIST/raw/*-ubyte")
    t.add_argument("--out", required=True, help="output directory for metrics.csv, summary.json")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
    t.add_argument("--train-limit", type=int, default=None, help="train on the first N images")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--no-tf32", action="store_true", help="full fp32 matmuls on CUDA")
    t.add_argument(
        "--restart-stale",
        action="store_true",
        help="move aside a checkpoint of another run and start over (default: refuse)",
    )
    t.set_defaults(func=_train)

    g = sub.add_parser("train-group", help="train several variants and seeds as one stacked model")
    g.add_argument("--config", required=True, help="a workflow config file (YAML)")
    g.add_argument("--variants", nargs="+", required=True, help="variant names in --config")
    g.add_argument("--seeds", nargs="+", type=int, required=True)
    g.add_argument("--epochs", type=int, required=True)
    g.add_argument("--data-root", required=True, help="directory holding MNIST/raw/*-ubyte")
    g.add_argument("--out-root", required=True, help="runs go to OUT_ROOT/VARIANT/seedSEED/")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--checkpoint-every", type=int, default=10)
    g.add_argument("--train-limit", type=int, default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--no-tf32", action="store_true")
    g.add_argument("--restart-stale", action="store_true")
    g.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="on CUDA, replay each stack's epochs from one captured graph (auto: on CUDA)",
    )
    g.set_defaults(func=_train_group)

    b = sub.add_parser("bench", help="seconds per epoch of the training step vs the GEMM floor")
    b.add_argument(
        "--steps",
        type=int,
        default=600,
        help="timed steps of each kind, spread over the rounds (an epoch is 600)",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="interleaved rounds; the fastest of each kind is kept (default 20)",
    )
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument(
        "--runs",
        type=int,
        nargs="+",
        default=None,
        help="also time K runs trained as one stack, e.g. --runs 1 5 15: run-epochs per second",
    )
    b.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
