# Each attempt's progress; every attempt also goes to train.log beside the run's results.
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from dropout_repro.batched import RunSpec, train_group

p = snakemake.params
specs = [
    RunSpec(variant, seed, f"results/runs/{name}/seed{seed}", name)
    for name, variant in p.variants.items()
    for seed in p.seeds
]
train_group(
    specs,
    epochs=p.epochs,
    data_root=p.data_root,
    device=p.device,
    checkpoint_every=p.checkpoint_every,
    train_limit=p.train_limit,
    threads=snakemake.threads,
    tf32=p.tf32,
    cuda_graphs=p.cuda_graphs,
    # The workflow reruns a job whose hyperparameters changed: old checkpoints are set aside.
    on_stale_checkpoint="restart",
)
