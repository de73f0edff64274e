"""The aggregation numbers, pinned against values worked out by hand below each test's data."""

import math

import pandas as pd
import pytest

from dropout_repro.report.aggregate import (
    MissingRunsError,
    aggregate,
    curves_table,
    final_errors_display,
    final_errors_markdown,
    final_errors_table,
    load_runs,
    paper_errors,
    read_curves,
    read_final_errors,
    reproduction_verdict,
)
from dropout_repro.report.synthetic import write_run

# Student t quantiles t_{0.975, df}, from tables: df=1 -> 12.7062047, df=2 -> 4.3026527.
T975_DF1 = 12.706204736
T975_DF2 = 4.302652730

HIDDEN = {"hidden_dropout": 0.5}
BOTH = {"hidden_dropout": 0.5, "input_dropout": 0.2}


@pytest.fixture
def runs_dir(tmp_path):
    """Three variants with test errors chosen so that every statistic is easy by hand.

    plain (no dropout), 3 seeds, errors per epoch:
        seed0 300 150 120   final 120, best 120
        seed1 310 125 130   final 130, best 125
        seed2 290 160 140   final 140, best 140
    hidden (50 % hidden dropout), seeds 0 and 1 fine, seed 2 diverges in epoch 3:
        seed0 400 200 100   final 100
        seed1 420 210 104   final 104
        seed2 400 9000 9020 diverged (NaN loss in the last row)
    single (both dropouts), one seed: 500 200 111.
    """
    root = tmp_path / "runs"
    spec = [
        ("plain", 0, [300, 150, 120], None, {}, 30.0),
        ("plain", 1, [310, 125, 130], None, {}, 60.0),
        ("plain", 2, [290, 160, 140], None, {}, 90.0),
        ("hidden", 0, [400, 200, 100], None, HIDDEN, 10.0),
        ("hidden", 1, [420, 210, 104], None, HIDDEN, 20.0),
        ("hidden", 2, [400, 9000, 9020], 3, HIDDEN, 30.0),
        ("single", 0, [500, 200, 111], None, BOTH, 12.0),
    ]
    dirs = []
    for name, seed, errors, div, overrides, wall in spec:
        d = root / name / f"seed{seed}"
        write_run(d, name, seed, errors, overrides=overrides, diverged_epoch=div, wall_seconds=wall)
        dirs.append(d)
    return dirs


CONFIG = {"variants": {"plain": {}, "hidden": HIDDEN, "single": BOTH}}


def row(table, name):
    return table.set_index("variant").loc[name]


def test_final_errors_match_hand_computation(runs_dir):
    table = final_errors_table(load_runs(runs_dir), CONFIG)
    assert list(table["variant"]) == ["plain", "hidden", "single"]
    r = row(table, "plain")
    # mean (120 + 130 + 140) / 3 = 130; deviations -10, 0, 10; s^2 = 200 / (3 - 1) = 100, s = 10.
    assert r["n_seeds"] == 3 and r["n_used"] == 3 and r["diverged"] == 0
    assert r["final_errors_mean"] == pytest.approx(130.0)
    assert r["final_errors_std"] == pytest.approx(10.0)
    assert (r["final_errors_min"], r["final_errors_max"]) == (120, 140)
    # half-width t_{0.975,2} * s / sqrt(3) = 4.3026527 * 10 / 1.7320508 = 24.841377
    assert r["ci95_half_width"] == pytest.approx(T975_DF2 * 10 / math.sqrt(3), rel=1e-7)
    assert r["ci95_half_width"] == pytest.approx(24.841377, abs=1e-5)
    assert r["ci95_low"] == pytest.approx(130 - 24.841377, abs=1e-5)
    assert r["ci95_high"] == pytest.approx(130 + 24.841377, abs=1e-5)
    # best epochs: 120, 125, 140 -> 385 / 3 = 128.333...
    assert r["best_errors_mean"] == pytest.approx(385 / 3)
    # best epochs 3, 2, 3 -> 8 / 3
    assert r["best_epoch_mean"] == pytest.approx(8 / 3)
    # 130 errors of 10,000 = 1.3 %
    assert r["final_error_pct_mean"] == pytest.approx(1.3)
    # wall times 30, 60, 90 s -> 60 s
    assert r["wall_seconds_mean"] == pytest.approx(60.0)
    assert r["paper_errors"] == 160
    assert r["epochs"] == 3


def test_diverged_run_is_counted_not_averaged(runs_dir):
    runs = load_runs(runs_dir)
    assert [r.diverged for r in runs if r.variant == "hidden"] == [False, False, True]
    r = row(final_errors_table(runs, CONFIG), "hidden")
    assert (r["n_seeds"], r["n_used"], r["diverged"]) == (3, 2, 1)
    # Only 100 and 104 enter: mean 102 (with the diverged 9020 it would be 3074.7).
    assert r["final_errors_mean"] == pytest.approx(102.0)
    # deviations -2, +2: s^2 = 8 / 1, s = 2.8284271
    assert r["final_errors_std"] == pytest.approx(math.sqrt(8))
    # t_{0.975,1} * sqrt(8) / sqrt(2) = 12.7062047 * 2 = 25.4124095
    assert r["ci95_half_width"] == pytest.approx(2 * T975_DF1, rel=1e-7)
    assert r["final_errors_max"] == 104
    # The diverged seed still cost time: (10 + 20 + 30) / 3 = 20 s.
    assert r["wall_seconds_mean"] == pytest.approx(20.0)
    assert r["paper_errors"] == 130
    shown = {d["Variant"]: d for d in final_errors_display(final_errors_table(runs, CONFIG))}
    assert shown["hidden"]["Diverged"] == "1"
    assert shown["hidden"]["Seeds"] == "2 of 3"
    assert shown["hidden"]["Test errors, mean"] == "102.0"


def test_divergence_is_seen_without_the_flag(tmp_path):
    d1 = write_run(tmp_path / "a" / "seed0", "a", 0, [300, 200, 150], diverged_epoch=3)
    summary = (d1 / "summary.json").read_text().replace('"diverged": true', '"diverged": false')
    (d1 / "summary.json").write_text(summary)
    # Stopped after 2 of 5 requested epochs, finite losses, no flag.
    d2 = write_run(tmp_path / "a" / "seed1", "a", 1, [300, 200], epochs_requested=5)
    d3 = write_run(tmp_path / "a" / "seed2", "a", 2, [300, 200, 150])
    runs = load_runs([d1, d2, d3])
    assert [r.diverged for r in runs] == [True, True, False]
    r = row(final_errors_table(runs), "a")
    assert (r["n_used"], r["diverged"], r["final_errors_mean"]) == (1, 2, 150)


def test_every_seed_diverged(tmp_path):
    d = write_run(tmp_path / "x" / "seed0", "x", 0, [300, 9000], diverged_epoch=2)
    runs = load_runs([d])
    r = row(final_errors_table(runs), "x")
    assert r["n_used"] == 0 and r["diverged"] == 1 and math.isnan(r["final_errors_mean"])
    assert final_errors_display(final_errors_table(runs))[0]["Test errors, mean"] == "all diverged"
    assert curves_table(runs).empty


def test_one_seed_has_no_spread_and_no_interval(runs_dir, tmp_path):
    table = final_errors_table(load_runs(runs_dir), CONFIG)
    r = row(table, "single")
    assert r["n_used"] == 1 and r["final_errors_mean"] == 111
    assert math.isnan(r["final_errors_std"]) and math.isnan(r["ci95_half_width"])
    assert r["paper_errors"] == 110
    shown = {d["Variant"]: d for d in final_errors_display(table)}["single"]
    assert shown["Std"] == "no spread (1 seed)" and shown["95 % CI"] == ""
    assert "no spread" in final_errors_markdown(table)
    paths = [tmp_path / "t" / n for n in ("final.csv", "final.md", "curves.csv")]
    aggregate(runs_dir, CONFIG, *paths)
    back = read_final_errors(paths[0]).set_index("variant")
    # The CSV leaves the cells blank: no made-up zero spread.
    assert math.isnan(back.loc["single", "final_errors_std"])
    assert back.loc["plain", "final_errors_std"] == pytest.approx(10.0)
    assert back.loc["hidden", "paper_errors"] == 130


def test_missing_runs_are_all_named(runs_dir, tmp_path):
    gone = [tmp_path / "runs" / "plain" / "seed7", tmp_path / "runs" / "other" / "seed0"]
    half = tmp_path / "runs" / "half" / "seed0"
    half.mkdir(parents=True)
    (half / "metrics.csv").write_text("epoch\n")
    with pytest.raises(MissingRunsError) as err:
        load_runs([*runs_dir, *gone, half])
    text = str(err.value)
    assert "3 expected run(s)" in text
    for d in gone:
        assert f"{d} (missing metrics.csv, summary.json)" in text
    assert f"{half} (missing summary.json)" in text


def test_curves_table_matches_hand_computation(runs_dir, tmp_path):
    curves = curves_table(load_runs(runs_dir), CONFIG)
    assert list(curves.columns) == ["variant", "epoch", "n", "mean", "std", "min", "max"]
    plain = curves[curves["variant"] == "plain"].set_index("epoch")
    # epoch 1: 300, 310, 290 -> mean 300, deviations 0, 10, -10 -> s = sqrt(200 / 2) = 10
    assert plain.loc[1, ["n", "mean", "std", "min", "max"]].tolist() == [3, 300, 10, 290, 310]
    # epoch 2: 150, 125, 160 -> mean 145; deviations 5, -20, 15 -> s^2 = 650 / 2 = 325
    assert plain.loc[2, "mean"] == pytest.approx(145.0)
    assert plain.loc[2, "std"] == pytest.approx(math.sqrt(325))
    assert (plain.loc[2, "min"], plain.loc[2, "max"]) == (125, 160)
    hidden = curves[curves["variant"] == "hidden"].set_index("epoch")
    # The diverged seed is out of the curve too: epoch 2 is 200, 210 -> 205, n = 2.
    assert hidden.loc[2, "n"] == 2 and hidden.loc[2, "mean"] == pytest.approx(205.0)
    single = curves[curves["variant"] == "single"].set_index("epoch")
    assert single.loc[3, "mean"] == 111 and math.isnan(single.loc[3, "std"])
    path = tmp_path / "curves.csv"
    curves.to_csv(path, index=False)
    pd.testing.assert_frame_equal(read_curves(path), curves, check_dtype=False)


def test_paper_number_by_dropout_rates_and_override():
    assert paper_errors("x", {"hidden_dropout": 0.0, "input_dropout": 0.0}) == 160
    assert paper_errors("x", {"hidden_dropout": 0.5, "input_dropout": 0.0}) == 130
    assert paper_errors("x", {"hidden_dropout": 0.5, "input_dropout": 0.2}) == 110
    assert paper_errors("x", {"hidden_dropout": 0.0, "input_dropout": 0.2}) is None
    config = {"variants": {"x": {"paper_errors": None}, "y": {"paper_errors": 155}, "z": {}}}
    assert paper_errors("x", {"hidden_dropout": 0.5}, config) is None
    assert paper_errors("y", {"hidden_dropout": 0.5}, config) == 155
    assert paper_errors("z", {"hidden_dropout": 0.5}, config) == 130
    with pytest.raises(ValueError, match=r"variants.z.paper_errors = 'lots'"):
        paper_errors("z", {}, {"variants": {"z": {"paper_errors": "lots"}}})


def test_verdict_only_for_the_full_recipe():
    near = {"paper_errors": 130, "final_errors_mean": 142.0}
    far = {"paper_errors": 130, "final_errors_mean": 146.0}
    better = {"paper_errors": 130, "final_errors_mean": 100.0}
    assert reproduction_verdict(near, full_recipe=False).startswith("no verdict")
    assert reproduction_verdict(near, full_recipe=True).startswith("reproduced")
    assert reproduction_verdict(far, full_recipe=True).startswith("not reproduced")
    assert reproduction_verdict(better, full_recipe=True).startswith("better than the paper")
    assert reproduction_verdict({"paper_errors": pd.NA}, True) == "no paper number to compare with"


def test_markdown_escapes_names(tmp_path):
    d = write_run(tmp_path / "r" / "seed0", "a|b<script>x</script>", 0, [200, 150])
    md = final_errors_markdown(final_errors_table(load_runs([d])))
    assert "<script>" not in md
    assert "a\\|b&lt;script&gt;x&lt;/script&gt;" in md


def test_seeds_of_one_variant_must_agree(tmp_path):
    a = write_run(tmp_path / "v" / "seed0", "v", 0, [200, 150])
    b = write_run(tmp_path / "v" / "seed1", "v", 1, [200, 150], overrides={"lr0": 2.0})
    with pytest.raises(ValueError, match="different hyperparameters \\(lr0\\)"):
        final_errors_table(load_runs([a, b]))
