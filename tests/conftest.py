"""Shared fixtures: small generated stand-ins for real data, never the real files."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch():
    """Tests run torch on one thread: their tensors are small, and on a busy machine with few
    cores a second thread mostly waits for the first. Torch is not imported for this alone."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3: big-endian magic, count, rows, cols, then the pixels as unsigned bytes."""
    n, rows, cols = images.shape
    path.write_bytes(
        struct.pack(">iiii", IDX_IMAGES_MAGIC, n, rows, cols) + images.astype(np.uint8).tobytes()
    )


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """IDX1: big-endian magic, count, then the labels as unsigned bytes."""
    path.write_bytes(
        struct.pack(">ii", IDX_LABELS_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes()
    )


def blob_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images whose class is where a bright 6x6 blob sits (a 5x2 grid of places,
    jittered by a pixel), over uniform noise: learnable, but not from a single pixel."""
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 90, size=(n, 28, 28))
    for i, c in enumerate(labels):
        r0 = 2 + 12 * (c // 5) + rng.integers(0, 3)
        c0 = 1 + 5 * (c % 5) + rng.integers(0, 2)
        images[i, r0 : r0 + 6, c0 : c0 + 6] += 150
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


N_TRAIN, N_TEST = 600, 200


@pytest.fixture(scope="session")
def mnist_like_root(tmp_path_factory) -> Path:
    """A data root in torchvision's MNIST layout (``<root>/MNIST/raw/*-ubyte``) holding
    ``N_TRAIN`` training and ``N_TEST`` test images of generated class-dependent blobs."""
    root = tmp_path_factory.mktemp("mnist_like")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(20120703)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images, labels = blob_digits(n, rng)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


# CI sets DROPOUT_REPRO_REQUIRE (e.g. "slurm,browser"): there a test of that mark that skips
# because its service is missing is a failure, not a skip.
REQUIRED = {m for m in os.environ.get("DROPOUT_REPRO_REQUIRE", "").split(",") if m}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and REQUIRED & {m.name for m in item.iter_markers()}:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, but DROPOUT_REPRO_REQUIRE={os.environ['DROPOUT_REPRO_REQUIRE']} says its "
            f"service must be there: {report.longrepr}"
        )
