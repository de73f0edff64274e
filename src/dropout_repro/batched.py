"""Training a group of runs as one stacked model.

Runs that share an architecture and an optimiser family are trained in lockstep: every weight
matrix gets a leading run axis (batched matrix products), and the hyperparameters that may differ
between them (dropout rates, learning rate, momentum, max-norm, weight decay) become per-run
tensors. Each run keeps its own random streams (initial weights, data order, dropout masks) derived
from its seed, and every operation is the same per-run arithmetic as the single-run trainer's, so
a run gives the same numbers whether it trains alone or in a group (on the CPU, bit for bit: a
batched product's slices equal the single products). Each run still owns its files
(metrics.csv, summary.json, checkpoint.pt) in the single-run format: a grouped run resumes
alone, and the other way round.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from . import schedules
from .model import _GOLDEN, N_INPUTS, _affine, _mix_, _signed, fused_step
from .model import draw_threshold, keep_probability, word_spans
from .optim import _scratch
from .train import (
    RunState,
    check_run_arguments,
    epoch_row,
    prepare_data,
    prepare_device,
)
from .variant import resolve

# What every run of a group must share; everything else in a variant may differ run by run.
SHARED_KEYS = (
    "hidden",
    "activation",
    "dropout_style",
    "optimizer",
    "batch_size",
    "loss_reduction",
    "init_std",
    "input_mean",
    "input_std",
    "max_norm_output",
)
# Adam's update folds weight decay into a fused product, and its betas and epsilon into shared
# scalars; runs that differ in these train apart.
ADAM_SHARED_KEYS = ("adam_betas", "adam_eps", "weight_decay")
BATCHED_OPTIMIZERS = ("sgd_hinton", "adam")


def group_key(variant: dict) -> tuple | None:
    """Runs with equal keys can share a process; ``None`` for a variant that trains alone
    (``torch_sgd``, whose optimiser is torch's own)."""
    v = resolve(variant)
    if v["optimizer"] not in BATCHED_OPTIMIZERS:
        return None
    keys = SHARED_KEYS + (ADAM_SHARED_KEYS if v["optimizer"] == "adam" else ())
    return tuple((k, tuple(v[k]) if isinstance(v[k], list) else v[k]) for k in keys)


@dataclass
class RunSpec:
    """One run of a group: its variant (overrides or resolved), seed, output directory, name."""

    variant: dict
    seed: int
    out_dir: str
    name: str = ""


def _runs_tensor(values, dev, shape=(-1,)) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=dev).view(*shape)


class GroupMasks:
    """The dropout masks of a group: for each run, exactly the masks its own ``MaskStream`` would
    give it alone (``step_masks``), computed for all runs at once, site by site.

    The runs' counters live on the device, and each step's hash offsets are computed there from
    them, so drawing masks never waits on the host; ``sync`` writes the counters back to the
    runs' streams (for their checkpoints). A run that drops nothing at a site gets a mask of
    ones there (and its draws are not taken from its stream, as alone); a run that drops
    nothing at all does not advance its counter.
    """

    def __init__(self, runs: list[RunState], variants, style: str, widths, dev):
        self.runs = runs
        self.widths = list(widths)  # per site: the inputs, then each hidden layer
        probs = [
            [v["input_dropout"]] + [v["hidden_dropout"]] * (len(widths) - 1) for v in variants
        ]
        self.active = [[p > 0 for p in row] for row in probs]  # [run][site]
        n_sites = len(widths)
        # Per site and run: a draw keeps its unit when <= limit (32767 keeps everything).
        limits = [
            [draw_threshold(keep_probability(p)) - 1 if p > 0 else (1 << 15) - 1 for p in row]
            for row in probs
        ]
        self._scale_values = [
            [1.0 / keep_probability(p) if (p > 0 and style == "inverted") else 1.0 for p in row]
            for row in probs
        ]
        self.site_active = [any(a[s] for a in self.active) for s in range(n_sites)]
        self.limits = [
            torch.tensor([row[s] for row in limits], dtype=torch.int16, device=dev).view(-1, 1)
            for s in range(n_sites)
        ]
        self._scales: dict = {}
        self.keys = torch.tensor([_signed(r.masks.key) for r in runs], device=dev)
        self.counters = torch.tensor([r.masks.counter for r in runs], device=dev)
        self.draws_any = torch.tensor([int(any(a)) for a in self.active], device=dev)
        self._layouts: dict = {}

    def _site_scales(self, dtype, dev) -> list:
        """Per site, the runs' scales as a (runs, 1, 1) tensor of ``dtype``, made from the
        very floats a run alone uses."""
        if dtype not in self._scales:
            self._scales[dtype] = [
                torch.tensor([row[s] for row in self._scale_values], dtype=dtype, device=dev)
                .view(-1, 1, 1)
                for s in range(len(self.widths))
            ]
        return self._scales[dtype]

    def _layout(self, batch: int, dev):
        """Per batch size: the word terms of the step's hash input, (runs, words), and where
        each site's draws lie in the words' draws.

        All sites of all runs come from one hash pass a step. The sites that any run drops
        take consecutive spans of words, in order; within site s's span, word j of run k is
        hashed at its own stream's word o_ks + j (o_ks: the words of run k's active sites
        before s), so the term is (o_ks + j) * golden, wrapped. A run that drops nothing at a
        site gets any draws there; its limit keeps them all."""
        if batch not in self._layouts:
            union = word_spans(
                [batch * w if any_ else None for w, any_ in zip(self.widths, self.site_active)]
            )
            words = sum((sp[1] + 3) // 4 for sp in union if sp)
            terms = torch.zeros(len(self.runs), words, dtype=torch.int64)
            for k, active in enumerate(self.active):
                own = word_spans([batch * w if a else None for w, a in zip(self.widths, active)])
                for sp, mine in zip(union, own):
                    if sp is None:
                        continue
                    start, n = sp[0] // 4, (sp[1] + 3) // 4
                    first = mine[0] // 4 if mine else 0
                    terms[k, start : start + n] = torch.arange(first, first + n).mul_(
                        _signed(_GOLDEN)
                    )
            self._layouts[batch] = (terms.to(dev), union)
        return self._layouts[batch]

    def __call__(self, batch: int, dtype, dev) -> list:
        """One step's masks, per site ``None`` or ``(mask (runs, batch, width), scale)``."""
        # base = splitmix64(key + counter * golden): the next step's hash offset, per run.
        bases = _mix_(self.counters.mul(_signed(_GOLDEN)).add_(self.keys).add_(_signed(_GOLDEN)))
        self.counters.add_(self.draws_any)
        terms, spans = self._layout(batch, dev)
        scales = self._site_scales(dtype, dev)
        K = len(self.runs)
        draws = _mix_(terms + bases.unsqueeze(1)).view(torch.int16)
        out = []
        for s, (width, span) in enumerate(zip(self.widths, spans)):
            if span is None:
                out.append(None)
                continue
            start, n = span
            site = draws[:, start : start + n].view(K, batch, width)
            mask = site.new_empty(site.shape, dtype=dtype)
            torch.le(site, self.limits[s].view(K, 1, 1), out=mask)  # 1 kept, 0 dropped
            out.append((mask.mul_(scales[s]), scales[s]))
        return out

    def sync(self) -> None:
        """Write the device-side counters back to the runs' own streams."""
        for run, counter in zip(self.runs, self.counters.tolist()):
            run.masks.counter = counter


class _GroupMaxNorm:
    """The per-run max-norm both stacked optimisers apply after their update: hidden weights
    always, the output weight when the group bounds it; a run without a bound gets inf."""

    def __init__(self, hidden_weights, output_weight, variants, dev):
        self.bounded = hidden_weights + ([output_weight] if variants[0]["max_norm_output"] else [])
        norms = [v["max_norm"] or math.inf for v in variants]
        self.max_norm = _runs_tensor(norms, dev, (-1, 1))

    def apply_max_norm(self) -> None:
        for w in self.bounded:
            _renorm_runs_(w, self.max_norm)


class GroupSGDHinton(_GroupMaxNorm):
    """SGDHinton over stacked weights, with per-run learning rate, momentum, weight decay and
    max-norm: the same products and sums, per element, as ``optim.SGDHinton``."""

    def __init__(self, params, hidden_weights, output_weight, variants, dev):
        self.params = params
        self.velocities = [torch.zeros_like(p) for p in params]
        wd = [v["weight_decay"] for v in variants]
        self.weight_decay = _runs_tensor(wd, dev) if any(wd) else None
        super().__init__(hidden_weights, output_weight, variants, dev)
        self.coef = self.momentum = None
        self._host_wd = wd
        self._index = {id(p): i for i, p in enumerate(params)}
        self._folded: set[int] = set()
        self._scratch: dict = {}
        self._grads: dict = {}

    def set_epoch(self, lrs, moms, dev) -> None:
        coefs = [-(1.0 - m) * lr for lr, m in zip(lrs, moms)]
        # Written into the same tensors every epoch: a captured epoch reads them where they are.
        if self.momentum is None:
            self.momentum, self.coef = _runs_tensor(moms, dev), _runs_tensor(coefs, dev)
        else:
            self.momentum.copy_(_runs_tensor(moms, "cpu"))
            self.coef.copy_(_runs_tensor(coefs, "cpu"))
        self._host = list(zip(moms, coefs, self._host_wd))

    def prepare_steps(self, count: int) -> None:
        """Nothing: a step's numbers are the epoch's (see ``GroupAdam.prepare_steps``)."""

    def finish_steps(self, count: int) -> None:
        """Nothing to count."""

    def _update_velocity(self, p, v, g) -> None:
        shape = (-1,) + (1,) * (p.dim() - 1)
        if self.weight_decay is not None:
            wd = self.weight_decay.view(shape)
            g = torch.where(wd != 0, g + p * wd, g)
        step = torch.mul(g, self.coef.view(shape), out=_scratch(self._scratch, p))
        torch.addcmul(step, v, self.momentum.view(shape), out=v)

    @torch.no_grad()
    def fold_gradient(self, p, a, b=None) -> None:
        """``SGDHinton.fold_gradient`` for the stack. On the CPU a product is folded run by run
        with the run's own scalars, the very call a run alone makes; elsewhere the stacked
        gradient is formed and the vectorised update follows."""
        i = self._index[id(p)]
        v = self.velocities[i]
        if b is not None and p.device.type == "cpu":
            for k, (momentum, coef, weight_decay) in enumerate(self._host):
                v[k].addmm_(a[k], b[k], beta=momentum, alpha=coef)
                if weight_decay != 0:
                    v[k].add_(p[k], alpha=coef * weight_decay)
        else:
            g = a if b is None else torch.matmul(a, b, out=_scratch(self._grads, p))
            self._update_velocity(p, v, g)
        self._folded.add(i)

    @torch.no_grad()
    def step(self, j: int | None = None) -> None:
        folded, self._folded = self._folded, set()
        for i, (p, v) in enumerate(zip(self.params, self.velocities)):
            if i not in folded:
                self._update_velocity(p, v, p.grad)
        torch._foreach_add_(self.params, self.velocities)
        self.apply_max_norm()

    def run_state(self, k: int, param_index: int) -> dict:
        return {"velocity": self.velocities[param_index][k].clone()}

    def load_run_state(self, k: int, param_index: int, state: dict) -> None:
        self.velocities[param_index][k].copy_(state["velocity"])


class GroupAdam(_GroupMaxNorm):
    """torch.optim.Adam's update (its single-tensor path, as on the CPU) over stacked weights, with
    a per-run learning rate, followed by the per-run max-norm."""

    def __init__(self, params, hidden_weights, output_weight, variants, dev):
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        v0 = variants[0]
        self.beta1, self.beta2 = v0["adam_betas"]
        self.eps, self.weight_decay = v0["adam_eps"], v0["weight_decay"]
        self.steps = 0
        super().__init__(hidden_weights, output_weight, variants, dev)
        self.lrs = None
        self._host_lrs = None
        self._tables = None  # per step of an epoch: (-lr / bc1 per run, sqrt(bc2)), on the device

    def set_epoch(self, lrs, moms, dev) -> None:
        # float64 on the device: lr / bias correction there rounds as Python's float does,
        # and the step needs nothing from the host but two numbers.
        self.lrs = torch.tensor(lrs, dtype=torch.float64, device=dev)
        self._host_lrs = list(lrs)

    def prepare_steps(self, count: int) -> None:
        """Write the next ``count`` steps' step sizes and bias corrections into device tables,
        for ``step(j)``: a captured epoch cannot take them from the host as Python numbers.
        Each is the very float the host computes for ``step()``."""
        neg, bc2 = [], []
        for t in range(self.steps + 1, self.steps + count + 1):
            bc1 = 1 - self.beta1**t
            neg.append([-(lr / bc1) for lr in self._host_lrs])
            bc2.append((1 - self.beta2**t) ** 0.5)
        neg = torch.tensor(neg, dtype=torch.float64).to(self.params[0].dtype)
        bc2 = torch.tensor(bc2, dtype=torch.float64)
        dev = self.params[0].device
        if self._tables is None or self._tables[0].shape != neg.shape:
            self._tables = (neg.to(dev), bc2.to(dev))
        else:
            self._tables[0].copy_(neg)
            self._tables[1].copy_(bc2)

    def finish_steps(self, count: int) -> None:
        """Count the ``count`` steps ``step(j)`` made from the tables."""
        self.steps += count

    @torch.no_grad()
    def step(self, j: int | None = None) -> None:
        """One update; ``j``: the update is the ``j``-th of those ``prepare_steps`` tabled, and
        takes its numbers from the device (the step count moves in ``finish_steps``)."""
        if j is None:
            self.steps += 1
            bc1 = 1 - self.beta1**self.steps
            bc2_sqrt = (1 - self.beta2**self.steps) ** 0.5
            # torch's Adam: p - (lr / bc1) * m / denom, its step size a float32 number
            neg_step = self.lrs.div(bc1).neg_().to(self.params[0].dtype)
        else:
            neg_step, bc2_sqrt = self._tables[0][j], self._tables[1][j]
        for p, m, s in zip(self.params, self.exp_avg, self.exp_avg_sq):
            g = p.grad
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            s.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (s.sqrt() / bc2_sqrt).add_(self.eps)
            # addcdiv_(m, denom, value=-step_size) computes p + (value * m) / denom.
            p.add_(m.mul(neg_step.view((-1,) + (1,) * (p.dim() - 1))).div_(denom))
        self.apply_max_norm()

    def run_state(self, k: int, param_index: int) -> dict:
        return {
            "step": torch.tensor(float(self.steps)),
            "exp_avg": self.exp_avg[param_index][k].clone(),
            "exp_avg_sq": self.exp_avg_sq[param_index][k].clone(),
        }

    def load_run_state(self, k: int, param_index: int, state: dict) -> None:
        self.steps = int(state["step"].item())
        self.exp_avg[param_index][k].copy_(state["exp_avg"])
        self.exp_avg_sq[param_index][k].copy_(state["exp_avg_sq"])


@torch.no_grad()
def _renorm_runs_(weight: torch.Tensor, max_norm: torch.Tensor) -> None:
    """``renorm_rows_`` for each run's matrix at once; a bound of inf leaves a run untouched."""
    norms = torch.linalg.vector_norm(weight, dim=-1)
    # renorm_rows_ writes max_norm / norms with a float, which torch computes as this product.
    weight.mul_((norms.reciprocal() * max_norm).clamp_(max=1.0).unsqueeze(-1))


class Group:
    """The stacked model of a group of ``RunState``s that start at the same epoch."""

    def __init__(self, runs: list[RunState], dev):
        self.runs = runs
        v0 = runs[0].variant
        self.variants = [r.variant for r in runs]
        n_layers = len(v0["hidden"]) + 1
        self.weights = [
            torch.stack([r.model.layers[i].weight.detach() for r in runs]).contiguous()
            for i in range(n_layers)
        ]
        self.biases = [
            torch.stack([r.model.layers[i].bias.detach() for r in runs]).contiguous()
            for i in range(n_layers)
        ]
        self.layers = list(zip(self.weights, self.biases))
        # The single-run optimiser's parameter order: hidden weights, output weight, biases.
        self.params = self.weights[:-1] + [self.weights[-1]] + self.biases
        cls = GroupAdam if v0["optimizer"] == "adam" else GroupSGDHinton
        self.opt = cls(self.params, self.weights[:-1], self.weights[-1], self.variants, dev)
        self.fold = getattr(self.opt, "fold_gradient", None)  # for fused_step
        style = v0["dropout_style"]
        widths = [N_INPUTS] + list(v0["hidden"])
        self.masks = GroupMasks(runs, self.variants, style, widths, dev)
        self.any_input = any(v["input_dropout"] for v in self.variants)
        self.any_hidden = any(v["hidden_dropout"] for v in self.variants)
        self.relu = v0["activation"] == "relu"
        self.paper = style == "paper"
        self._load_optimizer_states()

    def _single_params(self, run: RunState):
        m = run.model
        return m.hidden_weights + [m.layers[-1].weight] + [layer.bias for layer in m.layers]

    def _single_opt(self, run: RunState):
        return getattr(run.opt, "optimizer", run.opt)  # torch's Adam inside its max-norm wrapper

    def _load_optimizer_states(self) -> None:
        for k, run in enumerate(self.runs):
            opt = self._single_opt(run)
            for i, p in enumerate(self._single_params(run)):
                if p in opt.state and opt.state[p]:
                    self.opt.load_run_state(k, i, opt.state[p])

    def sync_to_runs(self, epoch: int) -> None:
        """Copy each run's slice into its own network and optimiser (for its checkpoint), with
        this epoch's learning rate and momentum in its optimiser, as train_run leaves them."""
        self.masks.sync()
        for k, run in enumerate(self.runs):
            schedules.apply(run.opt, run.variant, epoch)
            with torch.no_grad():
                for i, layer in enumerate(run.model.layers):
                    layer.weight.copy_(self.weights[i][k])
                    layer.bias.copy_(self.biases[i][k])
            opt = self._single_opt(run)
            for i, p in enumerate(self._single_params(run)):
                opt.state[p] = self.opt.run_state(k, i)

    @torch.no_grad()
    def train_batch(self, split, idx, reduction, loss_sum, err_sum, step=None) -> None:
        """One step of every run, run k on the examples ``idx[k]`` of ``split``; adds each run's
        summed loss and error count to its running (device) totals. Nothing in it waits on
        the host: the masks' counters and the optimisers' per-run numbers live on the device.
        ``step``: its number in an epoch of ``StaticEpoch``."""
        x, y = split.batch(idx)
        loss, logits = fused_step(
            self.layers,
            x,
            y,
            relu=self.relu,
            masks=self.masks(x.shape[1], x.dtype, x.device),
            reduction=reduction,
            fold=self.fold,
        )
        self.opt.step(step)
        loss_sum += (loss if reduction == "sum" else loss * idx.shape[1]).double()
        err_sum += (logits.argmax(-1) != y).sum(-1)

    @torch.no_grad()
    def evaluate(self, test, chunk: int = 10_000):
        """Per run: mean cross-entropy and error count on the test set, as in ``train.evaluate``."""
        K = len(self.runs)
        dev = test.images.device
        loss = torch.zeros(K, device=dev, dtype=torch.float64)
        errors = torch.zeros(K, device=dev, dtype=torch.int64)
        in_keep = _runs_tensor(
            [
                keep_probability(v["input_dropout"]) if v["input_dropout"] else 1.0
                for v in self.variants
            ],
            dev,
            (-1, 1, 1),
        )
        hid_keep = _runs_tensor(
            [
                keep_probability(v["hidden_dropout"]) if v["hidden_dropout"] else 1.0
                for v in self.variants
            ],
            dev,
            (-1, 1, 1),
        )
        for start in range(0, len(test), chunk):
            x = test.images[start : start + chunk]
            y = test.labels[start : start + chunk]
            h = x.unsqueeze(0).expand(K, *x.shape)
            if self.paper and self.any_input:
                h = h * in_keep
            for w, b in self.layers[:-1]:
                h = _affine(h, w, b)
                h = h.clamp_min_(0.0) if self.relu else h.sigmoid_()
                if self.paper and self.any_hidden:
                    h = h * hid_keep
            w, b = self.layers[-1]
            logits = _affine(h, w, b)
            # Per run, the very reduction train.evaluate makes (a float32 sum, then float64).
            loss += torch.stack(
                [F.cross_entropy(logits[k], y, reduction="sum").double() for k in range(K)]
            )
            errors += (logits.argmax(-1) != y.unsqueeze(0)).sum(-1)
        return loss / len(test), errors

    @torch.no_grad()
    def max_row_norms(self) -> torch.Tensor:
        per_layer = [torch.linalg.vector_norm(w, dim=-1).amax(-1) for w in self.weights[:-1]]
        return torch.stack(per_layer).amax(0)


class StaticEpoch:
    """A stack's epoch of training steps on fixed buffers, captured once as a CUDA graph and
    replayed every epoch.

    At batch 100 a stacked step is a hundred-odd small kernels, and launching them one by one
    from Python leaves a GPU mostly idle. Captured, an epoch's 600 steps go to the device as
    one launch. Everything the steps read is where the capture saw it: each epoch's data order
    is copied into one index buffer that the steps slice, the loss and error sums are buffers,
    the optimisers' per-run numbers are written into their tensors (``set_epoch``), and Adam's
    per-step numbers come from device tables (``prepare_steps``). With ``capture=False`` the
    same steps run eagerly on the same buffers: the CPU tests check that path's numbers
    against the plain loop's, bit for bit.
    """

    def __init__(self, group: Group, split, batch_size: int, reduction: str, capture: bool):
        K, n, dev = len(group.runs), len(split), split.images.device
        self.group, self.split, self.reduction = group, split, reduction
        self.perm = torch.zeros(K, n, dtype=torch.int64, device=dev)
        self.batches = torch.split(self.perm, batch_size, dim=1)
        self.loss_sum = torch.zeros(K, device=dev, dtype=torch.float64)
        self.err_sum = torch.zeros(K, device=dev, dtype=torch.int64)
        self.graph = None
        if capture:
            group.opt.prepare_steps(len(self.batches))  # the tables the capture reads
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._steps()
            finally:
                group.opt._folded = set()  # only host bookkeeping ran
            self.graph = graph

    def _steps(self) -> None:
        for j, idx in enumerate(self.batches):
            self.group.train_batch(
                self.split, idx, self.reduction, self.loss_sum, self.err_sum, step=j
            )

    def __call__(self, perms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch in the order ``perms`` (runs, n); returns the loss and error sums."""
        self.perm.copy_(perms)
        self.loss_sum.zero_()
        self.err_sum.zero_()
        steps = len(self.batches)
        self.group.opt.prepare_steps(steps)
        if self.graph is None:
            self._steps()
        else:
            self.graph.replay()
        self.group.opt.finish_steps(steps)
        return self.loss_sum, self.err_sum


CUDA_GRAPH_MODES = ("auto", "on", "off", "static")


def epoch_mode(cuda_graphs: str, dev: torch.device) -> str:
    """How a stack's epochs run: ``graph`` (captured, CUDA only), ``static`` (``StaticEpoch``
    uncaptured) or ``eager`` (the plain loop). ``cuda_graphs``: ``auto`` captures on CUDA,
    ``on`` insists, ``off`` never; ``static`` runs the captured path's code uncaptured."""
    if cuda_graphs not in CUDA_GRAPH_MODES:
        raise ValueError(
            f"cuda_graphs = {cuda_graphs!r} is not valid: expected one of "
            + ", ".join(CUDA_GRAPH_MODES)
        )
    if cuda_graphs == "on" and dev.type != "cuda":
        raise ValueError(f"cuda_graphs = 'on' needs a CUDA device; this run is on {dev.type}")
    if cuda_graphs == "static":
        return "static"
    if cuda_graphs == "off" or dev.type != "cuda":
        return "eager"
    return "graph"


def train_group(
    specs: list[RunSpec],
    epochs: int,
    data_root=None,
    data=None,
    device: str = "auto",
    checkpoint_every: int = 10,
    train_limit: int | None = None,
    threads: int | None = None,
    tf32: bool = True,
    on_stale_checkpoint: str = "error",
    log=None,
    cuda_graphs: str = "auto",
) -> list[dict]:
    """Train several runs in one process, stacked; return their summaries (in ``specs`` order).

    The runs must share ``group_key``. Runs whose checkpoints stand at different epochs are
    trained as separate stacks, one after the other. ``cuda_graphs`` (``epoch_mode``): on
    CUDA each stack's epochs after its first are replayed from one captured CUDA graph.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_run_arguments(epochs, checkpoint_every, on_stale_checkpoint)
    if not specs:
        raise ValueError("train_group needs at least one run")
    variants = [resolve(s.variant) for s in specs]
    keys = {group_key(v) for v in variants}
    if None in keys or len(keys) != 1:
        raise ValueError(
            "these runs cannot share a stack: they must use sgd_hinton or adam and agree on "
            + ", ".join(SHARED_KEYS)
            + " (and, for adam, on "
            + ", ".join(ADAM_SHARED_KEYS)
            + ")"
        )
    dev, tf32 = prepare_device(device, threads, tf32)
    mode = epoch_mode(cuda_graphs, dev)
    started = time.time()
    train, test = prepare_data(variants[0], data_root, data, dev, train_limit)
    runs = []
    for spec, variant in zip(specs, variants):
        prefix = f"[{spec.name or 'run'} seed {spec.seed}] "
        run = RunState(variant, spec.seed, spec.out_dir, dev, train, test, train_limit, spec.name)
        run.log = run.logger(log, prefix)
        run.resume(epochs, on_stale_checkpoint, run.log)
        runs.append(run)
    by_start: dict[int, list[RunState]] = {}
    for run in runs:
        by_start.setdefault(run.start_epoch, []).append(run)
    graphed = {}  # per run: whether its stack's epochs were replayed from a graph
    for start in sorted(by_start):
        stack = by_start[start]
        captured = _train_stack(stack, start, epochs, train, test, dev, checkpoint_every, log, mode)
        graphed.update((id(run), captured) for run in stack)
    wall = time.time() - started
    return [run.finish(epochs, tf32, wall, graphed[id(run)]) for run in runs]


def _train_stack(runs, start_epoch, epochs, train, test, dev, checkpoint_every, log, mode):
    group = Group(runs, dev)
    static = None
    K = len(runs)
    v0 = runs[0].variant
    bs, reduction = v0["batch_size"], v0["loss_reduction"]
    n = len(train)
    live = [True] * K
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        lrs, moms = zip(*(schedules.values(r.variant, epoch) for r in runs))
        group.opt.set_epoch(lrs, moms, dev)
        # Each run's own permutation from its own generator, as train_run draws it.
        perms = torch.stack([torch.randperm(n, generator=r.data_gen) for r in runs]).to(dev)
        # A graph is captured after one plain epoch, which has built every buffer it reads.
        if static is None and (mode == "static" or (mode == "graph" and epoch > start_epoch)):
            static = _static_epoch(group, train, bs, reduction, mode, log)
            if static is None:
                mode = "eager"
        if static is not None:
            loss_sum, err_sum = static(perms)
        else:
            loss_sum = torch.zeros(K, device=dev, dtype=torch.float64)
            err_sum = torch.zeros(K, device=dev, dtype=torch.int64)
            for idx in torch.split(perms, bs, dim=1):
                group.train_batch(train, idx, reduction, loss_sum, err_sum)
        test_loss, test_err = group.evaluate(test)
        norms = group.max_row_norms()
        loss_sum, err_sum = loss_sum.tolist(), err_sum.tolist()
        test_loss, test_err, norms = test_loss.tolist(), test_err.tolist(), norms.tolist()
        due = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs
        if due:
            group.sync_to_runs(epoch)
        for k, run in enumerate(runs):
            if not live[k]:
                continue
            row = epoch_row(
                epoch,
                lrs[k],
                moms[k],
                loss_sum[k],
                err_sum[k],
                n,
                test_loss[k],
                test_err[k],
                len(test),
                norms[k],
                t0,
            )
            live[k] = run.record(row, epochs, checkpoint_every, run.log)
        if not any(live):
            break
    return static is not None and static.graph is not None


def _static_epoch(group, train, bs, reduction, mode, log):
    """The stack's ``StaticEpoch``; ``None`` (the plain loop, said in the log) if a CUDA graph
    cannot be captured here."""
    if mode == "static":
        return StaticEpoch(group, train, bs, reduction, capture=False)
    try:
        return StaticEpoch(group, train, bs, reduction, capture=True)
    except RuntimeError as err:  # capture refuses an operation: nothing of it ran
        log(f"CUDA graph capture failed ({err}); training this stack without graphs")
        return None
