"""The command line: ``python -m dropout_repro train`` from a JSON variant or a config file, its
refusals, and ``bench``. Most calls go through ``main(argv)`` in this process; one runs the real
module entry point in a subprocess (the resume test in test_train.py runs another)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dropout_repro.__main__ import main, variant_from_config
from dropout_repro.variant import resolve

CONFIG_YAML = """\
# a tiny workflow-style config: shared defaults, overridden per variant
defaults:
  hidden: [16]
  lr0: 0.5
  max_norm: 2.0
variants:
  plain:
  dropout:
    hidden_dropout: 0.5
    lr0: 0.25
"""


def train_args(root: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "train", "--seed", "7", "--epochs", str(epochs), "--data-root", str(root),
        "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def metrics_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_with_a_config_and_a_variant_name_in_a_subprocess(mnist_like_root, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_YAML)
    out = tmp_path / "out"
    argv = train_args(mnist_like_root, out, "--config", str(config), "--variant", "dropout")
    proc = subprocess.run(
        [sys.executable, "-m", "dropout_repro", *argv, "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = last_json_line(proc.stdout)
    assert set(printed) == {"final_test_errors", "best_test_errors", "diverged"}
    summary = json.loads((out / "summary.json").read_text())
    assert printed["final_test_errors"] == summary["final_test_errors"]
    assert summary["variant_name"] == "dropout"
    # defaults overridden by the variant: hidden and max_norm from defaults, lr0 from the variant
    assert summary["variant"] == resolve({"hidden": [16], "lr0": 0.25, "max_norm": 2.0,
                                          "hidden_dropout": 0.5})  # fmt: skip
    assert summary["threads"] == 1
    assert len(metrics_rows(out)) == 2
    assert "epoch     2/2" in proc.stderr


def test_train_with_a_json_variant(mnist_like_root, tmp_path, capsys):
    out = tmp_path / "out"
    variant = {"hidden": [16], "lr0": 0.5, "input_dropout": 0.2}
    assert main(train_args(mnist_like_root, out, "--variant-json", json.dumps(variant))) == 0
    printed = last_json_line(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == {k: summary[k] for k in ("final_test_errors", "best_test_errors", "diverged")}
    assert summary["variant"] == resolve(variant)
    assert summary["variant_name"] == ""
    assert summary["epochs_completed"] == 2 and summary["seed"] == 7


def test_a_json_variant_may_carry_a_name(mnist_like_root, tmp_path):
    out = tmp_path / "out"
    argv = train_args(mnist_like_root, out, "--variant-json", '{"hidden": [8]}', "--variant", "x",
                      epochs=1)  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["variant_name"] == "x"


def test_the_config_and_the_json_variant_give_the_same_run(mnist_like_root, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_YAML)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_args(mnist_like_root, a, "--config", str(config), "--variant", "plain")) == 0
    as_json = json.dumps({"hidden": [16], "lr0": 0.5, "max_norm": 2.0})
    assert main(train_args(mnist_like_root, b, "--variant-json", as_json)) == 0
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(a)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(b)]


def test_a_diverging_run_exits_zero(mnist_like_root, tmp_path, capsys):
    variant = json.dumps({"hidden": [16], "lr0": 1e6, "max_norm": None})
    argv = train_args(mnist_like_root, tmp_path, "--variant-json", variant, epochs=4)
    assert main(argv) == 0
    assert last_json_line(capsys.readouterr().out)["diverged"] is True


def test_variant_from_config_merges_defaults_and_variant():
    config = {"defaults": {"lr0": 0.5, "hidden": [16]}, "variants": {"a": {"lr0": 0.1}, "b": None}}
    assert variant_from_config(config, "a") == {"lr0": 0.1, "hidden": [16]}
    assert variant_from_config(config, "b") == {"lr0": 0.5, "hidden": [16]}
    assert variant_from_config({"variants": {"c": {"lr0": 2.0}}}, "c") == {"lr0": 2.0}


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "either as --variant-json or as --config"),
        (["--variant-json", "{}", "--config", "c.yaml"], "either as --variant-json or as --config"),
        (["--config", "CONFIG"], "--config needs --variant"),
        (
            ["--config", "CONFIG", "--variant", "nope"],
            "'nope' is not in the config.*plain, dropout",
        ),
    ],
)
def test_train_refusals_say_what_is_wrong(extra, match, mnist_like_root, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_YAML)
    extra = [str(config) if a == "CONFIG" else a for a in extra]
    with pytest.raises(SystemExit, match=match):
        main(train_args(mnist_like_root, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_a_bad_variant_is_refused_by_the_cli(mnist_like_root, tmp_path):
    argv = train_args(mnist_like_root, tmp_path / "out", "--variant-json", '{"lr0": 0}')
    with pytest.raises(ValueError, match="'lr0' = 0"):
        main(argv)


def test_bench_prints_the_step_the_floor_and_their_ratio(capsys, monkeypatch):
    # The output, not the speed, is under test: time a narrow net so that the 5 rounds of at
    # least 10 steps each (what --steps 20 asks for) take well under a second.
    from dropout_repro import bench

    small_step, small_floor = bench.training_step, bench.gemm_floor_step
    monkeypatch.setattr(
        bench, "training_step", lambda dev: small_step(dev, {**bench.BENCH_VARIANT, "hidden": [32]})
    )
    monkeypatch.setattr(bench, "gemm_floor_step", lambda dev: small_floor(dev, hidden=(32,)))
    assert main(["bench", "--steps", "20", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu")
    step = [line for line in lines if line.startswith("training step")]
    floor = [line for line in lines if line.startswith("GEMM floor")]
    ratio = [line for line in lines if line.startswith("ratio")]
    assert len(step) == len(floor) == len(ratio) == 1
    seconds = [float(line.split()[2]) for line in (step[0], floor[0])]
    assert all(s > 0 for s in seconds)
    # the ratio printed is the quotient of the two (each rounded as printed)
    assert float(ratio[0].split()[1]) == pytest.approx(seconds[0] / seconds[1], rel=0.02, abs=0.01)
