"""The HTML report: self-contained, escaped, honest about short runs, verdicts only at 3000 epochs."""

import re

import pytest

from dropout_repro.report.aggregate import aggregate, load_runs
from dropout_repro.report.figures import all_figures
from dropout_repro.report.render import build_context, git_state, render_html, write_report
from dropout_repro.report.synthetic import demo_runs, write_run

EVIL = "x<script>window.__pwned=1</script>"


def build(tmp_path, epochs=8, extra=(), **kwargs):
    results = tmp_path / "results"
    dirs, benches, config = demo_runs(results, epochs=epochs, seeds=(0, 1))
    dirs += list(extra)
    tables = results / "tables"
    aggregate(dirs, config, tables / "f.csv", tables / "f.md", tables / "c.csv")
    fig = results / "figures" / "figure1.png"
    all_figures(load_runs(dirs), {"figure1": [fig]}, config)
    out = write_report(
        results / "report" / "report.html",
        dirs,
        config,
        final_csv=tables / "f.csv",
        figures={"figure1": fig},
        benchmarks=benches,
        command="snakemake --cores 2 --configfile config/test.yaml",
        git_commit="0123456789abcdef",
        git_dirty="no",
        **kwargs,
    )
    return out.read_text(), dirs, config


def test_page_is_self_contained_and_escaped(tmp_path):
    evil = write_run(tmp_path / "evil" / "seed0", EVIL, 0, [600, 300, 200, 180, 170, 160, 150, 140])
    page, _, _ = build(tmp_path, extra=[evil])
    assert "<script" not in page.lower()
    assert "x&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    # Nothing is fetched: no external sources, styles or links to follow for display.
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', page)
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    assert "<style>" in page and 'rel="stylesheet"' not in page
    for text in ("snakemake --cores 2 --configfile config/test.yaml", "0123456789abcdef"):
        assert text in page


def test_short_run_banner_and_no_verdict(tmp_path):
    page, _, _ = build(tmp_path, epochs=8)
    assert 'id="honesty"' in page
    assert "This is a short run of 8 epochs; the paper trained 3000." in page
    assert "No claim is made that the result reproduced" in page
    assert "<th>Verdict</th>" not in page


def test_full_recipe_gives_verdicts(tmp_path):
    dirs, _, config = demo_runs(tmp_path, epochs=3000, seeds=(0, 1))
    ctx = build_context(load_runs(dirs), config, git_commit="c", git_dirty="no")
    assert ctx["full_recipe"] and not ctx["short_run"]
    assert "Verdict" in ctx["final"]["columns"]
    verdicts = {r["Variant"]: r["Verdict"] for r in ctx["final"]["rows"]}
    # The demo's curves settle near 165 and 132 against 160 and 130: inside +-15.
    assert verdicts["standard"].startswith("reproduced")
    assert verdicts["dropout"].startswith("reproduced")
    page = render_html(ctx)
    assert 'id="honesty"' not in page
    assert "within ±15 errors" in page


def test_training_subset_is_flagged(tmp_path):
    d = write_run(tmp_path / "r" / "seed0", "dropout", 0, [300, 200], train_size=1000)
    ctx = build_context(load_runs([d]), {"data": {"train_limit": 1000}})
    assert ctx["subset"] == [1000]
    titles = [x["title"] for x in ctx["deviations"]]
    assert "1,000 training images instead of 60,000" in titles
    assert "Trained on 1,000 images" in render_html(ctx)


def test_methods_questions_deviations(tmp_path):
    page, dirs, config = build(tmp_path)
    ctx = build_context(load_runs(dirs), config)
    methods = ctx["methods"]
    assert methods["variants"] == list(config["variants"])
    assert [r["key"] for r in methods["rows"]][:3] == ["hidden", "activation", "input_dropout"]
    optimizer = next(r for r in methods["rows"] if r["key"] == "optimizer")
    assert [c["text"] for c in optimizer["cells"]][3] == "torch_sgd"
    assert optimizer["cells"][3]["changed"] and not optimizer["cells"][0]["changed"]
    assert all(q["answered"] for q in ctx["questions"])
    titles = " | ".join(d["title"] for d in ctx["deviations"])
    for expected in (
        "8 epochs instead of 3000",
        "Max-norm applied after the update",
        "Bound of √15",
        "Rectified linear hidden units",
        "Inverted dropout",
    ):
        assert expected in titles
    for q in ("question-a", "question-b", "question-c"):
        assert f'id="{q}"' in page


def test_questions_not_run_and_study_table(tmp_path):
    d = write_run(
        tmp_path / "r" / "seed0", "dropout", 0, [300, 200], overrides={"hidden_dropout": 0.5}
    )
    runs = load_runs([d])
    page = render_html(build_context(runs, {}))
    assert page.count("Not run in this configuration") == 3
    assert 'id="study"' not in page
    study = tmp_path / "study.csv"
    study.write_text("lr0,errors\n1.0,130\n<b>10</b>,125\n")
    page = render_html(build_context(runs, {}, study_csv=study, study_caption="ε_0 against errors"))
    assert 'id="study"' in page and "ε_0 against errors" in page
    assert "&lt;b&gt;10&lt;/b&gt;" in page


def test_git_state_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) == ("unknown", "unknown")


@pytest.mark.parametrize("name", ["NA", "1e3", "a,b"])
def test_odd_names_survive_the_csv(tmp_path, name):
    d = write_run(tmp_path / "r" / "seed0", name, 0, [300, 200])
    csv = tmp_path / "f.csv"
    aggregate([d], {}, csv, tmp_path / "f.md", tmp_path / "c.csv")
    page = write_report(tmp_path / "r.html", [d], {}, final_csv=csv).read_text()
    assert f"<th>{name}</th>" in page


def test_title_from_config_is_escaped(tmp_path):
    d = write_run(tmp_path / "r" / "seed0", "dropout", 0, [300, 200])
    page = render_html(build_context(load_runs([d]), {"report": {"title": "Dropout <i>again</i>"}}))
    assert "<title>Dropout &lt;i&gt;again&lt;/i&gt;</title>" in page
