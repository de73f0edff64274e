"""From finished runs on disk to the report: tables (``aggregate``), figures (``figures``), the blog's
three open questions (``questions``) and one self-contained HTML page (``render``).

Everything here reads the files a training run leaves behind (``metrics.csv``, ``summary.json``, the
workflow's benchmark TSVs) and nothing else, so a report can be rebuilt or restyled without
retraining.
"""

from dropout_repro.report.aggregate import (
    MissingRunsError,
    Run,
    curves_table,
    final_errors_table,
    load_runs,
    paper_errors,
)

__all__ = [
    "MissingRunsError",
    "Run",
    "curves_table",
    "final_errors_table",
    "load_runs",
    "paper_errors",
]
