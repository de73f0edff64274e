import sys

sys.stderr = open(snakemake.log[0], "w")

import logging

from dropout_repro.report.aggregate import aggregate

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

aggregate(
    snakemake.params.run_dirs,
    snakemake.params.config,
    final_csv=snakemake.output.final_csv,
    final_md=snakemake.output.final_md,
    curves_csv=snakemake.output.curves,
)
