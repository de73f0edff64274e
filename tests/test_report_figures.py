"""The figures are drawn from run files: files exist, have the expected size, and embed no markup."""

import struct

import pytest

from dropout_repro.report.aggregate import load_runs
from dropout_repro.report.figures import PNG_DPI, all_figures
from dropout_repro.report.synthetic import demo_runs, write_run

EVIL = "x<script>window.__pwned=1</script>$a$"


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def runs(tmp_path):
    dirs, _, config = demo_runs(tmp_path / "results", epochs=12, seeds=(0, 1))
    dirs.append(write_run(tmp_path / "evil" / "seed0", EVIL, 0, [700, 300, 250, 240]))
    dirs.append(
        write_run(
            tmp_path / "boom" / "seed0",
            "boom",
            0,
            [700, 400, 9000],
            overrides={"hidden_dropout": 0.5, "lr0": 100.0},
            diverged_epoch=3,
        )
    )
    return load_runs(dirs), config


def test_every_figure_is_written(runs, tmp_path):
    runs, config = runs
    out = tmp_path / "figures"
    paths = {
        "figure1": [out / "figure1.svg", out / "figure1.png"],
        "loss": [out / "loss.png"],
        "schedules": [out / "schedules.png"],
        "max_norm": [out / "max_norm.png"],
    }
    all_figures(runs, paths, config)
    for files in paths.values():
        for f in files:
            assert f.stat().st_size > 5_000, f
    # 9.0 x 5.6 inches at PNG_DPI
    assert png_size(out / "figure1.png") == (round(9.0 * PNG_DPI), round(5.6 * PNG_DPI))
    svg = (out / "figure1.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    # Text is drawn as outlines; names survive only in escaped comments.
    assert "<script" not in svg


def test_unknown_figure_is_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown figure\\(s\\) fig9; known: figure1"):
        all_figures(runs[0], {"fig9": [tmp_path / "x.png"]})
