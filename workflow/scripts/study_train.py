# Appended, not truncated: a rerun's log keeps the attempt before it.
import sys

sys.stderr = open(snakemake.log[0], "a", buffering=1)

from pathlib import Path

from dropout_repro.study import train_reading

p = snakemake.params
train_reading(
    p.variant,
    seed=int(snakemake.wildcards.seed),
    epochs=p.epochs,
    out_dir=Path(snakemake.output.metrics).parent,
    data_root=p.data_root,
    train_limit=p.train_limit,
    device=p.device,
    threads=snakemake.threads,
    reading=snakemake.wildcards.reading,
)
