"""The real workflow, end to end, on real MNIST with the tiny test config; and its config checks."""

from __future__ import annotations

import csv
import os
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from dropout_repro.train import COLUMNS
from dropout_repro.variant import DEFAULTS, resolve
from workflow_helpers import ROOT, copy_workflow, real_mnist_sources, snakemake, write_config

TRAIN_LIMIT = 1000


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny config (2 variants x 2 seeds x 1 epoch on 1,000 images) run to the end."""
    wd = copy_workflow(tmp_path_factory.mktemp("workflow"))
    write_config(wd / "tiny.yaml", {"data": {"sources": real_mnist_sources()}})
    proc = snakemake(wd, "--cores", "2", "--configfile", "config/test.yaml", "tiny.yaml")
    return wd, proc


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_run_has_its_metrics_and_summary(finished_run):
    wd, _ = finished_run
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    finals = {}
    for variant, overrides in config["variants"].items():
        for seed in config["seeds"]:
            run = wd / f"results/runs/{variant}/seed{seed}"
            rows = read_rows(run / "metrics.csv")
            assert list(rows[0]) == COLUMNS
            assert [int(r["epoch"]) for r in rows] == list(range(1, config["epochs"] + 1))
            for r in rows:
                errors = int(r["test_errors"])
                assert 0 <= errors <= 10_000
                assert float(r["test_error_pct"]) == pytest.approx(errors / 100)
                assert 0 <= int(r["train_errors"]) <= TRAIN_LIMIT
                assert math.isfinite(float(r["train_loss"]))
                assert float(r["lr"]) == pytest.approx(config["defaults"]["lr0"])
            summary = json.loads((run / "summary.json").read_text())
            assert summary["variant_name"] == variant
            assert summary["seed"] == seed
            assert summary["train_size"] == TRAIN_LIMIT and summary["test_size"] == 10_000
            assert summary["final_test_errors"] == int(rows[-1]["test_errors"])
            assert summary["diverged"] is False
            # The job trained exactly the hyperparameters the config resolves to.
            expected = resolve({**config["defaults"], **(overrides or {})})
            assert summary["variant"] == expected
            # One epoch on 1,000 real images already beats chance (9,000 errors) by far.
            assert summary["final_test_errors"] < 7000
            assert (wd / f"results/benchmarks/train/{variant}/seed{seed}.tsv").exists()
            log = (wd / f"logs/train/{variant}/seed{seed}.log").read_text()
            assert re.search(r"epoch\s+1/1\s+test errors\s+\d+", log)
            finals[(variant, seed)] = summary["final_test_errors"]
    # Seeds give different runs.
    assert finals[("no_dropout", 1)] != finals[("no_dropout", 2)] or (
        read_rows(wd / "results/runs/no_dropout/seed1/metrics.csv")[0]["train_loss"]
        != read_rows(wd / "results/runs/no_dropout/seed2/metrics.csv")[0]["train_loss"]
    )
    raw = wd / "resources/mnist/MNIST/raw"
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte"]
    )


@pytest.mark.slow
def test_changing_one_variant_reruns_exactly_its_jobs(finished_run):
    wd, _ = finished_run
    proc = snakemake(wd, "-n", "--configfile", "config/test.yaml", "tiny.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    changed = yaml.safe_load((wd / "config/test.yaml").read_text())
    changed["variants"]["dropout_input"]["hidden_dropout"] = 0.4
    write_config(wd / "changed.yaml", changed)
    proc = snakemake(wd, "-n", "--configfile", "changed.yaml", "tiny.yaml")
    out = proc.stdout + proc.stderr
    jobs = set(re.findall(r"wildcards: variant=(\S+), seed=(\d+)", out))
    assert jobs == {("dropout_input", "1"), ("dropout_input", "2")}


def dry_run_with(tmp_path, config: dict):
    wd = copy_workflow(tmp_path / "wf")
    write_config(wd / "bad.yaml", config)
    return snakemake(wd, "-n", "--configfile", "bad.yaml", check=False)


def base_config() -> dict:
    return yaml.safe_load((ROOT / "config/test.yaml").read_text())


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["defaults"].update(hidden_dropot=0.5), "hidden_dropot"),
        (lambda c: c["variants"]["dropout_input"].update(hidden_dropout=1.0), "hidden_dropout"),
        (lambda c: c["defaults"].update(lr0=0), "lr0"),
        (lambda c: c["defaults"].update(momentum_final=1.0), "momentum_final"),
        (lambda c: c["defaults"].update(optimizer="sgd"), "optimizer"),
        (lambda c: c["defaults"].update(dropout_style="scaled"), "dropout_style"),
        (lambda c: c.update(epochs=0), "epochs"),
        (lambda c: c.update(device="tpu"), "device"),
        (lambda c: c.update(lerning_rate=1), "lerning_rate"),
        (lambda c: c["variants"].update({"bad name!": {}}), "bad name!"),
    ],
)
def test_a_bad_config_fails_the_dry_run_and_names_the_key(tmp_path, edit, expected):
    config = base_config()
    edit(config)
    proc = dry_run_with(tmp_path, config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert expected in out, out[-3000:]


def test_out_of_range_message_states_the_valid_range(tmp_path):
    config = base_config()
    config["variants"]["dropout_input"]["hidden_dropout"] = 1.5
    proc = dry_run_with(tmp_path, config)
    out = proc.stdout + proc.stderr
    assert "variants.dropout_input.hidden_dropout = 1.5 is not valid" in out, out[-3000:]
    assert "a number in [0, 1)" in out, out[-3000:]


def test_schema_variant_keys_and_defaults_match_the_package():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    keys = set(schema["$defs"]["variant"]["properties"]) - {"paper_errors"}
    assert keys == set(DEFAULTS)


def test_shipped_configs_validate(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    for cfg in sorted((wd / "config").glob("*.yaml")):
        if cfg.name == "study.yaml":  # not a workflow config
            continue
        proc = snakemake(wd, "-n", "--configfile", str(cfg.relative_to(wd)), check=False)
        assert proc.returncode == 0, f"{cfg.name}:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_run_ends_in_tables_figure_and_a_self_contained_report(finished_run):
    import pandas as pd

    wd, _ = finished_run
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    table = pd.read_csv(wd / "results/tables/final_errors.csv")
    assert set(table["variant"]) == set(config["variants"])
    for variant in config["variants"]:
        finals = [
            json.loads((wd / f"results/runs/{variant}/seed{s}/summary.json").read_text())[
                "final_test_errors"
            ]
            for s in config["seeds"]
        ]
        row = table[table["variant"] == variant].iloc[0]
        assert row["final_errors_mean"] == pytest.approx(sum(finals) / len(finals))
    for name in ("figure1.svg", "figure1.png"):
        assert (wd / "results/figures" / name).stat().st_size > 1000
    html = (wd / "results/report/report.html").read_text()
    for variant in config["variants"]:
        assert variant in html
    # Self-contained: no stylesheet, script or image fetched from elsewhere.
    assert not re.search(r"""(src|href)=["']https?://""", html)
    assert "data:image/png;base64," in html or "<svg" in html
    # A one-epoch run says plainly that it is no reproduction.
    assert "3000" in html and "1 epoch" in html


@pytest.mark.slow
def test_snakemake_report_builds_a_zip(finished_run):
    import zipfile

    wd, _ = finished_run
    snakemake(wd, "--configfile", "config/test.yaml", "tiny.yaml", "--report", "report.zip")
    with zipfile.ZipFile(wd / "report.zip") as z:
        names = z.namelist()
    assert any(n.endswith("figure1.svg") for n in names)
    assert any(n.endswith("final_errors.csv") for n in names)


@pytest.mark.slow
def test_grouped_jobs_give_the_same_numbers_as_one_job_per_run(finished_run, tmp_path):
    wd, _ = finished_run
    grouped = copy_workflow(tmp_path / "grouped")
    write_config(
        grouped / "tiny.yaml",
        {"data": {"sources": real_mnist_sources()}, "group_runs": True},
    )
    proc = snakemake(grouped, "--cores", "2", "--configfile", "config/test.yaml", "tiny.yaml")
    out = proc.stdout + proc.stderr
    assert "train_group1" in out and "rule train:" not in out
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    for variant in config["variants"]:
        for seed in config["seeds"]:
            run = f"results/runs/{variant}/seed{seed}/metrics.csv"
            alone, together = read_rows(wd / run), read_rows(grouped / run)
            assert len(alone) == len(together) == config["epochs"]
            for a, b in zip(alone, together):
                a.pop("seconds"), b.pop("seconds")
                assert a == b, (variant, seed)
    assert (grouped / "results/report/report.html").exists()


def test_the_report_reads_the_columns_the_trainer_writes():
    # The report side keeps its own copy (it reads files and never imports torch); they agree.
    from dropout_repro.report.aggregate import METRICS_COLUMNS

    assert tuple(COLUMNS) == tuple(METRICS_COLUMNS)


@pytest.mark.slow
def test_the_report_shows_the_study_table_made_by_the_study_rules(finished_run, tmp_path):
    wd, _ = finished_run
    study = {
        "epochs": 1,
        "seeds": [1],
        "train_limit": 300,
        "base": {"hidden": [16], "lr0": 0.5},
        "readings": [
            {"name": "relu_base", "overrides": {}},
            {"name": "logistic_units", "overrides": {"activation": "logistic"}},
        ],
    }
    write_config(tmp_path / "study.yaml", study)
    write_config(
        wd / "with_study.yaml",
        {"report": {"study_table": "results/tables/recipe_study.csv", "study_caption": "Study."}},
    )
    env = {**os.environ, "DROPOUT_REPRO_STUDY": str(tmp_path / "study.yaml")}
    proc = snakemake(
        wd, "--cores", "2", "--configfile", "config/test.yaml", "tiny.yaml", "with_study.yaml",
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert "rule study_train" in out and "rule train:" not in out  # the runs were not redone
    html = (wd / "results/report/report.html").read_text()
    assert 'id="study"' in html
    assert "relu_base" in html and "logistic_units" in html
