# From finished runs to the report: tables, figures, and one self-contained HTML page.
# Input helpers (get_run_dirs, get_metrics, get_summaries, get_benchmarks) live in common.smk.

import os
import shlex
import sys

# The command line that started this workflow, shown in the report's provenance. It travels in the
# environment rather than in params, so that running again with other flags (-n, --cores) does not
# make the report out of date; setdefault keeps the outer command inside cluster jobs.
os.environ.setdefault(
    "DROPOUT_REPRO_COMMAND", shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
)


rule aggregate:
    input:
        metrics=get_metrics(),
        summaries=get_summaries(),
    output:
        final_csv=report(
            "results/tables/final_errors.csv",
            caption="../report/final_errors.rst",
            category="Tables",
            labels={"table": "final test errors"},
        ),
        final_md="results/tables/final_errors.md",
        curves=report(
            "results/tables/curves.csv",
            caption="../report/curves.rst",
            category="Tables",
            labels={"table": "test errors per epoch"},
        ),
    log:
        "logs/report/aggregate.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        run_dirs=get_run_dirs(),
        config=config,
    script:
        "../scripts/aggregate.py"


rule figure:
    input:
        curves="results/tables/curves.csv",
        metrics=get_metrics(),
        summaries=get_summaries(),
    output:
        figure1_svg=report(
            "results/figures/figure1.svg",
            caption="../report/figure1.rst",
            category="Figures",
            labels={"figure": "1 test errors against epochs"},
        ),
        figure1_png="results/figures/figure1.png",
        loss=report(
            "results/figures/loss.png",
            caption="../report/loss.rst",
            category="Figures",
            labels={"figure": "2 training and test loss"},
        ),
        schedules=report(
            "results/figures/schedules.png",
            caption="../report/schedules.rst",
            category="Figures",
            labels={"figure": "3 learning rate and momentum"},
        ),
        max_norm=report(
            "results/figures/max_norm.png",
            caption="../report/max_norm.rst",
            category="Figures",
            labels={"figure": "4 incoming-weight norms"},
        ),
    log:
        "logs/report/figure.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        run_dirs=get_run_dirs(),
        config=config,
    script:
        "../scripts/figures.py"


rule report:
    input:
        unpack(
            lambda wildcards: (
                {"study": config["report"]["study_table"]}
                if (config.get("report") or {}).get("study_table")
                else {}
            )
        ),
        final_csv="results/tables/final_errors.csv",
        figure1="results/figures/figure1.png",
        loss="results/figures/loss.png",
        schedules="results/figures/schedules.png",
        max_norm="results/figures/max_norm.png",
        metrics=get_metrics(),
        summaries=get_summaries(),
        benchmarks=get_benchmarks(),
    output:
        html=report(
            "results/report/report.html",
            caption="../report/report.rst",
            category="Report",
            labels={"page": "paper-style report"},
        ),
    log:
        "logs/report/report.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        run_dirs=get_run_dirs(),
        config=config,
        repo=workflow.basedir,
        study_caption=(config.get("report") or {}).get("study_caption"),
        made_by={
            "figure1": "rule figure, from results/tables/curves.csv and every run's metrics.csv",
            "loss": "rule figure, from every run's metrics.csv",
            "schedules": "rule figure, from every run's metrics.csv (columns lr, momentum)",
            "max_norm": "rule figure, from every run's metrics.csv (column max_row_norm)",
            "final_errors": "rule aggregate, from every run's summary.json and metrics.csv "
            "(results/tables/final_errors.csv)",
            "questions": "rule report, from every run's summary.json",
        },
    script:
        "../scripts/report.py"
