"""One self-contained HTML page that reads like a short paper, from the run files and tables.

Self-contained: the figures are inlined as base64 data URIs and the style sheet sits in the page, so
the file can be mailed or archived alone. Every piece of text from the runs or the configuration goes
through Jinja2's autoescaping; the template never marks anything safe, so a variant called
``<script>...`` is printed, not run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import importlib.metadata
import json
import logging
import math
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import pandas as pd

from dropout_repro import __version__
from dropout_repro.report.aggregate import (
    PAPER_EPOCHS,
    PAPER_LEVELS,
    TOLERANCE_ERRORS,
    DISPLAY_COLUMNS,
    Run,
    final_errors_display,
    final_errors_table,
    load_runs,
    read_final_errors,
    reproduction_verdict,
    runs_by_variant,
)
from dropout_repro.report.questions import NOT_RUN, answer_questions
from dropout_repro.variant import DEFAULTS, fingerprint

DEFAULT_TITLE = "Dropout on MNIST: a reproduction of Hinton et al. (2012)"
PAPER_TRAIN_SIZE = 60_000

log = logging.getLogger(__name__)
PAPER_HIDDEN = ([800, 800], [1200, 1200], [2000, 2000], [1200, 1200, 1200])  # Figure 1's nets
PAPER_LR0 = 10.0
REPORT_PACKAGES = ("torch", "numpy", "pandas", "scipy", "matplotlib", "jinja2", "snakemake")

FIGURE_TEXT = {
    "figure1": (
        "Test errors against epochs, the counterpart of the paper's Figure 1. Thick line: "
        "mean over the seeds that did not diverge; shaded band: their minimum to maximum; faint "
        "lines: each seed (dotted, ending in a cross: a diverged seed). Dashed lines: the paper's "
        "three MNIST results."
    ),
    "loss": "Training (solid) and test (dashed) cross-entropy against epochs, mean over seeds.",
    "schedules": (
        "The learning rate ε_t = ε_0 f^t and momentum p_t recorded at every epoch. The momentum "
        "ramps from p_i to p_f over T epochs (the paper prints p_i and p_f swapped)."
    ),
    "max_norm": (
        "The largest L2 norm of any hidden unit's incoming weight vector, mean over seeds, against "
        "each variant's max-norm bound (dashed)."
    ),
}
FIGURE_TITLES = {
    "figure1": "Test errors during training",
    "loss": "Training and test loss",
    "schedules": "Learning-rate and momentum schedules",
    "max_norm": "Incoming-weight norms",
}


# ---- provenance helpers (called by the workflow script, usable from anywhere) -------------------


def git_state(repo: str | Path = ".") -> tuple[str, str]:
    """(commit, dirty) of the checkout at ``repo``: dirty is "yes"/"no"; both "unknown" outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", "unknown"
    return commit or "unknown", "yes" if status.strip() else "no"


def package_versions(names: Iterable[str] = REPORT_PACKAGES) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {"python": platform.python_version(), "dropout-repro": __version__}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---- pieces of the page -------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == math.sqrt(15.0):
            return "3.873 (√15)"
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _network(hidden: Sequence[int]) -> str:
    return "-".join(str(h) for h in [784, *hidden, 10])


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else ""


def _data_uri(path: str | Path) -> str:
    path = Path(path)
    kind = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def methods_table(groups: Mapping[str, list[Run]]) -> dict[str, Any]:
    """Every hyperparameter (rows, in ``DEFAULTS`` order) of every variant (columns)."""
    keys = list(DEFAULTS) + sorted({k for g in groups.values() for k in g[0].hyper} - set(DEFAULTS))
    rows = []
    for key in keys:
        cells = []
        for group in groups.values():
            value = group[0].hyper.get(key)
            cells.append(
                {"text": _fmt(value), "changed": key in DEFAULTS and value != DEFAULTS[key]}
            )
        rows.append({"key": key, "default": _fmt(DEFAULTS.get(key)), "cells": cells})
    return {"variants": list(groups), "rows": rows}


def deviations(
    groups: Mapping[str, list[Run]],
    epochs: int,
    train_sizes: set[int],
    epochs_text: str | None = None,
) -> list[dict]:
    """Where this run departs from the paper or from the blog's code, and why, from variant values.

    ``epochs`` is the shortest run's length; ``epochs_text`` how the page names the range.
    """
    hyper = {name: g[0].hyper for name, g in groups.items()}
    every = list(hyper)

    def having(pred) -> list[str]:
        return [n for n, h in hyper.items() if pred(h)]

    def scope(names: list[str]) -> str:
        return "all variants" if names == every else _names(names)

    out: list[dict] = []

    def add(title: str, against: str, names: list[str], reason: str) -> None:
        if names:
            out.append(
                {"title": title, "against": against, "applies": scope(names), "reason": reason}
            )

    if epochs < PAPER_EPOCHS:
        add(
            f"{epochs_text or epochs} epochs instead of {PAPER_EPOCHS}",
            "paper",
            every,
            "A shorter run fits the compute this configuration was given; its numbers are not the "
            "paper's end point and the page makes no claim that the result reproduced.",
        )
    small = sorted(s for s in train_sizes if s < PAPER_TRAIN_SIZE)
    if small:
        add(
            f"{', '.join(f'{s:,}' for s in small)} training images instead of {PAPER_TRAIN_SIZE:,}",
            "paper",
            every,
            "The data set was cut (data.train_limit) to make a quick run; fewer images mean more "
            "test errors.",
        )
    add(
        "Momentum buffer starts at zero; the first step descends",
        "blog's code",
        having(lambda h: h["optimizer"] == "sgd_hinton"),
        "The blog set the buffer to the raw gradient and then added it to the weights, an unscaled "
        "gradient-ascent step (every step ascends at momentum 0). Appendix A's update starts from "
        "Δw = 0 and subtracts the scaled gradient.",
    )
    add(
        "Max-norm applied after the update",
        "blog's code",
        having(lambda h: h["max_norm"] is not None),
        'The paper renormalises when "a weight-update violates this constraint", i.e. after it. '
        "The blog computed the factor from the weights before the update, so the update could leave "
        "the bound violated.",
    )
    root15 = having(
        lambda h: h["max_norm"] is not None and math.isclose(h["max_norm"], math.sqrt(15))
    )
    add(
        "Bound of √15 ≈ 3.873 on each incoming weight norm (squared length 15)",
        "blog's code",
        root15,
        "Appendix A's l = 15 is read, as the independent reproductions read it, as a bound on the "
        "squared length. The blog capped the norm itself at 15, a constraint about 4× looser in "
        "squared length.",
    )
    add(
        "Norm capped at 15 (the blog's reading)",
        "paper",
        having(lambda h: h["max_norm"] is not None and math.isclose(h["max_norm"], 15.0)),
        "Kept to measure the blog's reading; the reproductions read l = 15 as the squared length.",
    )
    other_bound = having(
        lambda h: h["max_norm"] is not None
        and not math.isclose(h["max_norm"], 15.0)
        and not math.isclose(h["max_norm"], math.sqrt(15))
    )
    add(
        "A max-norm bound other than the paper's",
        "paper",
        other_bound,
        "Set in the configuration ("
        + "; ".join(f"{n}: {_fmt(hyper[n]['max_norm'])}" for n in other_bound)
        + "); the 2014 follow-up suggests bounds of 3 to 4.",
    )
    add(
        "No max-norm constraint on a dropout net",
        "paper",
        having(lambda h: h["max_norm"] is None and h["hidden_dropout"] > 0),
        "Deliberate: it answers the blog's question (b). The paper's dropout results use the "
        "constraint.",
    )
    add(
        "Max-norm also on the output units",
        "paper",
        having(lambda h: h["max_norm"] is not None and h["max_norm_output"]),
        "The paper bounds each hidden unit's incoming weights only; set in the configuration.",
    )
    add(
        "Weight decay",
        "paper",
        having(lambda h: h["weight_decay"] > 0),
        "Deliberate: it answers the blog's question (b), weight decay in place of max-norm.",
    )
    add(
        "Rectified linear hidden units",
        "paper",
        having(lambda h: h["activation"] == "relu"),
        "The paper's appendix does not name its units, and logistic units were usual in 2012. The "
        "blog chose ReLU; keeping it makes the comparison with the blog direct. Variants with "
        "activation: logistic test the other reading.",
    )
    inverted = having(
        lambda h: h["dropout_style"] == "inverted" and (h["hidden_dropout"] or h["input_dropout"])
    )
    add(
        "Inverted dropout instead of the paper's mean network",
        "paper",
        inverted,
        "PyTorch scales kept units by 1/(1−p) while training; the paper trains with unscaled masks "
        "and halves the outgoing weights at test time. Expected activations agree, but the stored "
        "weights are the paper's times the keep probability of the layer feeding them, so a bound "
        "c here equals a bound c/keep in the paper's convention (twice as loose at 50 % dropout).",
    )
    add(
        f"ε_0 other than the paper's {PAPER_LR0:g}",
        "paper",
        having(lambda h: h["optimizer"] != "adam" and h["lr0"] != PAPER_LR0),
        "Appendix A gives ε_0 = 10.0; several reproductions use 1.0. The values are in the methods "
        "table; config/README.md gives the reading behind the defaults.",
    )
    add(
        "torch.optim.SGD instead of the paper's update",
        "paper",
        having(lambda h: h["optimizer"] == "torch_sgd"),
        "Deliberate: it answers the blog's question (a). PyTorch applies the learning rate after the "
        "momentum sum; with dampening = momentum the two updates differ only in when ε_t enters.",
    )
    add(
        "Adam instead of SGD with momentum",
        "paper",
        having(lambda h: h["optimizer"] == "adam"),
        "Deliberate: it answers the blog's question (c).",
    )
    add(
        "Summed instead of mean mini-batch loss",
        "paper",
        having(lambda h: h["loss_reduction"] == "sum"),
        "The paper's update uses the mean gradient over the mini-batch; a sum scales the step by "
        "the batch size.",
    )
    add(
        "A network not in the paper's Figure 1",
        "paper",
        having(lambda h: list(h["hidden"]) not in [list(x) for x in PAPER_HIDDEN]),
        "Figure 1 has 784-800-800-10, 784-1200-1200-10, 784-2000-2000-10 and 784-1200-1200-1200-10.",
    )
    add(
        "Inputs standardised with mean 0.1307 and standard deviation 0.3081",
        "paper's text is silent",
        having(lambda h: (h["input_mean"], h["input_std"]) == (0.1307, 0.3081)),
        "The paper does not state its preprocessing; these are the usual MNIST statistics, as the "
        "blog used.",
    )
    add(
        "Momentum rises from p_i to p_f",
        "paper's text",
        having(lambda h: h["optimizer"] != "adam" and h["momentum_initial"] < h["momentum_final"]),
        "The formula printed in Appendix A swaps p_i and p_f, which would make momentum fall; the "
        "ramp follows the evident intent (0.5 up to 0.99 over 500 epochs).",
    )
    add(
        "Row norms computed on the device, in one vectorised operation",
        "blog's code",
        having(lambda h: h["max_norm"] is not None),
        "The blog built its renormalisation tensor on the CPU (its optimiser fails on a GPU) and "
        "took each row's norm in a Python loop with .item(), about 1,600 host synchronisations per "
        "step.",
    )
    add(
        "28 × 28 = 784 input pixels",
        "blog's text",
        every,
        "The blog's text says 32 × 32 = 784; MNIST images are 28 × 28, which is where the 784 inputs "
        "come from.",
    )
    return out


def _benchmarks(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    rows = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            rows.append(
                {"job": f"{p.parent.name}/{p.stem}", "seconds": "missing", "hms": "", "rss": ""}
            )
            continue
        bench = pd.read_csv(p, sep="\t")
        first = bench.iloc[0]
        rss = first.get("max_rss")
        rows.append(
            {
                "job": f"{p.parent.name}/{p.stem}",
                "seconds": f"{float(first['s']):.1f}",
                "hms": str(first.get("h:m:s", "")),
                "rss": (
                    "" if rss is None or pd.isna(rss) or str(rss) == "-" else f"{float(rss):.0f}"
                ),
            }
        )
    return rows


def _study(csv_path: str | Path | None, caption: str | None) -> dict[str, Any] | None:
    if not csv_path:
        return None
    path = Path(csv_path)
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {
        "caption": caption or f"Study table ({path.name}).",
        "columns": [str(c) for c in table.columns],
        "rows": table.astype(str).values.tolist(),
        "source": str(csv_path),
    }


def _abstract(
    final: pd.DataFrame,
    groups: Mapping[str, list[Run]],
    epochs_text: str,
    train_sizes: set[int],
    full: bool,
) -> str:
    nets = sorted({_network(g[0].hyper["hidden"]) for g in groups.values()})
    seeds = sorted({len(g) for g in groups.values()})
    seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    sizes = ", ".join(f"{s:,}" for s in sorted(train_sizes))
    text = (
        f"We repeat the MNIST experiment of Hinton et al. (2012) in PyTorch: a {', '.join(nets)} "
        f"network trained with and without dropout, {len(groups)} variant(s) with {seeds_text} "
        f"seed(s) each, for {epochs_text} epochs on {sizes} training images (the paper: {PAPER_EPOCHS} "
        f"epochs on {PAPER_TRAIN_SIZE:,}). "
    )
    parts = []
    for row in final.to_dict("records"):
        if pd.isna(row["paper_errors"]):
            continue
        if row["n_used"] == 0:
            parts.append(
                f"{row['variant']}: every seed diverged (paper: {row['paper_errors']:.0f})"
            )
            continue
        sd = "" if row["n_used"] < 2 else f" ± {row['final_errors_std']:.1f}"
        parts.append(
            f"{row['variant']}: {row['final_errors_mean']:.1f}{sd} test errors "
            f"(paper: {'' if row['paper_errors'] == 160 else 'about '}{row['paper_errors']:.0f})"
        )
    if parts:
        text += (
            "Final test errors, mean ± standard deviation over seeds — " + "; ".join(parts) + ". "
        )
    diverged = int(final["diverged"].sum())
    if diverged:
        text += f"{diverged} run(s) diverged and are counted apart from the means. "
    if full:
        within = sum(
            1
            for row in final.to_dict("records")
            if reproduction_verdict(row, True).startswith("reproduced")
        )
        compared = int(final["paper_errors"].notna().sum())
        text += (
            f"{within} of {compared} variant(s) with a paper number come within ±{TOLERANCE_ERRORS} "
            "errors of it."
        )
    else:
        text += "The run is shorter than the paper's, so these numbers do not test its claims."
    return text


# ---- the page -----------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("dropout_repro", "templates"),
        autoescape=True,  # every template, whatever its file name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def build_context(
    runs: Sequence[Run],
    config: Mapping[str, Any] | None,
    *,
    final: pd.DataFrame | None = None,
    figures: Mapping[str, str | Path] | None = None,
    benchmarks: Sequence[str | Path] = (),
    command: str = "unknown",
    git_commit: str = "unknown",
    git_dirty: str = "unknown",
    versions: Mapping[str, str] | None = None,
    made_by: Mapping[str, str] | None = None,
    study_csv: str | Path | None = None,
    study_caption: str | None = None,
    generated: str | None = None,
) -> dict[str, Any]:
    """Everything the template shows, as plain strings, numbers and lists."""
    config = dict(config or {})
    groups = runs_by_variant(runs, config)
    if final is None:
        final = final_errors_table(runs, config)
    summaries = [r.summary for r in runs]
    requested = sorted({int(s["epochs_requested"]) for s in summaries})
    # The shortest run decides whether the page may give verdicts; the text names the whole range.
    epochs = requested[0]
    epochs_text = str(epochs) if len(requested) == 1 else f"{requested[0]} to {requested[-1]}"
    train_sizes = {int(s.get("train_size") or 0) for s in summaries}
    full = epochs >= PAPER_EPOCHS and min(train_sizes) >= PAPER_TRAIN_SIZE
    made_by = dict(made_by or {})
    n_runs = len(runs)

    display = final_errors_display(final)
    verdicts = [reproduction_verdict(row, full) for row in final.to_dict("records")]
    for row, verdict in zip(display, verdicts):
        row["Verdict"] = verdict
    columns = list(DISPLAY_COLUMNS) + (["Verdict"] if full else [])

    figs = []
    # Figure 1 comes first, whatever order the figures were passed in.
    ordered = sorted((figures or {}).items(), key=lambda kv: kv[0] != "figure1")
    for number, (key, path) in enumerate(ordered, start=1):
        figs.append(
            {
                "number": number,
                "key": key,
                "title": FIGURE_TITLES.get(key, key),
                "text": FIGURE_TEXT.get(key, ""),
                "src": _data_uri(path),
                "made_by": made_by.get(key, f"the metrics.csv of {n_runs} runs"),
            }
        )

    questions = []
    for q in answer_questions(runs, config):
        questions.append(
            {
                "key": q.key,
                "title": q.title,
                "answered": q.answered,
                "not_run": f"{NOT_RUN.capitalize()}; to answer it, {q.hint}.",
                "comparisons": [
                    {
                        "candidate": c.candidate,
                        "baseline": c.baseline,
                        "differs": ", ".join(
                            f"{k}: {_fmt(a)} vs {_fmt(b)}" for k, (a, b) in c.differs.items()
                        ),
                        "answer": c.answer,
                        "candidate_mean": (
                            "" if math.isnan(c.candidate_mean) else f"{c.candidate_mean:.1f}"
                        ),
                        "baseline_mean": (
                            "" if math.isnan(c.baseline_mean) else f"{c.baseline_mean:.1f}"
                        ),
                        "candidate_std": (
                            "" if math.isnan(c.candidate_std) else f"{c.candidate_std:.1f}"
                        ),
                        "baseline_std": (
                            "" if math.isnan(c.baseline_std) else f"{c.baseline_std:.1f}"
                        ),
                        "difference": "" if math.isnan(c.difference) else f"{c.difference:+.1f}",
                        "p_value": "" if math.isnan(c.p_value) else f"{c.p_value:.3g}",
                    }
                    for c in q.comparisons
                ],
            }
        )

    def distinct(key: str) -> str:
        return ", ".join(sorted({str(s.get(key, "unknown")) for s in summaries}))

    networks = {}
    for name, g in groups.items():
        networks.setdefault(_network(g[0].hyper["hidden"]), []).append(name)
    data_cfg = config.get("data") or {}
    versions = dict(versions or package_versions())
    return {
        "title": (config.get("report") or {}).get("title") or DEFAULT_TITLE,
        "package_version": __version__,
        "generated": generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "epochs": epochs,
        "epochs_text": epochs_text,
        "paper_epochs": PAPER_EPOCHS,
        "full_recipe": full,
        "short_run": epochs < PAPER_EPOCHS,
        "subset": sorted(s for s in train_sizes if s < PAPER_TRAIN_SIZE),
        "tolerance": TOLERANCE_ERRORS,
        "tolerance_pct": f"{TOLERANCE_ERRORS / 100:.2f}",
        "abstract": _abstract(final, groups, epochs_text, train_sizes, full),
        "setup": {
            "train_size": ", ".join(f"{s:,}" for s in sorted(train_sizes)),
            "train_limit": (
                "none" if data_cfg.get("train_limit") is None else str(data_cfg["train_limit"])
            ),
            "test_size": ", ".join(
                sorted({f"{int(s.get('test_size') or 0):,}" for s in summaries})
            ),
            "networks": [{"net": net, "variants": _names(v)} for net, v in networks.items()],
            "activations": distinct_hyper(groups, "activation"),
            "device": distinct("device"),
            "torch": distinct("torch_version"),
            "tf32": distinct("tf32"),
            "denormals": distinct("denormals_flushed"),
            "cuda_graphs": distinct("cuda_graphs"),
            "threads": distinct("threads"),
            "package": distinct("package_version"),
            "seeds": ", ".join(str(s) for s in sorted({r.seed for r in runs})),
            "n_runs": n_runs,
        },
        "methods": methods_table(groups),
        "main_figure": figs[0] if figs and figs[0]["key"] == "figure1" else None,
        "other_figures": [f for f in figs if f["key"] != "figure1"],
        "final": {
            "columns": columns,
            "rows": display,
            "made_by": made_by.get(
                "final_errors", f"the summary.json and metrics.csv of {n_runs} runs"
            ),
        },
        "paper_levels": [{"errors": k, "text": v} for k, v in PAPER_LEVELS.items()],
        "questions": questions,
        "questions_made_by": made_by.get("questions", f"the summary.json of {n_runs} runs"),
        "deviations": deviations(groups, epochs, train_sizes, epochs_text),
        "study": _study(study_csv, study_caption),
        "provenance": {
            "git_commit": git_commit,
            "git_dirty": git_dirty,
            # Round-tripped through JSON so that paths or other objects in the config hash as text.
            "config_hash": fingerprint(json.loads(json.dumps(config, default=str))),
            "versions": sorted(versions.items()),
            "device": distinct("device"),
            "command": command,
            "benchmarks": _benchmarks(benchmarks),
            "wall_total": f"{sum(float(s.get('wall_seconds') or 0) for s in summaries) / 3600:.2f} h",
        },
    }


def distinct_hyper(groups: Mapping[str, list[Run]], key: str) -> str:
    return ", ".join(sorted({_fmt(g[0].hyper.get(key)) for g in groups.values()}))


def render_html(context: Mapping[str, Any]) -> str:
    return _environment().get_template("report.html.j2").render(**context)


def write_report(
    out_html: str | Path,
    run_dirs: Iterable[str | Path],
    config: Mapping[str, Any] | None,
    *,
    final_csv: str | Path | None = None,
    **kwargs: Any,
) -> Path:
    """Read the runs (and the aggregated table, when given) and write the page to ``out_html``.

    Keyword arguments are those of ``build_context``: ``figures`` (name -> PNG/SVG path; names
    ``figure1``, ``loss``, ``schedules``, ``max_norm`` get their captions), ``benchmarks``,
    ``command``, ``git_commit``, ``git_dirty``, ``versions``, ``made_by``, ``study_csv``,
    ``study_caption``, ``generated``.
    """
    runs = load_runs(run_dirs)
    final = read_final_errors(final_csv) if final_csv else None
    page = render_html(build_context(runs, config, final=final, **kwargs))
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("%d runs -> %s (%.0f kB)", len(runs), out, out.stat().st_size / 1000)
    return out


__all__ = [
    "build_context",
    "deviations",
    "git_state",
    "methods_table",
    "package_versions",
    "render_html",
    "write_report",
]
