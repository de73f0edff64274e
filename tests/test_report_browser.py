"""The rendered report in a real browser: it displays, its figure shows, and a hostile name stays text."""

import shutil
from pathlib import Path

import pytest

from dropout_repro.report.aggregate import aggregate, load_runs
from dropout_repro.report.figures import all_figures
from dropout_repro.report.render import write_report
from dropout_repro.report.synthetic import demo_runs, write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
EVIL = "x<script>window.__pwned=1</script>"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason=f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (apt: chromium "
        "chromium-driver)",
    ),
]


@pytest.fixture
def report(tmp_path):
    results = tmp_path / "results"
    dirs, benches, config = demo_runs(results, epochs=30, seeds=(0, 1, 2))
    evil = [
        write_run(results / "runs" / "evil" / f"seed{s}", EVIL, s, [600] * 10 + [170 + s] * 20)
        for s in (0, 1)
    ]
    dirs += evil
    config["variants"][EVIL] = {}
    t = results / "tables"
    aggregate(dirs, config, t / "final_errors.csv", t / "final_errors.md", t / "curves.csv")
    figs = results / "figures"
    outputs = {
        "figure1": [figs / "figure1.png", figs / "figure1.svg"],
        "loss": [figs / "loss.png"],
        "schedules": [figs / "schedules.png"],
        "max_norm": [figs / "max_norm.png"],
    }
    all_figures(load_runs(dirs), outputs, config)
    html = write_report(
        results / "report" / "report.html",
        dirs,
        config,
        final_csv=t / "final_errors.csv",
        figures={k: v[0] for k, v in outputs.items()},
        benchmarks=benches,
        command="snakemake --cores 2",
        git_commit="0123456789abcdef0123456789abcdef01234567",
        git_dirty="no",
    )
    return html, list(config["variants"])


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options
    )
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_report_in_headless_chromium(report, browser, tmp_path):
    html, variants = report
    browser.get(html.resolve().as_uri())

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 100, 16000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000

    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == []

    assert browser.execute_script("return typeof window.__pwned") == "undefined"

    img = browser.find_element("css selector", "#fig-figure1 img")
    assert img.is_displayed()
    natural = browser.execute_script(
        "const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight];", img
    )
    assert natural[0] and natural[1] > 0 and natural[2] > 0
    assert img.size["width"] > 600 and img.size["height"] > 300

    table = browser.find_element("id", "final-errors")
    names = [th.text for th in table.find_elements("css selector", "tbody tr > th:first-child")]
    assert names == variants
    assert EVIL in table.text  # shown as text, exactly as written

    for fig in ("loss", "schedules", "max_norm"):
        el = browser.find_element("css selector", f"#fig-{fig} img")
        assert browser.execute_script("return arguments[0].naturalWidth", el) > 0
    assert "short run of 30 epochs" in browser.find_element("id", "honesty").text
