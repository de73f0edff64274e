"""The paper's optimiser, the max-norm constraint, and the optimisers it is compared with."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer


def renorm_rows_(weight: torch.Tensor, max_norm: float) -> None:
    """Divide every row (a unit's incoming weights) whose L2 norm exceeds ``max_norm`` by
    ``norm / max_norm``, in place; rows within the bound are left exactly as they are.

    One reduction and one multiply for the whole matrix: no Python loop over rows and no host sync.
    Dimensions past the first are flattened, so a row is everything that feeds one output unit.
    """
    with torch.no_grad():
        _renorm_rows(weight, max_norm)


def _renorm_rows(weight: torch.Tensor, max_norm: float) -> None:
    norms = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
    # max_norm / norm is below 1 exactly for the rows over the bound; a zero row gives inf -> 1.
    scale = (max_norm / norms).clamp_(max=1.0)
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))


def max_row_norm(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """The largest row norm over the given weight matrices, as a 0-d tensor (no host sync)."""
    return torch.stack(
        [torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).max() for w in weights]
    ).max()


class SGDHinton(Optimizer):
    r"""Stochastic gradient descent with momentum as written in Hinton et al. (2012), Appendix A,
    followed by the per-unit max-norm constraint.

    For each parameter :math:`w` with gradient :math:`g` (the mean over the mini-batch, as the
    loss defines it), learning rate :math:`\epsilon` and momentum :math:`p` read from the parameter
    group at every step:

    .. math::
        v_0 &= 0 \\
        v_t &= p\, v_{t-1} - (1 - p)\, \epsilon\, (g_t + \lambda w_{t-1}) \\
        w_t &= w_{t-1} + v_t

    and then, for every parameter with two or more dimensions (a weight matrix whose rows are
    units), each row with :math:`\lVert w_{t,j} \rVert_2 > c` is divided by
    :math:`\lVert w_{t,j} \rVert_2 / c`, where :math:`c` is ``max_norm``. The bound is checked on
    the *updated* weights, so it holds after every step. Biases are never renormalised.

    This differs from ``torch.optim.SGD`` in three ways: the velocity holds a step in weight space
    (the learning rate is applied when the step is made, not when it is taken), the gradient is
    damped by :math:`(1 - p)` from the first step on (``SGD`` starts its buffer at the raw
    gradient), and the sign lives in the velocity. With a learning rate that decays every epoch,
    ``SGD`` rescales the whole accumulated velocity by the new rate; this update does not.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\epsilon` (> 0).
        momentum: :math:`p` in [0, 1).
        max_norm: the bound :math:`c` on each unit's incoming weight norm; ``None`` or 0 for none.
        weight_decay: :math:`\lambda` >= 0, an L2 penalty added to the gradient.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        max_norm: float | None = None,
        weight_decay: float = 0.0,
    ):
        _check(lr, momentum, max_norm, weight_decay)
        defaults = dict(lr=lr, momentum=momentum, max_norm=max_norm, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._scratch: dict = {}
        self._folded: set[int] = set()  # ids of the parameters fold_gradient has updated
        self._groups: dict[int, int] = {}

    def _velocity(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "velocity" not in state:
            state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["velocity"]

    def _update_velocity(self, p, g, lr, momentum, weight_decay) -> None:
        # Two passes over the velocity's memory, not three; written so that the grouped
        # trainer's per-run tensors give bit-identical results (its addcmul rounds as this add
        # with alpha does). The product goes to a buffer kept between steps.
        v = self._velocity(p)
        if weight_decay != 0:
            g = g + p * weight_decay
        step = _scratch(self._scratch, p)
        torch.mul(g, -(1.0 - momentum) * lr, out=step)
        torch.add(step, v, alpha=momentum, out=v)  # v = p v - (1 - p) lr g

    @torch.no_grad()
    def fold_gradient(self, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None):
        """Make this step's velocity update for ``p`` now, from its gradient ``a``, or from the
        gradient ``a @ b`` given as its two factors without forming it.

        With factors, one matrix product computes v <- p v - (1 - p) lr (a @ b) in place (BLAS
        computes C <- beta C + alpha A B in one sweep over C), which saves writing the gradient
        and reading it back, and a pass over the velocity: about a tenth of a CPU training step.
        The next ``step`` then only adds the velocity to ``p`` (and applies the max-norm); it
        ignores ``p.grad``. The rule is the one ``step`` applies; the sums round differently.
        """
        group = self._group_of(p)
        lr, momentum = group["lr"], group["momentum"]
        weight_decay = group["weight_decay"]
        _check(lr, momentum, group["max_norm"], weight_decay)
        if b is None:
            self._update_velocity(p, a, lr, momentum, weight_decay)
        else:
            coef = -(1.0 - momentum) * lr
            v = self._velocity(p)
            v.addmm_(a, b, beta=momentum, alpha=coef)
            if weight_decay != 0:
                v.add_(p, alpha=coef * weight_decay)
        self._folded.add(id(p))

    def _group_of(self, p: torch.Tensor) -> dict:
        # Indices, not the group dicts: load_state_dict replaces those.
        i = self._groups.get(id(p))
        if i is None or i >= len(self.param_groups):
            self._groups = {
                id(q): i for i, g in enumerate(self.param_groups) for q in g["params"]
            }
            i = self._groups.get(id(p))
            if i is None:
                raise ValueError("fold_gradient: this tensor is not a parameter of this optimiser")
        return self.param_groups[i]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        folded, self._folded = self._folded, set()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            max_norm, weight_decay = group["max_norm"], group["weight_decay"]
            _check(lr, momentum, max_norm, weight_decay)
            params = [p for p in group["params"] if id(p) in folded or p.grad is not None]
            if not params:
                continue
            for p in params:
                if id(p) not in folded:
                    self._update_velocity(p, p.grad, lr, momentum, weight_decay)
            torch._foreach_add_(params, [self._velocity(p) for p in params])  # w = w + v
            if max_norm:
                for p in params:
                    if p.dim() >= 2:
                        _renorm_rows(p, max_norm)
        return loss


def _scratch(buffers: dict, p: torch.Tensor) -> torch.Tensor:
    """A work buffer shaped like ``p``, made once (not part of the optimiser's state)."""
    buf = buffers.get(p)
    if buf is None or buf.shape != p.shape or buf.device != p.device:
        buf = buffers[p] = torch.empty_like(p)
    return buf


def _check(lr, momentum, max_norm, weight_decay) -> None:
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"SGDHinton: lr = {lr!r} is not valid: expected a number > 0")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"SGDHinton: momentum = {momentum!r} is not valid: expected [0, 1)")
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm >= 0):
        raise ValueError(
            f"SGDHinton: max_norm = {max_norm!r} is not valid: expected None, 0 or a number > 0"
        )
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(
            f"SGDHinton: weight_decay = {weight_decay!r} is not valid: expected a number >= 0"
        )


class MaxNormAfterStep:
    """Wraps a torch optimiser so that each step is followed by the per-unit max-norm constraint
    (for ``torch_sgd`` and ``adam``, which know nothing of it)."""

    def __init__(self, optimizer: Optimizer, constrained: list[tuple[torch.Tensor, float]]):
        self.optimizer = optimizer
        self.constrained = [(w, c) for w, c in constrained if c]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for w, c in self.constrained:
            renorm_rows_(w, c)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state)


def build_optimizer(variant: dict, hidden_weights: list, other_params: list, output_weight):
    """The optimiser a resolved variant names.

    ``hidden_weights`` are the hidden layers' weight matrices (always under ``max_norm``);
    ``other_params`` the output layer's weight and all biases. The output weight is bounded only
    when ``max_norm_output`` is set: the paper bounds hidden units. Group 0 holds the hidden
    weights, group 1 the rest; the schedules set lr and momentum in both.
    """
    max_norm = variant["max_norm"] or None
    out_norm = max_norm if variant["max_norm_output"] else None
    lr, momentum, wd = variant["lr0"], variant["momentum_initial"], variant["weight_decay"]
    groups = [
        {"params": hidden_weights, "max_norm": max_norm},
        {"params": other_params, "max_norm": out_norm},
    ]
    name = variant["optimizer"]
    if name == "sgd_hinton":
        return SGDHinton(groups, lr=lr, momentum=momentum, weight_decay=wd)
    plain = [{"params": g["params"]} for g in groups]
    if name == "torch_sgd":
        damp = variant["dampening"]
        opt = torch.optim.SGD(
            plain,
            lr=lr,
            momentum=momentum,
            dampening=momentum if damp == "momentum" else damp,
            weight_decay=wd,
        )
    elif name == "adam":
        opt = torch.optim.Adam(
            plain,
            lr=lr,
            betas=tuple(variant["adam_betas"]),
            eps=variant["adam_eps"],
            weight_decay=wd,
        )
    else:
        raise ValueError(
            f"optimizer = {name!r} is not valid: expected sgd_hinton, torch_sgd or adam"
        )
    constrained = [(w, max_norm) for w in hidden_weights] + [(output_weight, out_norm)]
    return MaxNormAfterStep(opt, constrained)
