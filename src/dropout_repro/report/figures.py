"""The report's figures, drawn from run files with matplotlib's Agg backend.

``figure1`` is the reproduction of the paper's Figure 1: test errors (of 10,000) against epochs, one
line per variant, with the paper's three MNIST numbers as horizontal reference lines. The others show
what the paper's text only describes: train and test loss, the learning-rate and momentum schedules,
and the largest incoming-weight norm of any hidden unit against the max-norm bound.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dropout_repro.report.aggregate import (  # noqa: E402
    PAPER_LEVELS,
    Run,
    curves_table,
    runs_by_variant,
)

STYLE = {
    "font.family": "serif",
    "font.serif": ["DejaVu Serif"],
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "svg.fonttype": "path",  # text as outlines: the SVG shows the same glyphs everywhere
    "svg.hashsalt": "dropout-repro",  # stable element ids, so an unchanged figure is an unchanged file
}
PNG_DPI = 150

log = logging.getLogger(__name__)


def _label(text: str) -> str:
    # A "$" in a variant name would switch matplotlib to mathtext.
    return str(text).replace("$", r"\$")


def _colors(names: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _save(fig, paths: Sequence[str | Path]) -> None:
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".svg":
            fig.savefig(p, format="svg", metadata={"Date": None})
        else:
            fig.savefig(p, format="png", dpi=PNG_DPI)
    plt.close(fig)


def _y_range(
    curves: pd.DataFrame, runs: Sequence[Run], levels: Sequence[float]
) -> tuple[float, float]:
    """Errors start in the thousands and settle near the paper's levels; the axis shows the settling.

    The first twentieth of the epochs (at least the first) may run off the top, as in the paper.
    """
    last = int(max(r.metrics["epoch"].max() for r in runs))
    skip = max(1, last // 20)
    if len(curves):
        late = curves.loc[curves["epoch"] > skip, "max"].to_numpy(float)
        if late.size == 0:
            late = curves["max"].to_numpy(float)
        low = float(np.nanmin(curves["min"].to_numpy(float)))
    else:
        late = np.concatenate([r.metrics["test_errors"].to_numpy(float) for r in runs])
        low = float(np.nanmin(late))
    late = late[np.isfinite(late)]
    top = float(np.percentile(late, 95)) if late.size else max(levels, default=200)
    top = max(top, max(levels, default=0) + 40)
    bottom = min(low, min(levels, default=low)) - 20
    return max(0.0, bottom), min(10_000.0, top * 1.05)


def figure1(
    runs: Sequence[Run],
    out_paths: Sequence[str | Path],
    config: Mapping[str, Any] | None = None,
    curves: pd.DataFrame | None = None,
    paper_levels: Mapping[int, str] = PAPER_LEVELS,
) -> None:
    """Test errors against epochs (the paper's Figure 1), saved to each of ``out_paths``.

    Per variant: the mean over non-diverged seeds (thick), the min-max band over them (shaded) and
    every seed (faint; a diverged seed dotted and ending in a cross at its last epoch).
    """
    groups = runs_by_variant(runs, config)
    if curves is None:
        curves = curves_table(runs, config)
    colors = _colors(list(groups))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9.0, 5.6), layout="constrained")
        for name, group in groups.items():
            c = colors[name]
            for r in group:
                m = r.metrics
                ok = np.isfinite(m["test_loss"].to_numpy(float))
                ax.plot(
                    m["epoch"][ok],
                    m["test_errors"][ok],
                    color=c,
                    alpha=0.3,
                    lw=0.6,
                    ls=":" if r.diverged else "-",
                )
                if r.diverged and ok.any():
                    last = np.flatnonzero(ok)[-1]
                    ax.plot(m["epoch"].iloc[last], m["test_errors"].iloc[last], "x", color=c, ms=6)
            cv = curves[curves["variant"] == name]
            n_div = sum(r.diverged for r in group)
            n_ok = len(group) - n_div
            label = f"{_label(name)} ({n_ok} seed{'' if n_ok == 1 else 's'}"
            label += f", {n_div} diverged)" if n_div else ")"
            if len(cv):
                ax.fill_between(cv["epoch"], cv["min"], cv["max"], color=c, alpha=0.15, lw=0)
                ax.plot(cv["epoch"], cv["mean"], color=c, lw=1.8, label=label)
            else:
                ax.plot([], [], color=c, ls=":", label=label)
        last_epoch = max(int(r.metrics["epoch"].max()) for r in runs)
        for level, text in paper_levels.items():
            ax.axhline(level, color="0.35", ls="--", lw=0.9, zorder=0.5)
            # Labelled at the left, where the curves are still far above the paper's levels.
            ax.annotate(
                text,
                (0.0, level),
                xycoords=("axes fraction", "data"),
                xytext=(4, 2),
                textcoords="offset points",
                ha="left",
                va="bottom",
                fontsize=8,
                color="0.3",
            )
        ax.set_xlim(0, max(last_epoch, 1))
        ax.set_ylim(*_y_range(curves, runs, list(paper_levels)))
        ax.set_xlabel("Epochs")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        sizes = sorted({int(r.summary.get("test_size") or 10_000) for r in runs})
        ax.set_ylabel(f"Number of test errors (of {', '.join(f'{n:,}' for n in sizes)})")
        ax.legend(loc="upper right", frameon=False)
        _save(fig, out_paths)


def _mean_column(group: Sequence[Run], column: str) -> pd.DataFrame:
    used = [r for r in group if not r.diverged] or list(group)
    long = pd.concat([r.metrics[["epoch", column]] for r in used], ignore_index=True)
    long = long[np.isfinite(long[column].to_numpy(float))]
    return long.groupby("epoch", as_index=False)[column].mean()


def _grid(n: int, width: float = 9.0, row_height: float = 2.6):
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width, row_height * nrows + 0.4),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def loss_figure(
    runs: Sequence[Run], out_paths: Sequence[str | Path], config: Mapping[str, Any] | None = None
) -> None:
    """Training and test cross-entropy against epochs, one panel per variant (mean over seeds)."""
    groups = runs_by_variant(runs, config)
    colors = _colors(list(groups))
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(groups))
        for ax, (name, group) in zip(axes, groups.items()):
            train = _mean_column(group, "train_loss")
            test = _mean_column(group, "test_loss")
            ax.plot(train["epoch"], train["train_loss"], color=colors[name], lw=1.3, label="train")
            ax.plot(
                test["epoch"], test["test_loss"], color=colors[name], lw=1.3, ls="--", label="test"
            )
            if (train["train_loss"] > 0).all() and (test["test_loss"] > 0).all():
                ax.set_yscale("log")
            ax.set_title(_label(name), loc="left")
            ax.set_xlabel("Epochs")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("Loss")
            ax.legend(frameon=False)
        _save(fig, out_paths)


def schedules_figure(
    runs: Sequence[Run], out_paths: Sequence[str | Path], config: Mapping[str, Any] | None = None
) -> None:
    """The learning rate and momentum each variant used, as recorded per epoch."""
    groups = runs_by_variant(runs, config)
    colors = _colors(list(groups))
    with plt.rc_context(STYLE):
        fig, (ax_lr, ax_m) = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
        for i, (name, group) in enumerate(groups.items()):
            m = group[0].metrics
            # Variants sharing a schedule would hide one another; a small dash offset keeps both visible.
            style = {"color": colors[name], "lw": 1.4, "ls": (i % 4 * 1.5, (5, 2)) if i else "-"}
            ax_lr.plot(m["epoch"], m["lr"], label=_label(name), **style)
            ax_m.plot(m["epoch"], m["momentum"], label=_label(name), **style)
        if (pd.concat([g[0].metrics["lr"] for g in groups.values()]) > 0).all():
            ax_lr.set_yscale("log")
        ax_lr.set_title("Learning rate ε_t", loc="left")
        ax_m.set_title("Momentum p_t", loc="left")
        for ax in (ax_lr, ax_m):
            ax.set_xlabel("Epochs")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax_lr.get_legend_handles_labels()
        fig.legend(
            handles, labels, loc="outside lower center", ncols=min(4, len(labels)), frameon=False
        )
        _save(fig, out_paths)


def max_norm_figure(
    runs: Sequence[Run], out_paths: Sequence[str | Path], config: Mapping[str, Any] | None = None
) -> None:
    """The largest incoming-weight L2 norm of any hidden unit, against the variant's bound."""
    groups = runs_by_variant(runs, config)
    colors = _colors(list(groups))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9.0, 4.2), layout="constrained")
        bounds: dict[float, list[str]] = {}
        for name, group in groups.items():
            mean = _mean_column(group, "max_row_norm")
            ax.plot(
                mean["epoch"], mean["max_row_norm"], color=colors[name], lw=1.4, label=_label(name)
            )
            bound = group[0].hyper.get("max_norm")
            if bound is not None:
                bounds.setdefault(float(bound), []).append(name)
        for bound in bounds:
            ax.axhline(bound, color="0.35", ls="--", lw=0.9, zorder=0.5)
            ax.annotate(
                f"max-norm bound {bound:.4g}",
                (0.0, bound),
                xycoords=("axes fraction", "data"),
                xytext=(4, 2),
                textcoords="offset points",
                fontsize=8,
                color="0.3",
            )
        ax.set_xlabel("Epochs")
        ax.set_ylabel("Largest row norm ‖w_j‖₂")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(
            handles, labels, loc="outside lower center", ncols=min(4, len(labels)), frameon=False
        )
        _save(fig, out_paths)


FIGURES = {
    "figure1": figure1,
    "loss": loss_figure,
    "schedules": schedules_figure,
    "max_norm": max_norm_figure,
}


def all_figures(
    runs: Sequence[Run],
    outputs: Mapping[str, Sequence[str | Path]],
    config: Mapping[str, Any] | None = None,
    curves: pd.DataFrame | None = None,
) -> None:
    """Draw every figure named in ``outputs`` (keys of ``FIGURES``) to its paths."""
    unknown = sorted(set(outputs) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    for key, paths in outputs.items():
        if key == "figure1":
            figure1(runs, paths, config, curves=curves)
        else:
            FIGURES[key](runs, paths, config)
        log.info("%s -> %s", key, ", ".join(str(p) for p in paths))
