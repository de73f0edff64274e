import sys

sys.stderr = open(snakemake.log[0], "w")

import logging
import os

from dropout_repro.report.render import git_state, write_report

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

commit, dirty = git_state(snakemake.params.repo)
write_report(
    snakemake.output.html,
    snakemake.params.run_dirs,
    snakemake.params.config,
    final_csv=snakemake.input.final_csv,
    figures={
        "figure1": snakemake.input.figure1,
        "loss": snakemake.input.loss,
        "schedules": snakemake.input.schedules,
        "max_norm": snakemake.input.max_norm,
    },
    benchmarks=list(snakemake.input.benchmarks),
    # Set by rules/report.smk from the command line that started the workflow.
    command=os.environ.get("DROPOUT_REPRO_COMMAND", "unknown"),
    git_commit=commit,
    git_dirty=dirty,
    made_by=snakemake.params.made_by,
    study_csv=snakemake.input.get("study"),
    study_caption=snakemake.params.study_caption,
)
