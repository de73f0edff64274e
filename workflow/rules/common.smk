import math
import re
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from dropout_repro.config import ConfigError, check_config

# Before anything runs: every key known, every value in range (each problem named with its
# valid range), then the defaults filled in.
with open(Path(workflow.current_basedir) / "../schemas/config.schema.yaml") as f:
    try:
        check_config(config, yaml.safe_load(f))
    except ConfigError as e:
        raise WorkflowError(str(e))
validate(config, "../schemas/config.schema.yaml", set_default=True)

VARIANTS = list(config["variants"])
SEEDS = [int(s) for s in config["seeds"]]
# Keys that describe how to report a variant rather than how to train it.
REPORT_ONLY_KEYS = {"paper_errors"}


def get_variant(name):
    """A variant's training hyperparameters: the shared defaults, then its own overrides."""
    merged = {**config["defaults"], **(config["variants"][name] or {})}
    return {k: v for k, v in merged.items() if k not in REPORT_ONLY_KEYS}


def _make_groups():
    """Variants whose runs train as one stacked model (config key group_runs): those sharing an
    architecture and optimiser family, in config order, at most group_max_runs runs a group.
    """
    if not config["group_runs"]:
        return {}
    from dropout_repro.batched import group_key

    by_key = {}
    for name in VARIANTS:
        key = group_key(get_variant(name))
        if key is not None:
            by_key.setdefault(key, []).append(name)
    per_group = max(1, config["group_max_runs"] // len(SEEDS))
    groups = {}
    for names in by_key.values():
        for i in range(0, len(names), per_group):
            groups[f"group{len(groups) + 1}"] = names[i : i + per_group]
    return groups


GROUPS = _make_groups()
GROUPED = {v for members in GROUPS.values() for v in members}
ALONE = [v for v in VARIANTS if v not in GROUPED]


wildcard_constraints:
    # With grouping on, rule train makes only the runs that train alone.
    variant="|".join(re.escape(v) for v in ALONE) or "(?!)",
    seed=r"\d+",


def get_run_dirs():
    return [f"results/runs/{v}/seed{s}" for v in VARIANTS for s in SEEDS]


def get_metrics():
    return [f"{d}/metrics.csv" for d in get_run_dirs()]


def get_summaries():
    return [f"{d}/summary.json" for d in get_run_dirs()]


def get_benchmarks():
    alone = [f"results/benchmarks/train/{v}/seed{s}.tsv" for v in ALONE for s in SEEDS]
    return alone + [f"results/benchmarks/train_group/{g}.tsv" for g in GROUPS]


def group_outputs(group, kind):
    return [f"results/runs/{v}/seed{s}/{kind}" for v in GROUPS[group] for s in SEEDS]


def train_runtime_minutes(wildcards, attempt, runs=1):
    """Minutes to ask a cluster for: the estimate for every epoch (of every run a job trains),
    doubled on each retry."""
    seconds = config["epochs"] * config["train"]["seconds_per_epoch"] * runs
    return int(math.ceil(seconds / 60.0 * 1.5)) * attempt + 10


def train_mem_mb(wildcards, attempt):
    """Memory of a training job; a retry (e.g. after running out of memory) asks for more."""
    return config["train"]["mem_mb"] * attempt


def train_gpus():
    return 1 if config["device"] == "cuda" else 0


def get_final_output():
    return ["results/report/report.html"]
