import sys

sys.stderr = open(snakemake.log[0], "w")

import logging

from dropout_repro.report.aggregate import load_runs, read_curves
from dropout_repro.report.figures import all_figures

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

out = snakemake.output
all_figures(
    load_runs(snakemake.params.run_dirs),
    {
        "figure1": [out.figure1_svg, out.figure1_png],
        "loss": [out.loss],
        "schedules": [out.schedules],
        "max_norm": [out.max_norm],
    },
    snakemake.params.config,
    curves=read_curves(snakemake.input.curves),
)
