"""The report as a reader sees it: the micro run's page rendered by headless Chromium at a
laptop's width, every check made on the rendered page (boxes, decoded images, visible text),
not on the HTML source."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from render_page import CHROMIUM, probe, screenshot

from dalign.cli import main

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: "
                                                             "apt-get install chromium); .ci/run installs it")
SECTIONS = ["Results", "Beside the paper", "Per category", "Training", "AI feedback", "Example answers", "Provenance",
            "Decontamination"]


@pytest.fixture(scope="module")
def report(micro_run, tmp_path_factory):
    _, run_dir, code, _, err = micro_run
    assert code == 0, err
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    return run_dir, out


def test_the_page_stands_alone(report):
    _, out = report
    page = (out / "report.html").read_text()
    # Nothing fetched: no script, no stylesheet or image by address; every image inline.
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 3  # radar, curves, AI feedback


@needs_chromium
def test_at_1280_pixels_every_table_and_chart_is_visible_and_nothing_widens_the_page(report, tmp_path):
    run_dir, out = report
    seen = probe(out / "report.html", width=1280)
    assert seen["viewport"] == 1280 and seen["page_width"] <= 1280  # no sideways scrolling of the page
    assert seen["body_font_px"] >= 14
    h2 = [text for tag, text, shown in seen["headings"] if tag == "H2" and shown]
    assert h2 == SECTIONS
    assert all(found for _, found in seen["links"]) and [t for t, _ in seen["links"]] == SECTIONS  # the contents bar
    for table in seen["tables"]:
        assert table["shown"] and table["head"] and table["rows"], table["head"]
        assert table["cell_font_px"] >= 12
        # A table wider than the column scrolls inside its own box, never past the page.
        assert table["scroll_box"] <= 1280 and table["scrolls"] == "auto"
    results = seen["tables"][0]
    assert results["head"][:3] == ["run", "model", "alignment"]
    evaluation = json.loads((run_dir / "evaluate" / "manifest.json").read_text())
    by_model = {row[1]: row for row in results["rows"]}
    assert set(by_model) == set(evaluation["results"])
    sft = evaluation["results"]["sft"]
    assert by_model["sft"][3] == f"{sft['score']:.2f} ± {sft['ci95']:.2f}"  # the figure, as rendered text
    paper = next(t for t in seen["tables"] if t["head"][:2] == ["recipe", "paper MT-Bench"])
    assert ["dSFT-1 + dDPO (1 epoch each)", "7.00", "86.07", "dpo-main"] == paper["rows"][-1][:4]
    answers = [t for t in seen["tables"] if t["cls"] == "answers"]
    assert answers and all(t["head"] == ["model", "score", "answer", "judge"] for t in answers)
    for table in answers:  # the fixed layout fits the column: the answers wrap instead of scrolling
        assert table["box"][2] <= table["scroll_box"] + 1
        assert {row[0] for row in table["rows"]} == set(evaluation["results"])
    assert len(seen["images"]) == 3
    for image in seen["images"]:
        assert image["shown"] and image["decoded"] and image["alt"]
        left, _, width, height = image["box"]
        assert 300 <= width <= 1280 - left and height > 100  # readable, and inside the page
    if folder := os.environ.get("DALIGN_TEST_ARTEFACTS"):  # CI keeps what the page looked like
        shot = screenshot(out / "report.html", tmp_path / "report-1280.png")
        shutil.copy(shot, folder)


@needs_chromium
def test_at_a_narrow_window_the_page_still_fits(report):
    _, out = report
    seen = probe(out / "report.html", width=800)
    assert seen["page_width"] <= 800
    assert all(image["box"][2] <= 800 for image in seen["images"])  # the charts shrink with the column
