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


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """The same finaliser on an int64 tensor, in place (products wrap; shifts made logical)."""
    z.bitwise_xor_((z >> 30) & ((1 << 34) - 1)).mul_(_signed(_MIX1))
    z.bitwise_xor_((z >> 27) & ((1 << 37) - 1)).mul_(_signed(_MIX2))
    return z.bitwise_xor_((z >> 31) & ((1 << 33) - 1))


def keep_probability(p: float) -> float:
    """The keep probability a mask really has: 1 - p rounded to a multiple of 2^-16
    (exact for 0.5 and 0.8's neighbour 52429/65536 = 0.800003...)."""
    return round((1.0 - p) * KEEP_RESOLUTION) / KEEP_RESOLUTION


class MaskStream:
    """A run's dropout masks: a counter-based random stream derived from its seed.

    Mask number n (counted from the start of the run) is a hash of (seed, n, element index), cut
    into 16-bit draws: the same seed gives the same masks on every device and in any company, a
    mask costs a few integer passes (about 3x cheaper than ``torch.rand`` on the CPU), and the
    stream's whole state is the counter.
    """

    def __init__(self, seed: int, counter: int = 0):
        self.key = splitmix64(seed ^ 0x5EED_D209_0C0A_7A7E)
        self.counter = counter
        self._iota: dict = {}

    def keep_mask(self, shape, keep: float, device) -> torch.Tensor:
        """A bool tensor, True where a unit is kept (probability ``keep``, a multiple of 2^-16)."""
        n = math.prod(shape)
        words = (n + 3) // 4
        key = (words, str(device))
        if key not in self._iota:
            self._iota[key] = torch.arange(words, dtype=torch.int64, device=device)
        base = splitmix64((self.key + self.counter * _GOLDEN) & _MASK64)
        self.counter += 1
        z = self._iota[key].mul(_signed(_GOLDEN)).add_(_signed(base))
        draws = _mix_(z).view(torch.int16)[:n].view(shape)  # uniform in [-2^15, 2^15)
        threshold = round(keep * KEEP_RESOLUTION) - KEEP_RESOLUTION // 2
        return draws < threshold


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
    kept = masks.keep_mask(x.shape, keep, x.device)
    scale = 1.0 / keep if style == "inverted" else 1.0
    return x * torch.where(kept, scale, 0.0)


def _set_grad(param: torch.Tensor, into, fresh) -> None:
    """Write a gradient into the parameter's existing ``.grad`` (no new 2.5 MB buffer a step)."""
    if param.grad is None:
        param.grad = fresh()
    else:
        into(param.grad)


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
    def train_step(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
        """Forward and backward for one training mini-batch, without autograd.

        Sets ``.grad`` of every parameter to the gradient of the cross-entropy (``reduction`` over
        the batch) of the dropout network, and returns ``(loss, logits)``. Equal, up to float
        rounding, to ``forward`` in training mode plus ``loss.backward()`` (the tests check it);
        fused by hand because on a CPU the autograd bookkeeping and separate mask passes cost as
        much as a third of the step. An inverted-dropout scale is folded into the next matrix
        product's ``alpha``.
        """
        relu = self.activation is F.relu
        inverted = self.dropout_style == "inverted"
        saved = []  # per layer: (its input after dropout, the scale on that input)
        h, scale = x, 1.0
        if self.input_dropout:
            keep = keep_probability(self.input_dropout)
            h = x * self.masks.keep_mask(x.shape, keep, x.device)
            scale = 1.0 / keep if inverted else 1.0
        derivs = []  # per hidden layer: what multiplies the incoming gradient
        for layer in self.layers[:-1]:
            saved.append((h, scale))
            a = torch.addmm(layer.bias, h, layer.weight.t(), alpha=scale)
            h = a.clamp_min_(0.0) if relu else a.sigmoid_()
            kept = None
            if self.hidden_dropout:
                keep = keep_probability(self.hidden_dropout)
                kept = self.masks.keep_mask(h.shape, keep, h.device)
                scale = 1.0 / keep if inverted else 1.0
            else:
                scale = 1.0
            if relu:
                if kept is not None:
                    h.mul_(kept)
                derivs.append(h > 0)  # the unit was active and kept
            else:
                slope = h * (1.0 - h)
                if kept is not None:
                    slope.mul_(kept)
                    h = h * kept
                derivs.append(slope)
        saved.append((h, scale))
        out = self.layers[-1]
        logits = torch.addmm(out.bias, h, out.weight.t(), alpha=scale)
        logp = torch.log_softmax(logits, dim=1)
        picked = logp.gather(1, y.unsqueeze(1))
        loss = -(picked.sum() if reduction == "sum" else picked.mean())
        g = logp.exp_()  # d loss / d logits = softmax - onehot (over the batch size for a mean)
        g.scatter_add_(1, y.unsqueeze(1), torch.full_like(picked, -1.0))
        if reduction == "mean":
            g.div_(len(y))
        for k in range(len(self.layers) - 1, -1, -1):
            layer, (h_in, s) = self.layers[k], saved[k]
            _set_grad(layer.bias, lambda out: torch.sum(g, 0, out=out), lambda: g.sum(0))
            if s != 1.0:
                g = g * s
            _set_grad(layer.weight, lambda out: torch.mm(g.t(), h_in, out=out), lambda: g.t() @ h_in)
            if k > 0:
                g = torch.mm(g, layer.weight).mul_(derivs[k - 1])
        return loss, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style, gen, train = self.dropout_style, self.masks, self.training
        x = dropout(x, self.input_dropout, style, train, gen)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
            x = dropout(x, self.hidden_dropout, style, train, gen)
        return self.layers[-1](x)
