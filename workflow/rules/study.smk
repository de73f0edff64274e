# The recipe study (config/study.yaml): short runs of several readings of Appendix A at the paper's
# epsilon_0 = 10, and the table that says which of them train. Not part of `all`:
# `snakemake --cores 2 study`. The study file is read here, beside the main config, whose schema
# it does not touch; the library checks every reading before anything runs. Another study file
# (a test's, a follow-up's) can be named in the environment as DROPOUT_REPRO_STUDY.

import math
import os
import re
from pathlib import Path

import yaml

from dropout_repro.study import load_study, reading_names, reading_variant

STUDY_FILE = Path(
    os.environ.get("DROPOUT_REPRO_STUDY")
    or Path(workflow.current_basedir) / ".." / ".." / "config" / "study.yaml"
)
with open(STUDY_FILE) as f:
    STUDY_RAW = yaml.safe_load(f)
STUDY = load_study(STUDY_RAW)
STUDY_RUNS = "results/study/runs"


STUDY_RUN_DIRS = [
    f"{STUDY_RUNS}/{r}/seed{s}" for r in reading_names(STUDY) for s in STUDY["seeds"]
]
# A study run is a few epochs on part of the data: ten minutes plus one per 1,000 updates.
STUDY_RUN_MINUTES = 10 + math.ceil(
    STUDY["epochs"] * math.ceil((STUDY["train_limit"] or 60000) / 100) / 1000
)


rule study_train:
    input:
        mnist=rules.download_mnist.output.raw,
    output:
        metrics=f"{STUDY_RUNS}/{{reading}}/seed{{seed}}/metrics.csv",
        summary=f"{STUDY_RUNS}/{{reading}}/seed{{seed}}/summary.json",
        diagnostics=f"{STUDY_RUNS}/{{reading}}/seed{{seed}}/diagnostics.json",
    log:
        "logs/study/{reading}/seed{seed}.log",
    benchmark:
        "results/benchmarks/study/{reading}/seed{seed}.tsv"
    wildcard_constraints:
        reading="|".join(re.escape(r) for r in reading_names(STUDY)),
        seed=r"\d+",
    conda:
        "../../environment.yml"
    threads: STUDY["threads"]
    resources:
        mem_mb=STUDY["mem_mb"],
        runtime=lambda wc, attempt: STUDY_RUN_MINUTES * attempt,  # doubled on a retry
        gpu=1 if STUDY["device"] == "cuda" else 0,
    params:
        # The merged variant is a param: edit a reading and exactly its runs are trained again.
        variant=lambda wc: reading_variant(STUDY, wc.reading),
        epochs=STUDY["epochs"],
        train_limit=STUDY["train_limit"],
        device=STUDY["device"],
        data_root=lambda wc, input: Path(input.mnist).parent.parent,
    script:
        "../scripts/study_train.py"


rule study_table:
    input:
        metrics=[f"{d}/metrics.csv" for d in STUDY_RUN_DIRS],
        summaries=[f"{d}/summary.json" for d in STUDY_RUN_DIRS],
        diagnostics=[f"{d}/diagnostics.json" for d in STUDY_RUN_DIRS],
    output:
        csv=report(
            "results/tables/recipe_study.csv",
            category="Tables",
            labels={"table": "what epsilon_0 = 10 needs"},
        ),
        md="results/tables/recipe_study.md",
    log:
        "logs/study/table.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        study=STUDY_RAW,
        # results/study/runs/{reading}/seed{seed}/metrics.csv -> results/study/runs
        runs_root=lambda wc, input: str(Path(input.metrics[0]).parents[2]),
    script:
        "../scripts/study_table.py"


rule study:
    input:
        rules.study_table.output,
