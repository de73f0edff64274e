"""Fetch and verify the four MNIST files into ``params.root``/MNIST/raw (rule download_mnist)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from dropout_repro.mnist import DEFAULT_SOURCES, fetch_mnist  # noqa: E402

fetch_mnist(
    snakemake.params.root,  # noqa: F821
    snakemake.params.get("sources") or DEFAULT_SOURCES,  # noqa: F821
    log=lambda message: print(message, file=sys.stderr),
)
