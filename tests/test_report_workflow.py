"""The report rules under Snakemake, on generated runs: aggregate -> figure -> report."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dropout_repro.report.synthetic import demo_runs

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which(
    "snakemake"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed"),
]


def test_report_rules_build_the_page(tmp_path):
    _, _, config = demo_runs(tmp_path / "results", epochs=4, seeds=(0, 1))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # Only the report stage: the runs are already on disk, so data and train rules are left out.
    (tmp_path / "Snakefile").write_text(
        f'configfile: "config.yaml"\n\n\n'
        f'include: "{REPO}/workflow/rules/common.smk"\n'
        f'include: "{REPO}/workflow/rules/report.smk"\n\n\n'
        'rule all:\n    input:\n        "results/report/report.html",\n'
    )
    run = [SNAKEMAKE, "--cores", "1", "--directory", str(tmp_path), "-s", "Snakefile"]
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for path in (
        "results/tables/final_errors.csv",
        "results/tables/final_errors.md",
        "results/tables/curves.csv",
        "results/figures/figure1.svg",
        "results/figures/figure1.png",
        "results/figures/loss.png",
        "results/figures/schedules.png",
        "results/figures/max_norm.png",
        "results/report/report.html",
        "logs/report/report.log",
    ):
        assert (tmp_path / path).stat().st_size > 0, path
    page = (tmp_path / "results/report/report.html").read_text()
    assert "--cores 1" in page  # the command line, carried in the environment
    # Running again with other flags finds nothing to do: the command is not a param.
    again = subprocess.run([*run, "-n"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
