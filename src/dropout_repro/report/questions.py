"""The seed blog post's three open questions, answered from the runs that address them.

(a) Does ``torch.optim.SGD`` with ``dampening = momentum`` do as well as the paper's update?
(b) What happens without the max-norm constraint, or with weight decay in its place?
(c) Does Adam give the same result as the paper's SGD?

Pairs are found by the resolved hyperparameters, not by names. A *candidate* answers a question; its
*baseline* is a variant that differs from it only in the keys the question is about:

* (a) candidate ``optimizer == "torch_sgd"``; baseline ``optimizer == "sgd_hinton"``, equal on every
  key outside ``OPTIMIZER_KEYS`` (the optimiser and its schedule may differ, nothing else);
* (b) candidate ``max_norm`` null (``weight_decay`` 0: no constraint; > 0: weight decay instead);
  baseline with a ``max_norm`` and no weight decay, equal on every key outside ``CONSTRAINT_KEYS``;
* (c) candidate ``optimizer == "adam"``; baseline as in (a).

When several baselines fit, the one named ``dropout`` is taken, else the first in the configuration.
Each pair reports both means and spreads over the seeds that did not diverge, their difference and,
when both sides have at least two such seeds, the p-value of Welch's t-test (unequal variances).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from scipy import stats

from dropout_repro.report.aggregate import Run, runs_by_variant

OPTIMIZER_KEYS = frozenset(
    {
        "optimizer",
        "dampening",
        "adam_betas",
        "adam_eps",
        "lr0",
        "lr_decay",
        "momentum_initial",
        "momentum_final",
        "momentum_ramp_epochs",
    }
)
CONSTRAINT_KEYS = frozenset({"max_norm", "max_norm_output", "weight_decay"})
ALPHA = 0.05
NOT_RUN = "not run in this configuration"


@dataclass
class Comparison:
    candidate: str
    baseline: str
    differs: dict[str, tuple[Any, Any]]  # key -> (candidate value, baseline value)
    candidate_errors: list[float]
    baseline_errors: list[float]
    candidate_diverged: int
    baseline_diverged: int
    p_value: float = math.nan

    @staticmethod
    def _mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else math.nan

    @staticmethod
    def _std(xs: list[float]) -> float:
        return float(np.std(xs, ddof=1)) if len(xs) >= 2 else math.nan

    @property
    def candidate_mean(self) -> float:
        return self._mean(self.candidate_errors)

    @property
    def baseline_mean(self) -> float:
        return self._mean(self.baseline_errors)

    @property
    def candidate_std(self) -> float:
        return self._std(self.candidate_errors)

    @property
    def baseline_std(self) -> float:
        return self._std(self.baseline_errors)

    @property
    def difference(self) -> float:
        """Candidate mean minus baseline mean: positive means more test errors than the baseline."""
        return self.candidate_mean - self.baseline_mean

    @property
    def answer(self) -> str:
        def side(name: str, xs: list[float], sd: float, div: int) -> str:
            if not xs:
                return f"{name}: every seed diverged"
            spread = "no spread (1 seed)" if len(xs) < 2 else f"sd {sd:.1f}, {len(xs)} seeds"
            extra = f", {div} diverged" if div else ""
            return f"{name}: {np.mean(xs):.1f} errors ({spread}{extra})"

        parts = [
            side(
                self.candidate, self.candidate_errors, self.candidate_std, self.candidate_diverged
            ),
            side(self.baseline, self.baseline_errors, self.baseline_std, self.baseline_diverged),
        ]
        text = "; ".join(parts) + "."
        if not (self.candidate_errors and self.baseline_errors):
            return text + " No difference can be given."
        d = self.difference
        if d == 0:
            text += f" Difference 0 errors (as many as {self.baseline})."
        else:
            more = "more" if d > 0 else "fewer"
            text += f" Difference {d:+.1f} errors ({more} than {self.baseline})."
        if math.isnan(self.p_value):
            if len(self.candidate_errors) < 2 or len(self.baseline_errors) < 2:
                text += " Welch's test needs at least two seeds on each side."
            else:
                text += " Welch's test is undefined: neither side varies across seeds."
        else:
            verdict = (
                "a difference" if self.p_value < ALPHA else "no difference that the seeds can tell"
            )
            text += f" Welch's t-test p = {self.p_value:.3g}: {verdict} at the {ALPHA:g} level."
        return text


@dataclass
class Question:
    key: str
    title: str
    hint: str  # what to run when nothing answers it
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return bool(self.comparisons)


def _differs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _same_outside(a: Mapping[str, Any], b: Mapping[str, Any], keys: frozenset[str]) -> bool:
    return all(k in keys for k in _differs(a, b))


def _welch(a: list[float], b: list[float]) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.std(a) == 0 and np.std(b) == 0:
        return math.nan
    with warnings.catch_warnings():
        # One side without spread (every seed the same count) is common with integer errors; the
        # test is still defined, scipy only warns about the zero variance.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _pairs(
    groups: Mapping[str, list[Run]],
    is_candidate: Callable[[dict], bool],
    is_baseline: Callable[[dict], bool],
    free: frozenset[str],
) -> list[Comparison]:
    hyper = {name: group[0].hyper for name, group in groups.items()}
    out = []
    for cand, ch in hyper.items():
        if not is_candidate(ch):
            continue
        fits = [
            name
            for name, bh in hyper.items()
            if name != cand and is_baseline(bh) and _same_outside(ch, bh, free)
        ]
        if not fits:
            continue
        base = "dropout" if "dropout" in fits else fits[0]
        c_used = [r.final_errors for r in groups[cand] if not r.diverged]
        b_used = [r.final_errors for r in groups[base] if not r.diverged]
        out.append(
            Comparison(
                candidate=cand,
                baseline=base,
                differs=_differs(ch, hyper[base]),
                candidate_errors=[float(x) for x in c_used],
                baseline_errors=[float(x) for x in b_used],
                candidate_diverged=len(groups[cand]) - len(c_used),
                baseline_diverged=len(groups[base]) - len(b_used),
                p_value=_welch(c_used, b_used),
            )
        )
    return out


def answer_questions(
    runs: Iterable[Run], config: Mapping[str, Any] | None = None
) -> list[Question]:
    """The three questions, each with the comparisons that this set of runs can make."""
    groups = runs_by_variant(runs, config)
    sgd = lambda h: h["optimizer"] == "sgd_hinton"  # noqa: E731
    constrained = lambda h: h["max_norm"] is not None and not h["weight_decay"]  # noqa: E731
    return [
        Question(
            "a",
            "Does torch.optim.SGD with dampening = momentum match the paper's update?",
            "add a variant equal to the dropout variant but with optimizer: torch_sgd",
            _pairs(groups, lambda h: h["optimizer"] == "torch_sgd", sgd, OPTIMIZER_KEYS),
        ),
        Question(
            "b",
            "What happens without the max-norm constraint, or with weight decay instead?",
            "add a variant equal to the dropout variant but with max_norm: null "
            "(and optionally weight_decay > 0)",
            _pairs(groups, lambda h: h["max_norm"] is None, constrained, CONSTRAINT_KEYS),
        ),
        Question(
            "c",
            "Does Adam give the same result as the paper's SGD?",
            "add a variant equal to the dropout variant but with optimizer: adam",
            _pairs(groups, lambda h: h["optimizer"] == "adam", sgd, OPTIMIZER_KEYS),
        ),
    ]
