rule train:
    input:
        mnist=rules.download_mnist.output.raw,
    output:
        metrics="results/runs/{variant}/seed{seed}/metrics.csv",
        summary="results/runs/{variant}/seed{seed}/summary.json",
    log:
        "logs/train/{variant}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{variant}/seed{seed}.tsv"
    conda:
        "../../environment.yml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=train_mem_mb,
        runtime=train_runtime_minutes,
        gpu=train_gpus(),
    params:
        # The resolved hyperparameters are a param: change one and exactly this variant reruns.
        variant=lambda wc: get_variant(wc.variant),
        epochs=config["epochs"],
        device=config["device"],
        tf32=config["tf32"],
        checkpoint_every=config["checkpoint_every"],
        train_limit=config["data"]["train_limit"],
        data_root=lambda wc, input: Path(input.mnist).parent.parent,
    script:
        "../scripts/train.py"


# With group_runs on, the runs of variants that share an architecture and optimiser family train
# as one stacked model per job (same result paths; each run bit-identical to training alone on
# the CPU). One rule per group, since a rule's outputs are this group's runs.
for group in GROUPS:

    rule:
        name:
            f"train_{group}"
        input:
            mnist=rules.download_mnist.output.raw,
        output:
            metrics=group_outputs(group, "metrics.csv"),
            summaries=group_outputs(group, "summary.json"),
        log:
            f"logs/train_group/{group}.log",
        benchmark:
            f"results/benchmarks/train_group/{group}.tsv"
        conda:
            "../../environment.yml"
        threads: config["train"]["threads"]
        resources:
            mem_mb=train_mem_mb,
            runtime=lambda wc, attempt, n=len(GROUPS[group]) * len(SEEDS): (
                train_runtime_minutes(wc, attempt, runs=n)
            ),
            gpu=train_gpus(),
        params:
            variants={v: get_variant(v) for v in GROUPS[group]},
            seeds=SEEDS,
            epochs=config["epochs"],
            device=config["device"],
            tf32=config["tf32"],
            cuda_graphs=config["cuda_graphs"],
            checkpoint_every=config["checkpoint_every"],
            train_limit=config["data"]["train_limit"],
            data_root=lambda wc, input: Path(input.mnist).parent.parent,
        script:
            "../scripts/train_group.py"
