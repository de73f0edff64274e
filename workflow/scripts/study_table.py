import sys

sys.stderr = open(snakemake.log[0], "w")

from dropout_repro.study import study_table, write_study_table

table = study_table(snakemake.params.study, snakemake.params.runs_root)
write_study_table(table, snakemake.output.csv, snakemake.output.md, snakemake.params.study)
