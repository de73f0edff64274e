"""The recipe study (dropout_repro.study, config/study.yaml) and the switches it compares.

The table builder is checked on generated run directories whose numbers are worked out by hand; the
switches the study relies on (the paper's dropout convention, the loss reduction, input scaling,
the first step of torch.optim.SGD) are pinned on small networks with exact arithmetic where it can
be had.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dropout_repro.data import load_mnist
from dropout_repro.model import MLP, MaskStream, dropout, keep_probability
from dropout_repro.optim import SGDHinton, build_optimizer
from dropout_repro.study import (
    DIAGNOSTICS,
    FAILED_ERRORS,
    StudyError,
    TABLE_COLUMNS,
    describe_change,
    diagnose,
    load_study,
    reading_names,
    reading_variant,
    run_dir,
    study_markdown,
    study_table,
    train_reading,
    write_study_table,
)
from dropout_repro.train import COLUMNS
from dropout_repro.variant import resolve

REPO = Path(__file__).resolve().parents[1]


# ---- the switches the study compares -----------------------------------------------------------


def test_paper_dropout_is_unscaled_while_training_and_scaled_by_the_keep_probability_at_test():
    x = torch.full((4, 1000), 3.0)
    keep = keep_probability(0.5)
    assert keep == 0.5
    masks = MaskStream(7)
    trained = dropout(x, 0.5, "paper", True, masks)
    assert set(trained.unique().tolist()) == {0.0, 3.0}  # kept units pass on unscaled
    assert torch.equal(dropout(x, 0.5, "paper", False, None), x * 0.5)
    # Inverted dropout is the other way round: scaled by 1/keep while training, untouched at test.
    trained = dropout(x, 0.5, "inverted", True, MaskStream(7))
    assert set(trained.unique().tolist()) == {0.0, 6.0}
    assert torch.equal(dropout(x, 0.5, "inverted", False, None), x)


def test_the_paper_mean_network_scales_each_dropped_layer_by_exactly_its_keep_probability():
    torch.manual_seed(0)
    model = MLP([5, 4], "logistic", input_dropout=0.2, hidden_dropout=0.5, dropout_style="paper")
    model.eval()
    x = torch.rand(3, 784)
    keep_in, keep_hidden = keep_probability(0.2), keep_probability(0.5)
    assert keep_in == 52429 / 65536  # 0.8 on the masks' grid of 2^-16
    l1, l2, out = model.layers
    h = torch.sigmoid(l1(x * keep_in)) * keep_hidden
    h = torch.sigmoid(l2(h)) * keep_hidden
    assert torch.equal(model(x), out(h))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("activation", ["relu", "logistic"])
@pytest.mark.parametrize("style", ["paper", "inverted"])
def test_sum_reduction_multiplies_every_gradient_by_exactly_the_batch_size(activation, style):
    # A batch of 16, a power of two: dividing by it (the mean) and multiplying by it are exact in
    # floating point, so the two reductions' gradients must agree to the last bit.
    torch.manual_seed(1)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    grads, losses = {}, {}
    for reduction in ("mean", "sum"):
        model = MLP(
            [32, 16], activation, 0.2, 0.5, style, generator=torch.Generator().manual_seed(3)
        )
        model.masks = MaskStream(11)  # the same masks for both
        loss, _ = model.train_step(x, y, reduction)
        grads[reduction], losses[reduction] = _grads(model), loss
    for g_mean, g_sum in zip(grads["mean"], grads["sum"]):
        assert torch.equal(g_sum, g_mean * 16)
    assert torch.allclose(losses["sum"], losses["mean"] * 16, rtol=1e-6)


def test_input_mean_0_and_std_1_leave_pixels_in_0_1(mnist_like_root):
    raw, _ = load_mnist(str(mnist_like_root), "cpu", 0.0, 1.0)
    std, _ = load_mnist(str(mnist_like_root), "cpu", 0.1307, 0.3081)
    assert raw.images.min() >= 0.0 and raw.images.max() <= 1.0
    assert torch.allclose(std.images, (raw.images - 0.1307) / 0.3081, atol=1e-6)


def test_torch_sgd_first_step_is_the_raw_gradient_twice_sgd_hinton_at_momentum_one_half():
    # The study's "torch_sgd" reading differs from the paper's update mainly here.
    g = torch.tensor([[0.5, -1.0]])
    w_h = torch.nn.Parameter(torch.zeros(1, 2))
    opt = SGDHinton([w_h], lr=2.0, momentum=0.5)
    w_h.grad = g.clone()
    opt.step()
    variant = resolve(
        {"optimizer": "torch_sgd", "lr0": 2.0, "momentum_initial": 0.5, "max_norm": None}
    )
    w_t, out, b = (torch.nn.Parameter(torch.zeros(s)) for s in ((1, 2), (1, 1), (1,)))
    opt_t = build_optimizer(variant, [w_t], [out, b], out)
    w_t.grad = g.clone()
    opt_t.step()
    assert torch.equal(w_h.detach(), -(1 - 0.5) * 2.0 * g)  # [-0.5, 1]
    assert torch.equal(w_t.detach(), -2.0 * g)  # [-1, 2]


# ---- the study file ----------------------------------------------------------------------------


def _study(**extra):
    study = {
        "epochs": 2,
        "seeds": [1, 2],
        "train_limit": 100,
        "base": {"hidden": [8], "lr0": 10.0},
        "readings": [
            {"name": "base", "overrides": {}},
            {"name": "logistic", "overrides": {"activation": "logistic", "dropout_style": "paper"}},
            {"name": "slow", "from": "logistic", "overrides": {"lr0": 0.5}},
        ],
    }
    study.update(extra)
    return study


def test_readings_start_from_the_base_or_an_earlier_reading():
    study = load_study(_study())
    assert reading_names(study) == ["base", "logistic", "slow"]
    assert reading_variant(study, "slow") == {
        "hidden": [8],
        "lr0": 0.5,
        "activation": "logistic",
        "dropout_style": "paper",
    }
    assert describe_change(study, "base") == "none (the base)"
    assert describe_change(study, "logistic") == "activation=logistic, dropout_style=paper"
    assert describe_change(study, "slow") == "logistic + lr0=0.5"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rounds": 3}, "unknown key.*'rounds'"),
        ({"epochs": 0}, "epochs = 0"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"train_limit": 0}, "train_limit = 0"),
        ({"device": "tpu"}, "device = 'tpu'"),
        ({"base": {"hiddn": [8]}}, "base.*unknown variant key.*'hiddn'"),
        ({"readings": []}, "readings"),
        ({"readings": [{"name": "a b"}]}, "name = 'a b'"),
        ({"readings": [{"name": "a"}, {"name": "a"}]}, "used twice"),
        ({"readings": [{"name": "a", "from": "b"}, {"name": "b"}]}, "from = 'b'.*earlier"),
        ({"readings": [{"name": "a", "overrides": {"lr0": -1}}]}, r"\(a\).*'lr0' = -1"),
        ({"readings": [{"name": "a", "why": "x"}]}, "unknown key.*'why'"),
    ],
)
def test_a_bad_study_is_refused_naming_the_key_and_value(change, match):
    with pytest.raises(StudyError, match=match):
        load_study(_study(**change))


def test_the_shipped_study_file_is_valid_and_starts_from_the_reported_reading():
    study = load_study(REPO / "config" / "study.yaml")
    assert describe_change(study, reading_names(study)[0]) == "none (the base)"
    base = resolve(study["base"])
    assert (
        base["lr0"] == 10.0 and base["activation"] == "relu" and base["dropout_style"] == "inverted"
    )
    for name in reading_names(study):
        resolve(reading_variant(study, name))


@pytest.mark.parametrize("name", ["paper.yaml", "blog.yaml"])
def test_every_variant_of_the_paper_and_blog_configs_resolves(name):
    config = yaml.safe_load((REPO / "config" / name).read_text())
    for variant in config["variants"].values():
        merged = {**config["defaults"], **variant}
        merged.pop("paper_errors", None)
        resolve(merged)


def test_the_paper_config_trains_epsilon_0_10_in_the_reading_the_study_settled():
    # Logistic units, the paper's dropout masks and the output units bounded too: the one
    # combination the study found to train at epsilon_0 = 10 (config/paper.yaml says why).
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    d = config["defaults"]
    assert (d["activation"], d["dropout_style"], d["max_norm_output"]) == (
        "logistic",
        "paper",
        True,
    )
    assert (d["lr0"], d["lr_decay"], d["loss_reduction"]) == (10.0, 0.998, "mean")
    assert d["max_norm"] == pytest.approx(math.sqrt(15))
    assert config["epochs"] == 3000 and config["seeds"] == [1, 2, 3]
    # Without a bound, or without dropout, the paper's rate failed: those variants run slower.
    for name in ("no_dropout", "no_max_norm", "weight_decay"):
        assert config["variants"][name]["lr0"] < 10.0


# ---- diagnostics -------------------------------------------------------------------------------


def _tiny(activation, hidden_rows, hidden_bias, out_rows, style="inverted", hidden_dropout=0.0):
    model = MLP([len(hidden_rows)], activation, hidden_dropout=hidden_dropout, dropout_style=style)
    with torch.no_grad():
        w1 = torch.zeros(len(hidden_rows), 784)
        w1[:, :2] = torch.tensor(hidden_rows)
        model.layers[0].weight.copy_(w1)
        model.layers[0].bias.copy_(torch.tensor(hidden_bias))
        out = torch.zeros(10, len(hidden_rows))
        out[: len(out_rows)] = torch.tensor(out_rows)
        model.layers[1].weight.copy_(out)
        model.layers[1].bias.zero_()
    return model


def _inputs(pairs):
    x = torch.zeros(len(pairs), 784)
    x[:, :2] = torch.tensor(pairs)
    return x


def test_diagnose_counts_a_relu_that_is_never_active_as_dead():
    # Unit 0 computes x0 - x1, unit 1 computes -x0 - x1 - 1 (never positive for x >= 0),
    # unit 2 computes x1. Output class 0 reads unit 0, class 1 reads unit 2 (weights 3 and 4).
    model = _tiny(
        "relu",
        [[1.0, -1.0], [-1.0, -1.0], [0.0, 1.0]],
        [0.0, -1.0, 0.0],
        [[3.0, 0.0, 0.0], [0.0, 0.0, 4.0]],
    )
    x = _inputs([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 5])
    d = diagnose(model, x, labels)
    # hidden: [2,0,0], [0,0,1], [0,0,1], [3,0,0] -> logits class0/class1: (6,0), (0,4), (0,4), (9,0)
    # predictions 0, 1, 1, 0 -> one error (the last); two images in each of two classes.
    assert d["test_errors"] == 1
    assert d["one_class_pct"] == 50.0
    assert d["dead_units_pct"] == pytest.approx(100.0 / 3)
    assert d["dead_units_pct_by_layer"] == [pytest.approx(100.0 / 3)]
    assert d["max_norm_hidden"] == pytest.approx(math.sqrt(2.0))
    assert d["max_norm_output"] == pytest.approx(4.0)
    # logits: 36 + 16 + 16 + 81 = 149 squared, over 4 images x 10 classes
    assert d["logit_rms"] == pytest.approx(math.sqrt(149 / 40))
    assert model.training  # left as it was found


def test_diagnose_counts_a_saturated_logistic_unit_as_dead_and_uses_the_mean_network():
    # Unit 0's input is 20 on every image (slope ~2e-9): saturated. Unit 1's is x0, slope 1/4 at 0.
    model = _tiny(
        "logistic",
        [[0.0, 0.0], [1.0, 0.0]],
        [20.0, 0.0],
        [[2.0, 0.0]],
        style="paper",
        hidden_dropout=0.5,
    )
    x = _inputs([[0.0, 0.0], [1.0, 0.0]])
    d = diagnose(model, x, torch.tensor([0, 0]))
    assert d["dead_units_pct"] == 50.0
    # The mean network halves the hidden outputs: logit 0 = 2 * sigmoid(20) * 0.5, others 0.
    expected = 2.0 * torch.sigmoid(torch.tensor(20.0)).item() * 0.5
    assert d["logit_rms"] == pytest.approx(math.sqrt(2 * expected**2 / 20))
    assert d["test_errors"] == 0 and d["one_class_pct"] == 100.0


# ---- the table ---------------------------------------------------------------------------------


def _write_run(
    root, study, reading, seed, test_errors, *, diverged=False, diag=None, variant=None, epochs=None
):
    d = run_dir(root, reading, seed)
    d.mkdir(parents=True)
    epochs = epochs or study["epochs"]
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for e in range(1, epochs + 1):
            last = e == epochs
            bad = diverged and last
            w.writerow(
                {
                    "epoch": e,
                    "lr": 1.0,
                    "momentum": 0.5,
                    "train_loss": "nan" if bad else 0.5,
                    "train_errors": 10,
                    "test_loss": "nan" if bad else 0.4,
                    "test_errors": test_errors if last else 9000,
                    "test_error_pct": (test_errors if last else 9000) / 100,
                    "max_row_norm": 3.0 + seed if last else 1.0,
                    "seconds": 1.0,
                }
            )
    summary = {
        "seed": seed,
        "epochs_requested": study["epochs"],
        "epochs_completed": epochs,
        "diverged": diverged,
        "train_size": 100,
        "test_size": 10000,
        "variant": resolve(
            variant if variant is not None else reading_variant(load_study(study), reading)
        ),
    }
    (d / "summary.json").write_text(json.dumps(summary))
    blank = {k: None for k in ("one_class_pct", "dead_units_pct", "max_norm_output", "logit_rms")}
    (d / DIAGNOSTICS).write_text(json.dumps({"reading": reading, "seed": seed, **(diag or blank)}))


def _diag(dead, one, out_norm, rms):
    return {
        "dead_units_pct": dead,
        "one_class_pct": one,
        "max_norm_output": out_norm,
        "logit_rms": rms,
    }


@pytest.fixture
def study_runs(tmp_path):
    study = _study(
        readings=[
            {"name": "base", "overrides": {}},
            {"name": "logistic", "overrides": {"activation": "logistic", "dropout_style": "paper"}},
            {"name": "slow", "from": "logistic", "overrides": {"lr0": 0.5}},
        ]
    )
    root = tmp_path / "runs"
    # base: one run at chance, one diverged.
    _write_run(root, study, "base", 1, 9026, diag=_diag(90.0, 100.0, 50.0, 0.25))
    _write_run(root, study, "base", 2, 9020, diverged=True)
    # logistic: 700 and 900 errors, nothing dead.
    _write_run(root, study, "logistic", 1, 700, diag=_diag(0.0, 11.0, 3.0, 2.0))
    _write_run(root, study, "logistic", 2, 900, diag=_diag(10.0, 13.0, 4.0, 3.0))
    # slow: 8000 exactly (failed: at the threshold) and 2000.
    _write_run(root, study, "slow", 1, FAILED_ERRORS, diag=_diag(20.0, 60.0, 1.0, 1.0))
    _write_run(root, study, "slow", 2, 2000, diag=_diag(0.0, 20.0, 2.0, 1.5))
    return study, root


def test_study_table_summarises_each_reading_over_its_seeds(study_runs):
    study, root = study_runs
    table = study_table(study, root)
    assert list(table.columns) == list(TABLE_COLUMNS)
    rows = {r["reading"]: r for r in table.to_dict("records")}
    assert list(rows) == ["base", "logistic", "slow"]

    base = rows["base"]
    assert (base["failed"], base["diverged"]) == (2, 1)
    # The diverged seed is left out of the errors and the diagnostics.
    assert (base["errors_mean"], base["errors_min"], base["errors_max"]) == (9026.0, 9026, 9026)
    assert (base["dead_units_pct"], base["one_class_pct"]) == (90.0, 100.0)
    assert base["max_norm_hidden"] == 4.0  # seed 1's last max_row_norm: 3 + 1
    assert (base["max_norm_output"], base["logit_rms"]) == (50.0, 0.25)
    assert base["changed"] == "none (the base)"
    assert (base["seeds"], base["epochs"], base["train_images"]) == (2, 2, 100)

    log = rows["logistic"]
    assert (log["errors_mean"], log["errors_min"], log["errors_max"]) == (800.0, 700, 900)
    assert (log["failed"], log["diverged"]) == (0, 0)
    assert (log["dead_units_pct"], log["one_class_pct"]) == (5.0, 12.0)
    assert log["max_norm_hidden"] == 4.5  # (4 + 5) / 2
    assert (log["max_norm_output"], log["logit_rms"]) == (3.5, 2.5)

    slow = rows["slow"]
    assert (slow["errors_mean"], slow["failed"]) == (5000.0, 1)
    assert slow["changed"] == "logistic + lr0=0.5"


def test_study_table_files_csv_and_markdown(study_runs, tmp_path):
    study, root = study_runs
    table = study_table(study, root)
    write_study_table(table, tmp_path / "t" / "study.csv", tmp_path / "t" / "study.md", study)
    with open(tmp_path / "t" / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["reading"] for r in rows] == ["base", "logistic", "slow"]
    assert rows[1]["errors_mean"] == "800.0" and rows[1]["errors_min"] == "700"
    md = (tmp_path / "t" / "study.md").read_text()
    assert "after 2 epochs on 100 training images, seeds 1, 2" in md
    assert (
        "| logistic | activation=logistic, dropout_style=paper | 2 | 800.0 (700–900) | 0 | 0 |"
        in md
    )
    assert "| base | none (the base) | 2 | 9,026.0 (9,026–9,026) | 2 | 1 |" in md


def test_a_reading_whose_seeds_all_diverged_has_no_errors(tmp_path):
    study = _study(readings=[{"name": "base", "overrides": {}}])
    for seed in (1, 2):
        _write_run(tmp_path, study, "base", seed, 9000, diverged=True)
    row = study_table(study, tmp_path).iloc[0]
    assert math.isnan(row["errors_mean"]) and (row["failed"], row["diverged"]) == (2, 2)
    assert "| base | none (the base) | 2 | – | 2 | 2 |" in study_markdown(
        study_table(study, tmp_path), study
    )


def test_a_run_that_stopped_early_counts_as_diverged(tmp_path):
    study = _study(readings=[{"name": "base", "overrides": {}}])
    _write_run(tmp_path, study, "base", 1, 500, epochs=1)
    _write_run(tmp_path, study, "base", 2, 600)
    row = study_table(study, tmp_path).iloc[0]
    assert (row["diverged"], row["errors_mean"]) == (1, 600.0)


def test_runs_of_another_variant_or_missing_files_are_refused(tmp_path):
    study = _study(readings=[{"name": "base", "overrides": {}}])
    _write_run(tmp_path, study, "base", 1, 500, variant={"hidden": [8], "lr0": 1.0})
    _write_run(tmp_path, study, "base", 2, 500)
    with pytest.raises(StudyError, match="another variant"):
        study_table(study, tmp_path)
    shutil.rmtree(run_dir(tmp_path, "base", 1))
    with pytest.raises(StudyError, match="lacks metrics.csv, summary.json, diagnostics.json"):
        study_table(study, tmp_path)


# ---- a real (tiny) run -------------------------------------------------------------------------


def test_train_reading_writes_diagnostics_of_the_last_network_and_drops_the_checkpoint(
    mnist_like_root, tmp_path
):
    variant = {
        "hidden": [16],
        "activation": "logistic",
        "dropout_style": "paper",
        "hidden_dropout": 0.5,
        "lr0": 1.0,
        "max_norm_output": True,
    }
    out = tmp_path / "run"
    diag = train_reading(
        variant,
        seed=1,
        epochs=2,
        out_dir=out,
        data_root=mnist_like_root,
        train_limit=300,
        reading="r",
    )
    assert not (out / "checkpoint.pt").exists()
    saved = json.loads((out / DIAGNOSTICS).read_text())
    assert saved == json.loads(json.dumps(diag))
    with open(out / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert saved["epoch"] == 2 and saved["reading"] == "r" and saved["seed"] == 1
    # The diagnostics look at the same network the trainer evaluated last.
    assert saved["test_errors"] == int(last["test_errors"])
    assert saved["max_norm_hidden"] == pytest.approx(float(last["max_row_norm"]))
    assert saved["max_norm_output"] <= math.sqrt(15) * (1 + 1e-6)


# ---- the workflow ------------------------------------------------------------------------------

SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which(
    "snakemake"
)


@pytest.mark.slow
@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")
def test_study_rules_train_every_reading_and_build_the_table(mnist_like_root, tmp_path):
    study = {
        "epochs": 1,
        "seeds": [1, 2],
        "train_limit": 200,
        "base": {"hidden": [8], "lr0": 0.5},
        "readings": [
            {"name": "relu", "overrides": {}},
            {"name": "logistic", "overrides": {"activation": "logistic"}},
        ],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"variants": {"x": {}}}))
    shutil.copytree(mnist_like_root / "MNIST", tmp_path / "resources" / "mnist" / "MNIST")
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n\n\n'
        f'include: "{REPO}/workflow/rules/common.smk"\n'
        f'include: "{REPO}/workflow/rules/data.smk"\n'
        f'include: "{REPO}/workflow/rules/study.smk"\n'
    )
    env = {**os.environ, "DROPOUT_REPRO_STUDY": str(tmp_path / "study.yaml")}
    run = [SNAKEMAKE, "--cores", "1", "--directory", str(tmp_path), "-s", "Snakefile", "study"]
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(tmp_path / "results" / "tables" / "recipe_study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["reading"] for r in rows] == ["relu", "logistic"]
    assert [r["changed"] for r in rows] == ["none (the base)", "activation=logistic"]
    for reading in ("relu", "logistic"):
        for seed in (1, 2):
            assert (tmp_path / "logs" / "study" / reading / f"seed{seed}.log").exists()
            assert (
                tmp_path / "results" / "benchmarks" / "study" / reading / f"seed{seed}.tsv"
            ).exists()
    assert (tmp_path / "results" / "tables" / "recipe_study.md").read_text().count("\n| ") == 3
