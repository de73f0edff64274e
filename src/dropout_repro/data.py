"""MNIST as two resident tensors, and seeded mini-batches sliced from them.

The whole data set (60,000 x 784 floats, 188 MB) is read once, normalised once and kept on the
training device; an epoch is a seeded permutation cut into batches. No per-sample loader runs in
the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    images: torch.Tensor  # (N, 784) float32, normalised
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``idx`` (any shape: (B,) for one run, (K, B) for a stack).
        ``index_select`` gathers the rows about 5x faster than ``images[idx]`` on the CPU."""
        flat = idx.reshape(-1)
        images = self.images.index_select(0, flat).view(*idx.shape, self.images.shape[-1])
        return images, self.labels.index_select(0, flat).view(idx.shape)


def load_mnist(
    root: str,
    device: torch.device | str = "cpu",
    mean: float = 0.1307,
    std: float = 0.3081,
    train_limit: int | None = None,
) -> tuple[Split, Split]:
    """Read ``<root>/MNIST/raw/*-ubyte`` with torchvision; return (train, test) on ``device``.

    Pixels are scaled to [0, 1], then standardised as (x - mean) / std (mean 0, std 1 leaves them
    in [0, 1]). ``train_limit`` keeps the first N training images, for tests and smoke runs.
    """
    from torchvision.datasets import MNIST

    splits = []
    for train in (True, False):
        ds = MNIST(root=root, train=train, download=False)
        images = ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0)
        images.sub_(mean).div_(std)
        labels = ds.targets.to(torch.int64)
        if train and train_limit is not None:
            if train_limit < 1:
                raise ValueError(f"train_limit = {train_limit!r} is not valid: expected >= 1")
            images, labels = images[:train_limit], labels[:train_limit]
        splits.append(Split(images.to(device), labels.to(device)))
    return splits[0], splits[1]


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """This epoch's mini-batches: index tensors from one seeded permutation of 0..n-1.

    The permutation is drawn on the CPU with the run's own generator, so the data order is the
    same on every device; a last batch smaller than ``batch_size`` is kept.
    """
    perm = torch.randperm(n, generator=generator).to(device, non_blocking=True)
    return list(torch.split(perm, batch_size))
