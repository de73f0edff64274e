"""The learning-rate and momentum schedules of Appendix A, indexed by epoch t = 0, 1, ..."""

from __future__ import annotations


def learning_rate(epoch: int, lr0: float, decay: float) -> float:
    """epsilon_t = epsilon_0 * f**t."""
    return lr0 * decay**epoch


def momentum(epoch: int, initial: float, final: float, ramp_epochs: int) -> float:
    """p_t = (t/T) p_f + (1 - t/T) p_i for t < T, p_f afterwards.

    The paper prints this with p_i and p_f swapped, which would make momentum fall from 0.99 to
    0.5; its text and every reproduction ramp it up, as here.
    """
    if epoch >= ramp_epochs:
        return final
    frac = epoch / ramp_epochs
    return frac * final + (1.0 - frac) * initial


def values(variant: dict, epoch: int) -> tuple[float, float]:
    """This epoch's learning rate and momentum for a resolved variant. Adam has no momentum
    schedule: the momentum given for it is its beta1, the decay of its first-moment average."""
    lr = learning_rate(epoch, variant["lr0"], variant["lr_decay"])
    if variant["optimizer"] == "adam":
        return lr, variant["adam_betas"][0]
    mom = momentum(
        epoch,
        variant["momentum_initial"],
        variant["momentum_final"],
        variant["momentum_ramp_epochs"],
    )
    return lr, mom


def apply(optimizer, variant: dict, epoch: int) -> tuple[float, float]:
    """Set this epoch's learning rate and momentum in every parameter group; return them.

    For ``torch_sgd`` with ``dampening: momentum`` the dampening follows the momentum (the blog's
    question (a)). Adam's betas stay fixed.
    """
    lr, mom = values(variant, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if variant["optimizer"] != "adam":
            group["momentum"] = mom
        if variant["optimizer"] == "torch_sgd" and variant["dampening"] == "momentum":
            group["dampening"] = mom
    return lr, mom
