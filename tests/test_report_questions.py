"""The blog's three questions: which variants answer them, and the numbers they give."""

import math

import pytest
from scipy import stats

from dropout_repro.report.aggregate import load_runs
from dropout_repro.report.questions import NOT_RUN, answer_questions
from dropout_repro.report.synthetic import write_run

DROPOUT = {"hidden_dropout": 0.5}


def make(tmp_path, spec):
    dirs = []
    for name, overrides, finals in spec:
        for seed, final in enumerate(finals):
            dirs.append(
                write_run(
                    tmp_path / name / f"seed{seed}", name, seed, [500, final], overrides=overrides
                )
            )
    return load_runs(dirs)


def by_key(questions):
    return {q.key: q for q in questions}


def test_pairs_are_found_by_hyperparameters(tmp_path):
    runs = make(
        tmp_path,
        [
            ("standard", {}, [160, 162]),
            ("baseline", DROPOUT, [120, 122, 124]),
            ("pytorch", {**DROPOUT, "optimizer": "torch_sgd"}, [130, 132, 134]),
            ("free", {**DROPOUT, "max_norm": None}, [140, 150]),
            ("decay", {**DROPOUT, "max_norm": None, "weight_decay": 1e-4}, [135]),
            ("adam", {**DROPOUT, "optimizer": "adam", "lr0": 0.001}, [150, 150]),
            # Differs from the baseline in the width too: answers nothing.
            ("wide_adam", {**DROPOUT, "optimizer": "adam", "hidden": [1200, 1200]}, [1, 2]),
        ],
    )
    q = by_key(answer_questions(runs))
    assert [(c.candidate, c.baseline) for c in q["a"].comparisons] == [("pytorch", "baseline")]
    assert [(c.candidate, c.baseline) for c in q["b"].comparisons] == [
        ("free", "baseline"),
        ("decay", "baseline"),
    ]
    assert [(c.candidate, c.baseline) for c in q["c"].comparisons] == [("adam", "baseline")]
    assert q["c"].comparisons[0].differs == {
        "lr0": (0.001, 1.0),
        "optimizer": ("adam", "sgd_hinton"),
    }

    a = q["a"].comparisons[0]
    # pytorch 130, 132, 134: mean 132, s^2 = (4 + 0 + 4) / 2 = 4; baseline 120, 122, 124: 122, 4.
    assert (a.candidate_mean, a.baseline_mean, a.difference) == (132, 122, 10)
    assert (a.candidate_std, a.baseline_std) == (2, 2)
    # Welch: t = 10 / sqrt(4/3 + 4/3) = 6.1237; df = (8/3)^2 / ((4/3)^2/2 + (4/3)^2/2) = 4.
    t = 10 / math.sqrt(8 / 3)
    assert a.p_value == pytest.approx(2 * stats.t.sf(t, 4), rel=1e-9)
    assert a.p_value == pytest.approx(0.0036022, abs=1e-7)
    assert "p = 0.0036" in a.answer and "a difference at the 0.05 level" in a.answer

    decay = q["b"].comparisons[1]
    # One seed: a mean, no spread and no test.
    assert decay.candidate_mean == 135 and math.isnan(decay.candidate_std)
    assert math.isnan(decay.p_value)
    assert "no spread (1 seed)" in decay.answer and "at least two seeds" in decay.answer

    adam = q["c"].comparisons[0]
    # adam does not vary but the baseline does: Welch is still defined.
    assert not math.isnan(adam.p_value)


def test_baseline_named_dropout_wins(tmp_path):
    runs = make(
        tmp_path,
        [
            ("also_dropout", DROPOUT, [120, 121]),
            ("dropout", DROPOUT, [125, 126]),
            ("adam", {**DROPOUT, "optimizer": "adam"}, [130, 131]),
        ],
    )
    assert by_key(answer_questions(runs))["c"].comparisons[0].baseline == "dropout"


def test_questions_not_run(tmp_path):
    runs = make(tmp_path, [("dropout", DROPOUT, [120, 122])])
    for q in answer_questions(runs):
        assert not q.answered and q.comparisons == []
        assert q.hint
    assert NOT_RUN == "not run in this configuration"


def test_diverged_seeds_are_left_out(tmp_path):
    runs = make(tmp_path, [("dropout", DROPOUT, [120, 122])])
    dirs = [r.path for r in runs]
    torch_sgd = {**DROPOUT, "optimizer": "torch_sgd"}
    dirs.append(write_run(tmp_path / "t" / "seed0", "t", 0, [500, 130], overrides=torch_sgd))
    dirs.append(
        write_run(
            tmp_path / "t" / "seed1", "t", 1, [500, 9000], overrides=torch_sgd, diverged_epoch=2
        )
    )
    a = by_key(answer_questions(load_runs(dirs)))["a"].comparisons[0]
    assert a.candidate_errors == [130.0] and a.candidate_diverged == 1
    assert "1 diverged" in a.answer and math.isnan(a.p_value)
