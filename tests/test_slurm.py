"""The workflow through a real Slurm cluster with profiles/slurm: the same numbers as a local run,
and a cancelled training job that is reported failed, retried, and resumed from its checkpoint.

Needs a running cluster (`.ci/slurm.sh up` starts a one-node one on this machine); without one
every test here is skipped, which conftest.py turns into a failure under DROPOUT_REPRO_REQUIRE=slurm
(CI, after starting the cluster).
Snakemake runs under `timeout -s INT`: SIGINT makes it cancel its Slurm jobs before it exits.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dropout_repro.mnist import cached_mnist_root
from dropout_repro.train import CHECKPOINT, COLUMNS
from workflow_helpers import ROOT, copy_workflow, real_mnist_sources, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = ROOT / "profiles" / "slurm"
USABLE_NODE_STATES = {"idle", "mixed", "allocated"}
# Columns that must match between two runs of the same config; `seconds` is wall time.
COMPARED = [c for c in COLUMNS if c != "seconds"]
# The plugin's job comment: "rule_<rule>_wildcards_<values>".
TRAIN_JOB_COMMENT = "rule_train_wildcards_"


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a node can take jobs."""
    if shutil.which("sinfo") is None:
        return "Slurm is not running: no `sinfo` on PATH (start a cluster with `.ci/slurm.sh up`)"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "Slurm is not running: `sinfo` did not answer within 30 s"
    if proc.returncode != 0:
        return f"Slurm is not running: `sinfo` failed: {proc.stderr.strip()[:300]}"
    states = proc.stdout.split()
    if not USABLE_NODE_STATES & set(states):
        return (
            f"Slurm is not running: no node is idle, mixed or allocated "
            f"(sinfo node states: {', '.join(states) or 'none'}); see `.ci/slurm.sh status`"
        )
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


class Snakemake:
    """``snakemake ARGS`` in the background, its stdout and stderr in a file one can read while
    it runs, killed with SIGINT (which cancels its Slurm jobs) after ``limit_s`` seconds."""

    def __init__(self, workdir: Path, *args: str, limit_s: int, profile: bool = True, name: str):
        self.workdir = workdir
        self.args = args
        self.limit_s = limit_s
        self.output_path = workdir / f"{name}.out"
        cmd = ["timeout", "-s", "INT", "-k", "30", str(limit_s), sys.executable, "-m", "snakemake"]
        if profile:
            cmd += ["--profile", str(PROFILE)]
        cmd += list(args)
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def output(self) -> str:
        return self.output_path.read_text()

    def wait(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=self.limit_s + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        out = self.output()
        assert rc not in (
            124,
            137,
        ), f"snakemake {' '.join(self.args)} ran past its {self.limit_s} s limit\n{out[-6000:]}"
        return rc, out

    def succeed(self) -> str:
        rc, out = self.wait()
        assert rc == 0, f"snakemake {' '.join(self.args)} exited {rc}\n{out[-6000:]}"
        return out


def submitted_job_ids(output: str) -> list[str]:
    """Slurm job ids from Snakemake's "Job 3 has been submitted with SLURM jobid 17 (log: ...)"."""
    return re.findall(r"submitted with SLURM jobid (\d+)", output)


def squeue(workdir: Path) -> list[dict]:
    """Slurm's view of the jobs submitted from ``workdir``, finished ones included (they stay
    visible for MinJobAge seconds)."""
    proc = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i|%T|%C|%Z|%k"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    jobs = []
    for line in proc.stdout.splitlines():
        job_id, state, cpus, job_dir, comment = line.strip().split("|", 4)
        if Path(job_dir) == workdir:
            jobs.append({"id": job_id, "state": state, "cpus": int(cpus), "comment": comment})
    return jobs


def metric_rows(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == COLUMNS, f"{path}: {rows[:1]}"
    return [{c: r[c] for c in COMPARED} for r in rows]


def epochs_logged(text: str) -> list[int]:
    return [int(e) for e in re.findall(r"^epoch\s+(\d+)/\d+", text, flags=re.MULTILINE)]


def wait_for(condition, what: str, proc: Snakemake, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.proc.poll() is not None:
            pytest.fail(
                f"snakemake exited ({proc.proc.returncode}) before {what}\n{proc.output()[-6000:]}"
            )
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {timeout_s} s\n{proc.output()[-6000:]}")


def test_tiny_config_through_slurm_matches_a_local_run(tmp_path):
    """config/test.yaml as sbatch jobs gives the same metrics, all but wall time, as run here."""
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    runs = [f"results/runs/{v}/seed{s}" for v in config["variants"] for s in config["seeds"]]
    targets = [f"{r}/metrics.csv" for r in runs]
    workdirs = {}
    for name in ("cluster", "local"):
        wd = copy_workflow(tmp_path / name)
        write_config(wd / "tiny.yaml", {"data": {"sources": real_mnist_sources()}})
        workdirs[name] = wd
    # Targets first: --configfile takes every argument after it.
    args = ("--configfile", "config/test.yaml", "tiny.yaml")
    # The local run goes alongside: the cluster run spends most of its time waiting for polls.
    cluster = Snakemake(
        workdirs["cluster"],
        *targets,
        "--slurm-keep-successful-logs",
        *args,
        limit_s=240,
        name="snakemake",
    )
    local = Snakemake(
        workdirs["local"],
        *targets,
        "--cores",
        "2",
        *args,
        limit_s=240,
        profile=False,
        name="snakemake",
    )
    cluster_out = cluster.succeed()
    local.succeed()

    wd = workdirs["cluster"]
    job_ids = submitted_job_ids(cluster_out)
    # One sbatch job per run, each with its Slurm log; the download is a local rule.
    assert len(job_ids) == len(runs), cluster_out[-4000:]
    assert "localrule download_mnist" in cluster_out
    for job_id in job_ids:
        assert list((wd / ".snakemake/slurm_logs").glob(f"rule_*/**/{job_id}.log")), job_id
    jobs = {j["id"]: j for j in squeue(wd)}
    assert set(job_ids) <= set(jobs), (job_ids, jobs)
    train_jobs = [jobs[i] for i in job_ids if jobs[i]["comment"].startswith(TRAIN_JOB_COMMENT)]
    assert len(train_jobs) == len(runs)
    for job in train_jobs:
        assert job["state"] == "COMPLETED", job
        # The cores Slurm gave are the config's threads, as on a local run.
        assert job["cpus"] == config["train"]["threads"], job

    for run in runs:
        there = metric_rows(wd / run / "metrics.csv")
        here = metric_rows(workdirs["local"] / run / "metrics.csv")
        assert there == here, f"{run}: cluster {there} != local {here}"
        assert len(there) == config["epochs"]
        summaries = [json.loads((d / run / "summary.json").read_text()) for d in workdirs.values()]
        assert summaries[0]["threads"] == summaries[1]["threads"] == config["train"]["threads"]


VARIANT, SEED, EPOCHS = "dropout_input", 1, 10


def resume_config(wd: Path) -> Path:
    """One run with dropout (so the mask stream must resume too), long enough to cancel midway."""
    config = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    config.update(epochs=EPOCHS, seeds=[SEED], checkpoint_every=1)
    config["variants"] = {VARIANT: config["variants"][VARIANT]}
    config["data"].update(train_limit=3000, sources=real_mnist_sources())
    # MNIST in place already: the first test fetches it; here it would only add a step before
    # the job that matters.
    raw = Path(config["data"].get("root", "resources/mnist")) / "MNIST" / "raw"
    shutil.copytree(cached_mnist_root() / "MNIST" / "raw", wd / raw)
    return write_config(wd / "resume.yaml", config)


def test_a_cancelled_training_job_fails_then_resumes_from_its_checkpoint(tmp_path):
    run = f"results/runs/{VARIANT}/seed{SEED}"
    target = f"{run}/metrics.csv"
    reference_wd = copy_workflow(tmp_path / "uninterrupted")
    resume_config(reference_wd)
    reference = Snakemake(
        reference_wd,
        target,
        "--cores",
        "1",
        "--configfile",
        "resume.yaml",
        limit_s=300,
        profile=False,
        name="snakemake",
    )

    wd = copy_workflow(tmp_path / "cluster")
    resume_config(wd)
    log = wd / f"logs/train/{VARIANT}/seed{SEED}.log"
    checkpoint = wd / run / CHECKPOINT

    def log_text() -> str:
        # Snakemake deletes a job's log: file before each attempt (on submission, and again
        # inside the Slurm job), so the file comes and goes.
        try:
            return log.read_text()
        except FileNotFoundError:
            return ""

    def running_train_job(proc: Snakemake) -> str:
        jobs = wait_for(
            lambda: [
                j
                for j in squeue(wd)
                if j["comment"].startswith(TRAIN_JOB_COMMENT) and j["state"] == "RUNNING"
            ],
            "squeue showing the running training job",
            proc,
            timeout_s=30,
        )
        assert len(jobs) == 1, jobs
        return jobs[0]["id"]

    # 1. No retries: the cancelled job's failure is final.
    first = Snakemake(
        wd, target, "--retries", "0", "--configfile", "resume.yaml", limit_s=240, name="first"
    )
    # Epoch 3 on the log means the checkpoint of epoch 2 is on disk.
    wait_for(
        lambda: max(epochs_logged(log_text()), default=0) >= 3,
        "the training job's third epoch",
        first,
        timeout_s=200,
    )
    job_id = running_train_job(first)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    rc, out = first.wait()
    assert rc != 0, out[-4000:]
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in out, out[-4000:]
    assert "Error in rule train" in out, out[-4000:]
    stopped_at = max(epochs_logged(log_text()))
    assert 3 <= stopped_at < EPOCHS
    # The failed job's outputs are removed; its checkpoint is no output and stays.
    assert not (wd / target).exists()
    assert checkpoint.exists()

    # 2. Run again, with the profile's retries: the job resumes. Cancel it once more, two
    #    epochs later: Snakemake submits it again by itself, and it resumes again and finishes.
    second = Snakemake(wd, target, "--configfile", "resume.yaml", limit_s=300, name="second")

    def resumed_and_two_epochs_further() -> int | None:
        text = log_text()
        resumes = re.findall(r"resuming from checkpoint at epoch (\d+)", text)
        if not resumes:
            return None
        after = epochs_logged(text.rsplit("resuming from checkpoint", 1)[1])
        # Two epochs past the resume point: a later checkpoint is on disk.
        return int(resumes[-1]) if after and after[-1] >= int(resumes[-1]) + 2 else None

    resumed_at = wait_for(
        resumed_and_two_epochs_further, "two epochs of the resumed job", second, timeout_s=200
    )
    # The last epoch on the log may have been cancelled before its checkpoint was written.
    assert resumed_at in (stopped_at - 1, stopped_at) and resumed_at >= 2
    job_id = running_train_job(second)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    out = second.succeed()
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in out, out[-4000:]
    assert len(submitted_job_ids(out)) == 2, out[-4000:]

    text = log_text()
    resumes = [int(n) for n in re.findall(r"resuming from checkpoint at epoch (\d+)", text)]
    assert resumes and resumes[-1] >= resumed_at + 2, text
    assert epochs_logged(text)[-1] == EPOCHS, text
    summary = json.loads((wd / run / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == resumes[-1]
    assert summary["epochs_completed"] == EPOCHS

    reference.succeed()
    assert metric_rows(wd / target) == metric_rows(reference_wd / target)
