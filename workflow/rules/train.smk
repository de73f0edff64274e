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
        mem_mb=config["train"]["mem_mb"],
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
