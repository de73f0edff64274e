"""Seconds per epoch of the training step, beside the floor its matrix products set.

The step is the default dropout variant's (20 % input and 50 % hidden dropout, SGDHinton with
max-norm, batch 100) on resident tensors. The GEMM floor is the same step's matrix products alone
(three forward, five backward: no input gradient for the first layer), on preallocated tensors:
what no implementation of this step on this machine can beat.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from ._cpu import flush_denormals, keep_freed_memory
from .data import Split
from .model import MLP, MaskStream
from .optim import build_optimizer
from .train import pick_device, train_batch
from .variant import resolve

STEPS_PER_EPOCH = 600  # 60,000 images / 100
BENCH_VARIANT = {"input_dropout": 0.2, "hidden_dropout": 0.5, "optimizer": "sgd_hinton"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, steps: int, device) -> float:
    """Seconds per call of ``fn``, timed over ``steps`` calls after a short warm-up."""
    for _ in range(max(steps // 10, 3)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _random_data(device, gen, n: int = 6000) -> Split:
    """``n`` random images and labels, resident on ``device`` (a step's cost does not depend
    on the numbers)."""
    return Split(
        torch.randn(n, 784, generator=gen).to(device),
        torch.randint(0, 10, (n,), generator=gen).to(device),
    )


def _sums(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The running loss and error sums ``train_batch`` adds to."""
    return (
        torch.zeros(shape, device=device, dtype=torch.float64),
        torch.zeros(shape, device=device, dtype=torch.int64),
    )


def training_step(device, variant=None):
    """A closure running one step of the training loop (``train.train_batch``) of ``variant``
    on resident random data."""
    variant = resolve(variant or BENCH_VARIANT)
    gen = torch.Generator().manual_seed(0)
    model = MLP.from_variant(variant, generator=gen).to(device)
    model.masks = MaskStream(1)
    others = [model.layers[-1].weight] + [layer.bias for layer in model.layers]
    opt = build_optimizer(variant, model.hidden_weights, others, model.layers[-1].weight)
    fold = getattr(opt, "fold_gradient", None)
    data = _random_data(device, gen)
    perm = torch.randperm(len(data), generator=gen).to(device)
    batches = list(torch.split(perm, variant["batch_size"]))
    loss_sum, err_sum = _sums((), device)
    i = 0

    def step():
        nonlocal i
        idx = batches[i % len(batches)]
        i += 1
        train_batch(model, opt, fold, data, idx, variant["loss_reduction"], loss_sum, err_sum)

    return step


def gemm_floor_step(device, hidden=(800, 800), batch: int = 100):
    """A closure running only the matrix products of one step, into preallocated tensors."""
    sizes = [784, *hidden, 10]
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    ws = [r(b, a) for a, b in zip(sizes[:-1], sizes[1:])]
    acts = [r(batch, s) for s in sizes]
    grads = [r(batch, s) for s in sizes]
    wgrads = [torch.empty_like(w) for w in ws]

    def step():
        for k, w in enumerate(ws):  # forward: a_{k+1} = a_k W_k^T
            torch.mm(acts[k], w.t(), out=acts[k + 1])
        for k in reversed(range(len(ws))):  # backward: dW_k = g_{k+1}^T a_k; g_k = g_{k+1} W_k
            torch.mm(grads[k + 1].t(), acts[k], out=wgrads[k])
            if k > 0:
                torch.mm(grads[k + 1], ws[k], out=grads[k])

    return step


def _stack(device, runs: int, variant: dict):
    """``runs`` copies of ``variant`` (seeds 0..runs-1) as one stack of the grouped trainer,
    set up for an epoch, on resident random data; returns it, the data and the runs' orders."""
    import tempfile

    from .batched import Group
    from .train import RunState

    gen = torch.Generator().manual_seed(0)
    data = _random_data(device, gen)
    tmp = tempfile.mkdtemp(prefix="dropout-bench-")
    states = [RunState(variant, k, f"{tmp}/{k}", device, data, data, None) for k in range(runs)]
    group = Group(states, device)
    group.opt.set_epoch([variant["lr0"]] * runs, [variant["momentum_initial"]] * runs, device)
    perms = torch.stack([torch.randperm(len(data), generator=gen) for _ in range(runs)])
    return group, data, perms.to(device)


def group_step(device, runs: int, variant=None):
    """A closure running one step of ``runs`` copies of ``variant`` (seeds 0..runs-1) trained as
    one stack by the grouped trainer, on resident random data."""
    variant = resolve(variant or BENCH_VARIANT)
    group, data, perms = _stack(device, runs, variant)
    batches = list(torch.split(perms, variant["batch_size"], dim=1))
    loss_sum, err_sum = _sums(runs, device)
    i = 0

    def step():
        nonlocal i
        idx = batches[i % len(batches)]
        i += 1
        group.train_batch(data, idx, variant["loss_reduction"], loss_sum, err_sum)

    return step


def group_epoch_graph(device, runs: int, variant=None):
    """A closure replaying one captured CUDA graph of a stack's epoch (``StaticEpoch``) of
    ``runs`` copies of ``variant`` on resident random data; returns it and its step count."""
    from .batched import StaticEpoch

    variant = resolve(variant or BENCH_VARIANT)
    group, data, perms = _stack(device, runs, variant)
    bs, reduction = variant["batch_size"], variant["loss_reduction"]
    sums = _sums(runs, device)
    # A few plain steps build the buffers the capture reads, and cuBLAS's workspace.
    for idx in torch.split(perms, bs, dim=1)[:3]:
        group.train_batch(data, idx, reduction, *sums)
    capture = torch.device(device).type == "cuda"  # elsewhere: the same epoch, uncaptured
    epoch = StaticEpoch(group, data, bs, reduction, capture=capture)
    return (lambda: epoch(perms)), len(epoch.batches)


def bench(
    steps: int = 600,
    threads: int | None = None,
    device: str = "auto",
    rounds: int = 20,
    runs: list[int] | None = None,
) -> dict:
    """Time the training step and its GEMM floor in interleaved rounds and print seconds per
    epoch and their ratio; with ``runs``, also run-epochs per second of stacks of K runs.

    The training step is memory-bound where the floor is not: while other tenants of a shared
    machine load its memory, the step slows far more than the floor. Many short rounds, each
    kind's fastest kept, read the machine in its quiet spells."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        keep_freed_memory()
        flush_denormals()  # as a training run does
    # Interleaved rounds, the best of each kept: a shared machine's noise only ever adds time,
    # and alternating keeps a slow spell from landing on one kind alone. The stacks (training
    # steps only, no test evaluation) take part in the same rounds.
    kinds = {"floor": gemm_floor_step(dev), "step": training_step(dev)}
    per_call = {}  # steps per call, where a call is more than one step
    for k in runs or []:
        kinds[k] = group_step(dev, k)
        if dev.type == "cuda":  # the same stack, its epochs replayed from a CUDA graph
            kinds[f"graph{k}"], per_call[f"graph{k}"] = group_epoch_graph(dev, k)
    per_round = max(steps // rounds, 10)
    best = {name: math.inf for name in kinds}
    for _ in range(rounds):
        for name, fn in kinds.items():
            n = per_call.get(name, 1)
            calls = max(per_round // n, 3)
            best[name] = min(best[name], _time(fn, calls, dev) / n * STEPS_PER_EPOCH)
    floor, step = best["floor"], best["step"]
    result = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "epoch_seconds": step,
        "gemm_floor_seconds": floor,
        "ratio": step / floor,
    }
    print(
        f"device {result['device']}  threads {result['threads']}  torch {result['torch']}\n"
        f"training step  {step:8.3f} s/epoch  (default dropout variant; best of {rounds} rounds)\n"
        f"GEMM floor     {floor:8.3f} s/epoch  (its 8 matrix products alone)\n"
        f"ratio          {step / floor:8.2f} x",
        file=sys.stdout,
        flush=True,
    )
    if runs:
        single_rate = 1.0 / step
        print(f"single-run trainer  {single_rate:8.3f} run-epochs/s", flush=True)
        result["run_epochs_per_second"] = {"single": single_rate}
        for k in runs:
            rate = k / best[k]
            result["run_epochs_per_second"][k] = rate
            print(
                f"stack of K={k:<3d}     {rate:8.3f} run-epochs/s  "
                f"({best[k]:.3f} s per stacked epoch, {rate / single_rate:.2f}x single)",
                flush=True,
            )
            if f"graph{k}" in best:
                graphed = k / best[f"graph{k}"]
                result["run_epochs_per_second"][f"graph{k}"] = graphed
                print(
                    f"  as a CUDA graph  {graphed:8.3f} run-epochs/s  "
                    f"({best[f'graph{k}']:.3f} s per stacked epoch, {graphed / rate:.2f}x eager)",
                    flush=True,
                )
    return result
