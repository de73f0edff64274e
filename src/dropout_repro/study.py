"""The recipe study: which reading of Appendix A lets the paper's epsilon_0 = 10 train.

A study (``config/study.yaml``) is a base variant and a list of named *readings*, each a few
variant keys that override the base. Every reading is trained for a few epochs with several seeds;
after the last epoch the network is examined on the test set and what was seen is kept beside the
run's ``metrics.csv`` and ``summary.json`` as ``diagnostics.json``. ``study_table`` then reads those
files back from disk (never the trainer's objects) and makes one row per reading.

What the diagnostics measure, and why:

* ``dead_units_pct``: hidden units that pass (almost) no gradient on any test image through the
  mean network: a ReLU whose input is never positive, or a logistic unit whose slope
  sigma(1 - sigma) stays below 1/1000 (|input| above about 6.9), 1/250 of its slope at zero. A net
  that collapsed to one class within its first steps is typically made of such units.
* ``one_class_pct``: the share of test images given the most frequent prediction; 100 means a
  constant output.
* ``max_norm_hidden`` / ``max_norm_output``: the largest incoming-weight norm of a hidden unit and
  of an output unit. Appendix A bounds only hidden units, so at a large learning rate the output
  rows are free to grow.
* ``logit_rms``: the root mean square of the output layer's inputs to the softmax.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from .variant import DEFAULTS, VariantError, resolve

# A net that gives every test image the same class makes between 8,865 and 9,108 errors (the test
# counts of the other nine digits); below 8,000 it has learnt something. Runs at or above this, and
# runs whose loss stopped being finite, count as failed.
FAILED_ERRORS = 8000
# The slope below which a logistic unit counts as saturated: 1/250 of its slope at zero (1/4).
SATURATED_SLOPE = 1e-3

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
STUDY_KEYS = ("epochs", "seeds", "train_limit", "device", "threads", "mem_mb", "base", "readings")
READING_KEYS = ("name", "from", "overrides")
DIAGNOSTICS = "diagnostics.json"
CHECKPOINT = "checkpoint.pt"  # the name train.train_run gives its checkpoint

TABLE_COLUMNS = (
    "reading",
    "changed",
    "seeds",
    "epochs",
    "train_images",
    "errors_mean",
    "errors_min",
    "errors_max",
    "failed",
    "diverged",
    "dead_units_pct",
    "one_class_pct",
    "max_norm_hidden",
    "max_norm_output",
    "logit_rms",
)


class StudyError(ValueError):
    """A study file, or a run directory of a study, that is not valid."""


# ---- the study file ----------------------------------------------------------------------------


def load_study(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a study (a YAML path or an already loaded mapping) and check every key and reading.

    A reading is ``{name, overrides}`` with an optional ``from``: the name of an *earlier* reading
    whose variant it starts from instead of the base (so a reading says only what it changes, and
    no chain can loop). Returns a plain dict with ``epochs``, ``seeds``, ``train_limit``,
    ``device``, ``threads``, ``mem_mb``, ``base`` and ``readings``, a list of
    ``{"name", "from", "overrides", "variant"}`` where ``variant`` is the merged, unresolved
    variant the reading trains; every one has passed ``variant.resolve``.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "study"
    else:
        import yaml

        with open(source) as f:
            raw, where = yaml.safe_load(f), str(source)
        if not isinstance(raw, dict):
            raise StudyError(
                f"{where}: expected a mapping of study keys, found {type(raw).__name__}"
            )
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
            + ", ".join(STUDY_KEYS)
        )
    study = {
        "epochs": raw.get("epochs", 2),
        "seeds": raw.get("seeds", [1, 2, 3]),
        "train_limit": raw.get("train_limit"),
        "device": raw.get("device", "cpu"),
        "threads": raw.get("threads", 1),
        "mem_mb": raw.get("mem_mb", 2000),
        "base": raw.get("base") or {},
        "readings": raw.get("readings"),
    }
    for key in ("epochs", "threads"):
        if not _positive_int(study[key]):
            raise StudyError(
                f"{where}: {key} = {study[key]!r} is not valid: expected an integer >= 1"
            )
    if not _positive_int(study["mem_mb"]) or study["mem_mb"] < 256:
        raise StudyError(
            f"{where}: mem_mb = {study['mem_mb']!r} is not valid: expected an integer >= 256"
        )
    if study["train_limit"] is not None and not _positive_int(study["train_limit"]):
        raise StudyError(
            f"{where}: train_limit = {study['train_limit']!r} is not valid: "
            "expected an integer >= 1, or null for all 60,000 images"
        )
    seeds = study["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise StudyError(
            f"{where}: seeds = {seeds!r} is not valid: expected distinct integers >= 0"
        )
    if study["device"] not in ("auto", "cpu", "cuda"):
        raise StudyError(
            f"{where}: device = {study['device']!r} is not valid: expected auto, cpu or cuda"
        )
    if not isinstance(study["base"], dict):
        raise StudyError(
            f"{where}: base = {study['base']!r} is not valid: expected a mapping of variant keys"
        )
    try:
        resolve(study["base"])
    except VariantError as e:
        raise StudyError(f"{where}: base: {e}") from None

    readings = study["readings"]
    if not isinstance(readings, list) or not readings:
        raise StudyError(
            f"{where}: readings = {readings!r} is not valid: expected a non-empty list"
        )
    checked, variants = [], {}
    for i, reading in enumerate(readings):
        label = f"{where}: readings[{i}]"
        if not isinstance(reading, dict) or "name" not in reading:
            raise StudyError(f"{label} = {reading!r} is not valid: expected a mapping with a name")
        extra = sorted(set(reading) - set(READING_KEYS))
        if extra:
            raise StudyError(
                f"{label}: unknown key(s) {', '.join(map(repr, extra))}; "
                "valid keys: name, from, overrides"
            )
        name = reading["name"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise StudyError(
                f"{label}: name = {name!r} is not valid: expected letters, digits, _ or - only"
            )
        if name in variants:
            raise StudyError(f"{label}: name {name!r} is used twice; reading names must be unique")
        parent = reading.get("from")
        if parent is not None and parent not in variants:
            raise StudyError(
                f"{label} ({name}): from = {parent!r} is not valid: expected the name of an "
                f"earlier reading ({', '.join(variants) or 'there is none'})"
            )
        overrides = reading.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise StudyError(f"{label} ({name}): overrides = {overrides!r} is not a mapping")
        variant = {**(variants[parent] if parent else study["base"]), **overrides}
        try:
            resolve(variant)
        except VariantError as e:
            raise StudyError(f"{label} ({name}): {e}") from None
        variants[name] = variant
        checked.append(
            {"name": name, "from": parent, "overrides": dict(overrides), "variant": variant}
        )
    study["readings"] = checked
    return study


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def reading_names(study: Mapping[str, Any]) -> list[str]:
    return [r["name"] for r in study["readings"]]


def _reading(study: Mapping[str, Any], name: str) -> dict[str, Any]:
    for reading in study["readings"]:
        if reading["name"] == name:
            return reading
    raise StudyError(
        f"reading {name!r} is not in the study; its readings are: {', '.join(reading_names(study))}"
    )


def reading_variant(study: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The variant a reading trains: the base (or the reading it starts from), then its own
    overrides."""
    return dict(_reading(study, name)["variant"])


def _format_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_format_value(x) for x in v)
    return str(v)


def describe_change(study: Mapping[str, Any], name: str) -> str:
    """What a reading changes, as ``key=value`` pairs in the order of ``variant.DEFAULTS``: with
    respect to the base, or, for a reading ``from`` another, ``"<other>: key=value, ..."``.
    ``"none (the base)"`` when it trains the base itself."""
    parent = _reading(study, name)["from"]
    ref = resolve(reading_variant(study, parent) if parent else study["base"])
    mine = resolve(reading_variant(study, name))
    changed = ", ".join(f"{k}={_format_value(mine[k])}" for k in DEFAULTS if mine[k] != ref[k])
    if parent:
        return f"{parent} + {changed or 'nothing'}"
    return changed or "none (the base)"


def run_dir(runs_root: str | Path, reading: str, seed: int) -> Path:
    """Where one run of a study lives: ``{runs_root}/{reading}/seed{seed}``."""
    return Path(runs_root) / reading / f"seed{seed}"


# ---- training and diagnostics ------------------------------------------------------------------


def diagnose(model, images, labels) -> dict[str, Any]:
    """Look at a trained network through its mean network (test-time scaling) on a test set.

    Returns ``test_errors``, ``one_class_pct``, ``dead_units_pct`` (all hidden layers together),
    ``dead_units_pct_by_layer``, ``max_norm_hidden``, ``max_norm_output`` and ``logit_rms`` as
    plain Python numbers. The network is left in the mode it was found in.
    """
    import torch

    from .model import dropout

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            relu = model.activation is torch.nn.functional.relu
            style = model.dropout_style
            h = dropout(images, model.input_dropout, style, False, None)
            dead_by_layer, dead_total, units = [], 0, 0
            for layer in model.layers[:-1]:
                a = layer(h)
                if relu:
                    h = a.clamp_min(0.0)
                    dead = (a <= 0).all(dim=0)
                else:
                    h = torch.sigmoid(a)
                    dead = (h * (1.0 - h) < SATURATED_SLOPE).all(dim=0)
                n_dead = int(dead.sum().item())
                dead_by_layer.append(100.0 * n_dead / a.shape[1])
                dead_total += n_dead
                units += a.shape[1]
                h = dropout(h, model.hidden_dropout, style, False, None)
            logits = model.layers[-1](h)
            pred = logits.argmax(dim=1)
            counts = torch.bincount(pred, minlength=logits.shape[1])
            finite = bool(torch.isfinite(logits).all().item())
            rows = [
                torch.linalg.vector_norm(layer.weight, dim=1).max().item() for layer in model.layers
            ]
            return {
                "test_errors": int((pred != labels).sum().item()),
                "one_class_pct": 100.0 * int(counts.max().item()) / len(labels),
                "dead_units_pct": 100.0 * dead_total / units,
                "dead_units_pct_by_layer": dead_by_layer,
                "max_norm_hidden": max(rows[:-1]),
                "max_norm_output": rows[-1],
                "logit_rms": logits.double().pow(2).mean().sqrt().item() if finite else math.nan,
            }
    finally:
        model.train(was_training)


def diagnose_checkpoint(
    run_directory: str | Path, variant: Mapping[str, Any], images, labels
) -> dict:
    """``diagnose`` on the network a run's checkpoint holds, with the epoch it holds; a dict of
    ``None`` values (and ``epoch: None``) when the run left no checkpoint (it diverged)."""
    import torch

    from .model import MLP

    path = Path(run_directory) / CHECKPOINT
    if not path.exists():
        return {"epoch": None, **{k: None for k in _DIAG_KEYS}}
    ckpt = torch.load(path, map_location=images.device, weights_only=True)
    model = MLP.from_variant(resolve(dict(variant))).to(images.device)
    model.load_state_dict(ckpt["model"])
    return {"epoch": int(ckpt["epoch"]), **diagnose(model, images, labels)}


_DIAG_KEYS = (
    "test_errors",
    "one_class_pct",
    "dead_units_pct",
    "dead_units_pct_by_layer",
    "max_norm_hidden",
    "max_norm_output",
    "logit_rms",
)


def train_reading(
    variant: Mapping[str, Any],
    seed: int,
    epochs: int,
    out_dir: str | Path,
    data_root: str | Path,
    train_limit: int | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    reading: str = "",
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Train one run of a study with ``train.train_run``, then write its ``diagnostics.json``.

    The run checkpoints only after its last epoch, which is the network the diagnostics examine; the
    checkpoint (about 10 MB for 800-800) is then removed unless ``keep_checkpoint``, because a study
    has dozens of runs and nothing resumes them. Returns the diagnostics.
    """
    from .data import load_mnist
    from .train import pick_device, train_run

    resolved = resolve(dict(variant))
    if threads:
        import torch

        torch.set_num_threads(threads)
    dev = pick_device(device)
    data = load_mnist(
        str(data_root), dev, resolved["input_mean"], resolved["input_std"], train_limit
    )
    out = Path(out_dir)
    summary = train_run(
        resolved,
        seed=seed,
        epochs=epochs,
        out_dir=out,
        data=data,
        device=device,
        checkpoint_every=epochs,
        train_limit=train_limit,
        threads=threads,
        variant_name=reading,
        on_stale_checkpoint="restart",
    )
    test = data[1]
    diag = diagnose_checkpoint(out, resolved, test.images, test.labels)
    if diag["epoch"] is not None and diag["epoch"] != summary["epochs_completed"]:
        # A diverged run stops before it checkpoints; an older checkpoint is not its last network.
        diag = {"epoch": None, **{k: None for k in _DIAG_KEYS}}
    diag = {"reading": reading, "seed": seed, "fingerprint": summary["fingerprint"], **diag}
    (out / DIAGNOSTICS).write_text(json.dumps(diag, indent=2) + "\n")
    if not keep_checkpoint:
        (out / CHECKPOINT).unlink(missing_ok=True)
    return diag


# ---- the table ---------------------------------------------------------------------------------


def _read_run(directory: Path) -> tuple[list[dict[str, str]], dict, dict]:
    import csv

    missing = [
        n for n in ("metrics.csv", "summary.json", DIAGNOSTICS) if not (directory / n).is_file()
    ]
    if missing:
        raise StudyError(f"run {directory} lacks {', '.join(missing)}: has it been trained?")
    with open(directory / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((directory / "summary.json").read_text())
    diag = json.loads((directory / DIAGNOSTICS).read_text())
    return rows, summary, diag


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _mean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if _finite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def study_table(study: Mapping[str, Any], runs_root: str | Path):
    """One row per reading (in the study's order) from the run directories under ``runs_root``.

    ``errors_*`` are the test errors (of the test set) after the last epoch, over the seeds whose
    loss stayed finite; a run whose loss stopped being finite is counted in ``diverged`` and left
    out of them, as in the main results table. ``failed`` counts diverged runs and runs at or
    above ``FAILED_ERRORS``. The diagnostics columns are means over the seeds that have them.

    Every run must have been trained with the reading's variant, the study's seed and epochs:
    a run left over from another study file is refused rather than reported.
    """
    import pandas as pd

    study = load_study(study)
    out = []
    for name in reading_names(study):
        expected = resolve(reading_variant(study, name))
        errors, failed, diverged, norms_hidden, diags, sizes = [], 0, 0, [], [], set()
        for seed in study["seeds"]:
            d = run_dir(runs_root, name, seed)
            rows, summary, diag = _read_run(d)
            if summary.get("variant") != expected:
                raise StudyError(
                    f"run {d} was trained with another variant than reading {name!r} defines now; "
                    "train it again (snakemake reruns it when the study file changed)"
                )
            if summary.get("seed") != seed or summary.get("epochs_requested") != study["epochs"]:
                raise StudyError(
                    f"run {d} has seed {summary.get('seed')!r} and "
                    f"{summary.get('epochs_requested')!r} epochs; the study asks for seed {seed} "
                    f"and {study['epochs']} epochs"
                )
            if not rows:
                raise StudyError(f"run {d}: metrics.csv has no epochs")
            last = rows[-1]
            sizes.add(summary.get("train_size"))
            is_diverged = (
                bool(summary.get("diverged"))
                or not math.isfinite(float(last["train_loss"]))
                or not math.isfinite(float(last["test_loss"]))
                or len(rows) < study["epochs"]
            )
            if is_diverged:
                diverged += 1
                failed += 1
                continue
            n_err = int(last["test_errors"])
            errors.append(n_err)
            failed += n_err >= FAILED_ERRORS
            norms_hidden.append(float(last["max_row_norm"]))
            diags.append(diag)
        out.append(
            {
                "reading": name,
                "changed": describe_change(study, name),
                "seeds": len(study["seeds"]),
                "epochs": study["epochs"],
                "train_images": next(iter(sizes)) if len(sizes) == 1 else None,
                "errors_mean": round(sum(errors) / len(errors), 1) if errors else math.nan,
                "errors_min": min(errors) if errors else None,
                "errors_max": max(errors) if errors else None,
                "failed": failed,
                "diverged": diverged,
                "dead_units_pct": _round(_mean(g.get("dead_units_pct") for g in diags), 1),
                "one_class_pct": _round(_mean(g.get("one_class_pct") for g in diags), 1),
                "max_norm_hidden": _round(_mean(norms_hidden), 2),
                "max_norm_output": _round(_mean(g.get("max_norm_output") for g in diags), 2),
                "logit_rms": _round(_mean(g.get("logit_rms") for g in diags), 2),
            }
        )
    table = pd.DataFrame(out, columns=list(TABLE_COLUMNS))
    for col in ("errors_min", "errors_max", "train_images"):
        table[col] = table[col].astype("Int64")
    return table


def _round(x: float, digits: int) -> float:
    return round(x, digits) if math.isfinite(x) else math.nan


MARKDOWN_HEADERS = (
    ("reading", "Reading"),
    ("changed", "What changed (from the base, or from the reading named)"),
    ("seeds", "Seeds"),
    ("errors", "Test errors: mean (min–max)"),
    ("failed", "Failed"),
    ("diverged", "Diverged"),
    ("dead_units_pct", "Dead units %"),
    ("one_class_pct", "One class %"),
    ("max_norm_hidden", "Max norm, hidden"),
    ("max_norm_output", "Max norm, output"),
    ("logit_rms", "Logit RMS"),
)


def _cell(v: Any, digits: int | None = None) -> str:
    import pandas as pd

    if v is None or pd.isna(v):
        return "–"
    if digits is not None:
        return f"{float(v):,.{digits}f}"
    return str(v)


def study_markdown(table, study: Mapping[str, Any] | None = None) -> str:
    """The table as Markdown, after one paragraph that says what its numbers are."""
    study = load_study(study) if study is not None else None
    lines = [
        "| " + " | ".join(h for _, h in MARKDOWN_HEADERS) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(MARKDOWN_HEADERS) - 2)) + "|",
    ]
    for row in table.to_dict("records"):
        errors = (
            "–"
            if _cell(row["errors_min"]) == "–"
            else f"{_cell(row['errors_mean'], 1)} "
            f"({_cell(row['errors_min'], 0)}–{_cell(row['errors_max'], 0)})"
        )
        cells = {
            "reading": row["reading"],
            "changed": row["changed"],
            "seeds": _cell(row["seeds"]),
            "errors": errors,
            "failed": _cell(row["failed"]),
            "diverged": _cell(row["diverged"]),
            "dead_units_pct": _cell(row["dead_units_pct"], 1),
            "one_class_pct": _cell(row["one_class_pct"], 1),
            "max_norm_hidden": _cell(row["max_norm_hidden"], 2),
            "max_norm_output": _cell(row["max_norm_output"], 2),
            "logit_rms": _cell(row["logit_rms"], 2),
        }
        lines.append("| " + " | ".join(_md_cell(cells[k]) for k, _ in MARKDOWN_HEADERS) + " |")
    epochs = sorted(set(int(e) for e in table["epochs"])) if len(table) else []
    sizes = sorted(set(int(n) for n in table["train_images"].dropna())) if len(table) else []
    note = (
        f"Test errors (of 10,000) after {', '.join(map(str, epochs)) or '?'} epochs on "
        f"{', '.join(f'{n:,}' for n in sizes) or '?'} training images"
        + (f", seeds {', '.join(map(str, study['seeds']))}" if study else "")
        + f". Failed: at or above {FAILED_ERRORS:,} test errors (a one-class net makes "
        "8,865–9,108) or a loss that stopped being finite; diverged runs are left out of the "
        "error columns. Dead units: hidden units that pass no gradient on any test image (ReLU "
        f"never active, logistic slope below {SATURATED_SLOPE:g}). One class: share of test images "
        "given the most frequent class. Diagnostics are means over seeds."
    )
    return note + "\n\n" + "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|")


def write_study_table(table, csv_path: str | Path, md_path: str | Path, study=None) -> None:
    for p in (csv_path, md_path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False, na_rep="")
    Path(md_path).write_text(study_markdown(table, study))
