"""The fully connected network of the paper's MNIST experiments, with its two dropout conventions.

Two conventions give the same expected activations and both are here because they are not the
same experiment once max-norm is involved:

- ``paper``: while training, each unit is kept with probability q = 1 - p and passed on unscaled;
  at test time the "mean network" multiplies what a dropped layer passes on by q (the paper halves
  the outgoing weights). The weights the bound constrains are the ones the mean network uses
  divided by q.
- ``inverted`` (``torch.nn.Dropout``): kept units are scaled by 1/q while training and nothing is
  scaled at test time. The stored weights are q times the paper's, so the same max-norm value is a
  looser constraint, and the same learning rate moves a larger effective step.

Masks come from the run's own counter-based stream (``MaskStream``), so a run's random
streams are its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

N_INPUTS = 28 * 28
N_CLASSES = 10


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
KEEP_RESOLUTION = 1 << 16  # keep probabilities are multiples of 2^-16


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea and Flood 2014) on a Python integer."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix_(z: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """The same finaliser on an int64 tensor, in place (products wrap; shifts made logical).
    ``work``: a buffer like ``z`` for the shifted copies (else one is made)."""
    t = torch.empty_like(z) if work is None else work
    for shift, mul in ((30, _signed(_MIX1)), (27, _signed(_MIX2)), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mul is not None:
            z.mul_(mul)
    return z


def draw_threshold(keep: float) -> int:
    """A 16-bit draw in [-2^15, 2^15) keeps its unit when below this: probability ``keep``."""
    return round(keep * KEEP_RESOLUTION) - KEEP_RESOLUTION // 2


def keep_probability(p: float) -> float:
    """The keep probability a mask really has: 1 - p rounded to a multiple of 2^-16
    (exact for 0.5; 0.8 becomes 52429/65536 = 0.800003...)."""
    keep = round((1.0 - p) * KEEP_RESOLUTION) / KEEP_RESOLUTION
    if keep <= 0.0:
        raise ValueError(
            f"dropout probability {p!r} keeps no unit at the masks' resolution of 2^-16: "
            f"expected at most {1 - 1 / KEEP_RESOLUTION}"
        )
    return keep


class MaskStream:
    """A run's dropout masks: a counter-based random stream derived from its seed.

    Every training step that drops units takes one number n from the counter; the step's masks
    are cut from the words of a hash of (seed, n, word index): word j is SplitMix64's finaliser
    of base_n + j * golden, and each word gives four 16-bit draws. The same seed gives the same
    masks on every device and in any company, all of a step's masks cost one pass of a few
    integer operations (about 3x cheaper than ``torch.rand`` on the CPU), and the stream's whole
    state is the counter.

    A step's dropout sites (the inputs, then each hidden layer) take consecutive runs of words,
    in that order, skipping the sites that drop nothing: site i's n_i draws begin at word
    o_i = sum of ceil(n_k / 4) over the active sites k before it.
    """

    def __init__(self, seed: int, counter: int = 0):
        self.key = splitmix64(seed ^ 0x5EED_D209_0C0A_7A7E)
        self.counter = counter
        self._golden_iota: dict = {}
        self._plans: dict = {}
        self._work: dict = {}

    def step_masks(self, sites, dtype, device) -> list:
        """One step's masks. ``sites`` lists, per dropout site, ``(shape, keep, scale)`` or
        ``None`` (no dropout there); returns per site ``None`` or a ``dtype`` tensor of that
        shape holding ``scale`` where a unit is kept (probability ``keep``, a multiple of
        2^-16) and 0 where it is dropped. Takes one counter value if any site drops."""
        sites = tuple(sites)
        if all(site is None for site in sites):
            return [None] * len(sites)
        key = (sites, dtype, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _MaskPlan(sites, dtype, device)
        draws = self._draws(plan.words, device)
        # One comparison (written straight as numbers: on the CPU about 5x faster than a bool
        # result converted) and one scaling, for all sites at once.
        mask = torch.le(draws, plan.limits, out=draws.new_empty(draws.shape, dtype=dtype))
        if plan.scales is not None:
            mask.mul_(plan.scales)
        return [
            None if site is None else mask[start : start + n].view(site[0])
            for site, (start, n) in zip(sites, plan.spans)
        ]

    def scaled_mask(self, shape, keep: float, scale: float, dtype, device) -> torch.Tensor:
        """A step with one site: ``scale`` where a unit is kept, 0 where it is dropped."""
        return self.step_masks([(tuple(shape), keep, scale)], dtype, device)[0]

    def keep_mask(self, shape, keep: float, device) -> torch.Tensor:
        """A step with one site, as a bool tensor: True where a unit is kept."""
        n = math.prod(shape)
        return self._draws((n + 3) // 4, device)[:n].view(shape) <= draw_threshold(keep) - 1

    def _draws(self, words: int, device) -> torch.Tensor:
        """The next step's ``4 * words`` draws, uniform in [-2^15, 2^15) (int16), in a buffer
        of this stream's that the next call overwrites."""
        iota = _golden_iota(self._golden_iota, words, device)
        key = (words, str(device))
        if key not in self._work:  # kept between steps: warm in the cache, no page faults
            self._work = {key: (torch.empty_like(iota[:words]), torch.empty_like(iota[:words]))}
        z, work = self._work[key]
        torch.add(iota[:words], self.base(), out=z)
        self.counter += 1
        return _mix_(z, work).view(torch.int16)

    def base(self) -> int:
        """The hash offset of the next step (as a signed 64-bit integer): word j of its masks
        is the finaliser of base + j * golden."""
        return _signed(splitmix64((self.key + self.counter * _GOLDEN) & _MASK64))


def _golden_iota(cache: dict, words: int, device) -> torch.Tensor:
    """j * golden (wrapped to int64) for j = 0 .. at least ``words`` - 1, kept per device."""
    key = str(device)
    iota = cache.get(key)
    if iota is None or len(iota) < words:
        iota = cache[key] = torch.arange(words, dtype=torch.int64, device=device).mul_(
            _signed(_GOLDEN)
        )
    return iota


def word_spans(sizes) -> list:
    """Where each site's draws lie in a step's draws: ``(start, n)`` per size ``n`` (``None``
    for a site that drops nothing), each site starting on a word (a multiple of 4 draws)."""
    spans, start = [], 0
    for n in sizes:
        if n is None:
            spans.append(None)
            continue
        spans.append((start, n))
        start += 4 * ((n + 3) // 4)
    return spans


class _MaskPlan:
    """The per-draw limit and scale vectors of one step's sites (made once per layout)."""

    def __init__(self, sites, dtype, device):
        sizes = [None if site is None else math.prod(site[0]) for site in sites]
        self.spans = [span or (0, 0) for span in word_spans(sizes)]
        total = max(start + 4 * ((n + 3) // 4) for start, n in self.spans)
        self.words = total // 4
        limits = torch.empty(total, dtype=torch.int16)
        scales = torch.empty(total, dtype=dtype)
        for site, (start, n) in zip(sites, self.spans):
            if site is not None:
                # kept when draw < threshold, i.e. draw <= threshold - 1: that fits in int16
                # for every keep probability in (0, 1], where the threshold itself may not.
                stop = start + 4 * ((n + 3) // 4)
                limits[start:stop] = draw_threshold(site[1]) - 1
                scales[start:stop] = site[2]
        self.limits = limits.to(device)
        same = all(site is None or site[2] == 1.0 for site in sites)
        self.scales = None if same else scales.to(device)


def dropout(
    x: torch.Tensor, p: float, style: str, training: bool, masks: "MaskStream | None"
) -> torch.Tensor:
    """Drop each element of ``x`` with probability ``p`` (training) or scale for the mean network
    (testing), under the given convention."""
    if p == 0.0:
        return x
    keep = keep_probability(p)
    if not training:
        return x * keep if style == "paper" else x
    scale = 1.0 / keep if style == "inverted" else 1.0
    return x * masks.scaled_mask(x.shape, keep, scale, x.dtype, x.device)


def _set_grad(param: torch.Tensor, value_into) -> None:
    """Write a gradient into the parameter's existing ``.grad`` (no new 2.5 MB buffer a step)."""
    if param.grad is None:
        param.grad = value_into(None)
    else:
        value_into(param.grad)


def _per_run(h: torch.Tensor) -> bool:
    # On the CPU a stack is multiplied run by run with the very kernel a single run uses: BLAS
    # may block a batched product of some shapes (the 10-row output layer's) differently, and a
    # run must not depend on its company. On a GPU the batched product is the point.
    return h.dim() == 3 and h.device.type == "cpu"


def _affine(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h W^T + b, for one network (2-D h) or a stack of networks (3-D h, leading run axis)."""
    if h.dim() == 2:
        return torch.addmm(bias, h, weight.t())
    if _per_run(h):
        out = h.new_empty(h.shape[0], h.shape[1], weight.shape[1])
        for k in range(h.shape[0]):
            torch.addmm(bias[k], h[k], weight[k].t(), out=out[k])
        return out
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for one network or a stack, into ``out`` when given."""
    if not _per_run(a):
        return torch.matmul(a, b, out=out)
    if out is None:
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[-1])
    for k in range(a.shape[0]):
        torch.mm(a[k], b[k], out=out[k])
    return out


@torch.no_grad()
def fused_step(layers, x, y, *, relu: bool, masks, reduction: str, fold=None):
    """The training step of a dropout MLP by hand: forward, cross-entropy, backward into
    ``.grad``. Returns ``(loss, logits)``.

    ``layers`` is a list of (weight, bias) pairs. Tensors are either one network's (x: (B, 784))
    or a stack of networks' with a leading run axis (x: (K, B, 784), weights (K, out, in), biases
    (K, out)); every operation is the same elementwise or per-run matrix product either way, so a
    run computes bit for bit the same numbers alone or stacked with others (on the CPU, a batched
    product's slices equal the single products).

    ``masks`` has one entry per dropout site (the inputs, then each hidden layer's output):
    ``None`` (no dropout there) or ``(mask, scale)``, where ``mask`` holds ``scale`` where a unit
    is kept and 0 where it is dropped; ``scale`` is 1/q for inverted dropout, 1 for the paper's
    (a float, or a per-run tensor).

    With ``fold`` (an optimiser's ``fold_gradient``), no ``.grad`` is written: each gradient is
    handed to ``fold(param, a, b)`` as the factors of the product ``a @ b`` (weights) or to
    ``fold(param, g)`` (biases), for the optimiser to fold into its own update.
    """
    h = x if masks[0] is None else x * masks[0][0]
    saved = []  # each layer's input, after dropout
    derivs = []  # per hidden layer: what the gradient arriving at its output goes through
    for (weight, bias), site in zip(layers[:-1], masks[1:]):
        saved.append(h)
        a = _affine(h, weight, bias)
        h = a.clamp_min_(0.0) if relu else a.sigmoid_()
        slope = None if relu else h * (1.0 - h)
        scale = None
        if site is not None:
            mask, scale = site
            h.mul_(mask)
            if slope is not None:
                slope.mul_(mask)
                scale = None
        # A ReLU's derivative, masked: 1 where h > 0 (the unit was active and kept), 0
        # elsewhere; times the dropout scale. A logistic unit's: its slope, masked and scaled.
        derivs.append((h, scale) if relu else (slope, None))
    saved.append(h)
    logits = _affine(h, *layers[-1])
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, y.unsqueeze(-1))
    loss = -(picked.sum((-2, -1)) if reduction == "sum" else picked.mean((-2, -1)))
    g = logp.exp_()  # d loss / d logits = softmax - onehot (over the batch size for a mean)
    g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(picked, -1.0))
    if reduction == "mean":
        g.div_(y.shape[-1])
    for k in range(len(layers) - 1, -1, -1):
        (weight, bias), h_in = layers[k], saved[k]
        if fold is None:
            _set_grad(bias, lambda out: torch.sum(g, -2, out=out))
            _set_grad(weight, lambda out: _matmul(g.transpose(-1, -2), h_in, out=out))
        else:
            fold(bias, torch.sum(g, -2))
            fold(weight, g.transpose(-1, -2), h_in)
        if k > 0:
            d, scale = derivs[k - 1]
            g = _matmul(g, weight)
            # ReLU's own backward kernel: g where d > 0, else 0, in one pass.
            g = torch.ops.aten.threshold_backward(g, d, 0.0) if relu else g.mul_(d)
            if scale is not None:
                g.mul_(scale)
    return loss, logits


class MLP(nn.Module):
    """784 - hidden... - 10, fully connected, with dropout on the inputs and on every hidden layer."""

    def __init__(
        self,
        hidden: list[int],
        activation: str = "relu",
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        dropout_style: str = "inverted",
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        sizes = [N_INPUTS, *hidden, N_CLASSES]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = {"relu": F.relu, "logistic": torch.sigmoid}[activation]
        self.input_dropout = input_dropout
        self.hidden_dropout = hidden_dropout
        self.dropout_style = dropout_style
        self.masks: MaskStream | None = None
        with torch.no_grad():
            for layer in self.layers:
                # Appendix A: weights ~ N(0, 0.01^2); biases start at zero.
                layer.weight.normal_(0.0, init_std, generator=generator)
                layer.bias.zero_()

    @classmethod
    def from_variant(cls, variant: dict, generator: torch.Generator | None = None) -> "MLP":
        return cls(
            hidden=variant["hidden"],
            activation=variant["activation"],
            input_dropout=variant["input_dropout"],
            hidden_dropout=variant["hidden_dropout"],
            dropout_style=variant["dropout_style"],
            init_std=variant["init_std"],
            generator=generator,
        )

    @property
    def hidden_weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.layers[:-1]]

    @torch.no_grad()
    def train_step(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", fold=None):
        """Forward and backward for one training mini-batch, without autograd.

        Sets ``.grad`` of every parameter to the gradient of the cross-entropy (``reduction`` over
        the batch) of the dropout network, and returns ``(loss, logits)``. Equal, up to float
        rounding, to ``forward`` in training mode plus ``loss.backward()`` (the tests check it);
        fused by hand because on a CPU the autograd bookkeeping and separate mask passes cost as
        much as a third of the step. ``fold``: hand the gradients to an optimiser's
        ``fold_gradient`` instead (see ``fused_step``).
        """
        masks = self.step_masks(x)
        layers = [(layer.weight, layer.bias) for layer in self.layers]
        return fused_step(
            layers,
            x,
            y,
            relu=self.activation is F.relu,
            masks=masks,
            reduction=reduction,
            fold=fold,
        )

    def dropout_sites(self, batch: int) -> list:
        """Per dropout site (the inputs, then each hidden layer): ``(shape, keep, scale)`` for a
        batch of ``batch`` examples, or ``None`` where nothing is dropped."""
        scale_of = (lambda keep: 1.0 / keep) if self.dropout_style == "inverted" else None

        def site(p, width):
            if not p:
                return None
            keep = keep_probability(p)
            return ((batch, width), keep, scale_of(keep) if scale_of else 1.0)

        widths = [layer.out_features for layer in self.layers[:-1]]
        return [site(self.input_dropout, N_INPUTS)] + [
            site(self.hidden_dropout, w) for w in widths
        ]

    def step_masks(self, x: torch.Tensor) -> list:
        """One training step's masks for the batch ``x``, as ``fused_step`` takes them."""
        sites = self.dropout_sites(x.shape[0])
        masks = self.masks.step_masks(sites, x.dtype, x.device)
        return [None if m is None else (m, site[2]) for m, site in zip(masks, sites)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dropout network while training (drawing the step's masks), the mean network
        while evaluating."""
        if self.training:
            masks = [None if m is None else m[0] for m in self.step_masks(x)]
        else:
            masks = [None] * len(self.layers)
        style = self.dropout_style
        x = _apply_dropout(x, masks[0], self.input_dropout, style, self.training)
        for layer, mask in zip(self.layers[:-1], masks[1:]):
            x = self.activation(layer(x))
            x = _apply_dropout(x, mask, self.hidden_dropout, style, self.training)
        return self.layers[-1](x)


def _apply_dropout(x, mask, p, style, training):
    if not p:
        return x
    if training:
        return x * mask
    return x * keep_probability(p) if style == "paper" else x
