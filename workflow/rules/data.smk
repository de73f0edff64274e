rule download_mnist:
    output:
        raw=directory(f"{config['data']['root']}/MNIST/raw"),
    log:
        "logs/download_mnist.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=512,
        runtime=20,
    params:
        root=lambda wc, output: Path(output.raw).parent.parent,
        sources=config["data"]["sources"],
    script:
        "../scripts/download_mnist.py"
