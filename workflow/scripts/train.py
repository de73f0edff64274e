# Each attempt's progress; every attempt also goes to train.log beside the run's results.
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from pathlib import Path

from dropout_repro.train import train_run

p = snakemake.params
train_run(
    p.variant,
    seed=int(snakemake.wildcards.seed),
    epochs=p.epochs,
    out_dir=Path(snakemake.output.metrics).parent,
    data_root=p.data_root,
    device=p.device,
    checkpoint_every=p.checkpoint_every,
    train_limit=p.train_limit,
    threads=snakemake.threads,
    tf32=p.tf32,
    variant_name=snakemake.wildcards.variant,
    # The workflow reruns a job whose hyperparameters changed: its old checkpoint is set aside.
    on_stale_checkpoint="restart",
)
