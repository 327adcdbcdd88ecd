"""Top-1 vs model size in the dashboard (issue 20 item 3), in Debian's Chromium driven by Playwright
against the real service (Postgres, Redis, Celery) with two real finished eval jobs (conftest's
``pareto_evals``: uniform bit-widths with an autobit row; AdaRound): on an eval job's page and on
the compare page, the chart has one series per job, source and PTQ method with every sized row a
point, FP dashed, values at the cursor, a table marking the Pareto front, names as text, and no
console errors.

Screenshot: SSQL_UPDATE_SCREENSHOTS=1 writes pareto.png to docs/screenshots/.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.service.browser import ROOT, needs_chromium
from tests.service.test_dashboard_runs import Page

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium



def _chart(page, selector: str = "#pareto-chart") -> dict[str, str]:  # type: ignore[no-untyped-def]
    page.wait_for_selector(f"{selector}[data-drawn='1'] canvas")
    return page.eval_on_selector(selector, "b => ({...b.dataset})")


def _legend(page) -> list[str]:  # type: ignore[no-untyped-def]
    return page.eval_on_selector_all("#pareto-chart .u-legend .u-series .u-label", "ls => ls.map(l => l.textContent)")


def test_pareto_chart_of_an_eval_job_and_of_two_compared(stack, api_key: str, client: httpx.Client,  # type: ignore[no-untyped-def]
                                                        pareto_evals: list[str], browser) -> None:
    uniform_auto, adaround = pareto_evals
    rows = {j: client.get(f"/v1/jobs/{j}/results").json()["rows"] for j in pareto_evals}
    sized = {j: [r for r in rs if r["bits"] != "fp" and r.get("model_bytes")] for j, rs in rows.items()}
    s = Page(browser, stack.url, api_key)
    page = s.page
    page.goto(f"{stack.url}/#/job/{uniform_auto}")
    chart = _chart(page)
    # fp, 4w4a, 2w4a and the autobit row: two series (uniform, autobit), three points, FP dashed
    assert chart["points"] == str(len(sized[uniform_auto])) == "3"
    assert chart["series"] == "2" and chart["fp"] == "1"
    assert chart["labels"].split("|") == ["uniform · calibrate", "autobit · calibrate"]
    legend = _legend(page)
    assert legend[1:3] == ["uniform · calibrate", "autobit · calibrate"] and legend[3].startswith("fp (") and legend[3].endswith(" KB)")
    table = page.eval_on_selector_all("#pareto-table tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    assert sorted(r[1] for r in table) == sorted(r["bits"] for r in rows[uniform_auto])  # every row, fp too
    by_size = sorted(rows[uniform_auto], key=lambda r: r["model_bytes"])
    assert [r[1] for r in table] == [r["bits"] for r in by_size]
    assert all(abs(float(t[3]) - r["model_bytes"] / 1000) <= 0.051 for t, r in zip(table, by_size, strict=True))  # KB, 1 decimal
    assert table[0][5] == "yes" and 1 <= int(chart["front"]) <= len(table)  # the smallest model is on the front
    # hover: the cursor over the chart shows each series' value there (top-1, bits, average weight bits)
    page.query_selector("#pareto-chart").scroll_into_view_if_needed()
    over = page.query_selector("#pareto-chart .u-over").bounding_box()
    values: list[str] = []
    for i in range(1, 40):
        page.mouse.move(over["x"] + over["width"] * i / 40, over["y"] + over["height"] / 2)
        values = page.eval_on_selector_all("#pareto-chart .u-legend .u-series .u-value", "vs => vs.map(v => v.textContent)")
        if "bits)" in values[1] or "bits)" in values[2]:
            break
    assert values[0].endswith(" KB") and any("% (" in v and " bits)" in v for v in values[1:3]), values
    s.page.screenshot(path=str(_shots() / "pareto.png"), clip=_section_box(page))
    # compare: three series (the AdaRound job's name, with its markup, is text in the legend)
    page.goto(f"{stack.url}/#/compare?jobs={uniform_auto},{adaround}")
    page.wait_for_selector("#compare-form")  # the job page (and its chart) is gone
    chart = _chart(page)
    assert chart["points"] == str(len(sized[uniform_auto]) + len(sized[adaround])) == "5"
    assert chart["series"] == "3" and chart["fp"] == "1"
    labels = chart["labels"].split("|")
    assert [lab.split(" · ")[:2] for lab in labels] == [["uniform", "calibrate"], ["autobit", "calibrate"], ["uniform", "adaround"]]
    name = client.get(f"/v1/jobs/{adaround}").json()["name"]
    assert name in labels[2] and name in _legend(page)[3]
    assert page.query_selector_all("#main img, #main script") == [] and page.evaluate("window.__pwned") is None
    s.close()


def _shots() -> Path:
    return ROOT / "docs" / "screenshots" if os.environ.get("SSQL_UPDATE_SCREENSHOTS") == "1" else Path(os.environ.get("TMPDIR", "/tmp"))


def _section_box(page) -> dict[str, float]:  # type: ignore[no-untyped-def]
    box = page.query_selector("#pareto").bounding_box()
    page.set_viewport_size({"width": 1400, "height": int(box["y"] + box["height"]) + 40})
    box = page.query_selector("#pareto").bounding_box()
    return {"x": box["x"] - 8, "y": box["y"] - 8, "width": box["width"] + 16, "height": box["height"] + 16}
