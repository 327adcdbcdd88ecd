"""Issue 18 items 3 and 4 in a real browser (Debian's Chromium driven by Playwright, as
tests/service/test_dashboard.py) against the real service on Postgres: the jobs list's selection
and the compare page (curves overlaid with values at the cursor, top-1 vs bit-width labelled by
name, method, calibration and probe, CSV of the selection), a job page's chain and reuse (the
exact spec, the command, "Clone" filling the submit form), a 10,000-step curve under 1 MB, every
user-written string shown as text, and no console errors. The jobs are rows (runs_chain.py).

Screenshots: SSQL_UPDATE_SCREENSHOTS=1 writes compare.png and job-lineage.png to docs/screenshots/.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
import pytest

from tests.service import runs_chain
from tests.service.browser import needs_chromium
from tests.service.runs_chain import EVIL_NAME, FORMULA_NAME, STEPS, Chain

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium
MB = 1_000_000


@pytest.fixture(scope="module")
def chain(client: httpx.Client, other_client: httpx.Client, sessions) -> Chain:  # type: ignore[no-untyped-def]
    return runs_chain.build(client, sessions)




class Page:
    """A signed-in page that records what it fetched (bytes per URL) and every console error."""

    def __init__(self, browser, url: str, key: str) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.errors: list[str] = []
        self.bytes: dict[str, int] = {}
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfinished", self._sized)
        self.url = url
        self.page.goto(url + "/")
        self.page.fill("#api-key", key)
        self.page.click("#signin-form button[type=submit]")
        self.page.wait_for_selector("#jobs-table")

    def _sized(self, request) -> None:  # type: ignore[no-untyped-def]
        """What a finished request brought: its headers and body as sent (Chromium reports 0 for
        some static files, so the body's own length counts when larger)."""
        sizes = request.sizes()
        response = request.response()
        body = len(response.body()) if response is not None and response.status == 200 else 0
        wire = sizes["responseHeadersSize"] + max(sizes["responseBodySize"], body)
        self.bytes[request.url] = self.bytes.get(request.url, 0) + wire

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], self.errors


def test_a_job_page_with_a_10000_step_curve_stays_under_1_mb(stack, api_key: str, chain: Chain, browser) -> None:  # type: ignore[no-untyped-def]
    s = Page(browser, stack.url, api_key)
    page = s.page
    # a cold load of the page itself: every file fetched again (no browser cache), then counted
    s.context.new_cdp_session(page).send("Network.setCacheDisabled", {"cacheDisabled": True})
    page.goto("about:blank")
    s.bytes.clear()
    page.goto(f"{stack.url}/#/job/{chain.pretrain}")
    page.wait_for_selector("#chart-loss canvas")
    page.wait_for_selector("#lineage-tree")
    page.wait_for_selector("#cli-command")
    page.wait_for_load_state("networkidle")
    metric_urls = [u for u in s.bytes if "/metrics" in u]
    assert len(metric_urls) == 1 and "max_points=" in metric_urls[0], metric_urls
    assert s.bytes[metric_urls[0]] < MB
    assert any(u.endswith("/static/app.js") for u in s.bytes) and any("uPlot" in u for u in s.bytes)  # the scripts counted too
    assert sum(s.bytes.values()) < MB, sorted(s.bytes.items(), key=lambda kv: -kv[1])[:5]
    steps = [int(x) for x in page.get_attribute("#chart-loss", "data-x").split(",")]
    assert steps[0] == 1 and steps[-1] == STEPS and len(steps) < STEPS
    assert {runs_chain.SPIKE_AT + 1, runs_chain.DIP_AT + 1} <= set(steps)  # the extremes are drawn
    # the chain, with links down to every job made from it; the names are text
    tree = page.eval_on_selector_all("#lineage-tree li", "ls => ls.map(l => [l.dataset.jobId, Number(l.dataset.depth)])")
    assert tree == [[chain.pretrain, 0], [chain.eval1, 1], [chain.distill, 2], [chain.export, 2], [chain.eval2, 1], [chain.finetune, 1]]
    links = page.eval_on_selector_all("#lineage-tree a", "as => as.map(a => a.getAttribute('href'))")
    assert links == [f"#/job/{j}" for j in (chain.eval1, chain.distill, chain.export, chain.eval2, chain.finetune)]
    assert page.text_content(f"#lineage-tree li[data-job-id='{chain.pretrain}'] .name") == EVIL_NAME
    assert page.text_content("#job-name") == EVIL_NAME
    assert page.query_selector_all("#main script, #main img") == [] and page.evaluate("window.__pwned") is None
    # the exact spec and the command that makes the job again
    reproduce = httpx.get(f"{stack.url}/v1/jobs/{chain.pretrain}/reproduce", headers={"Authorization": f"Bearer {api_key}"}).json()
    assert page.text_content("#cli-command") == reproduce["cli"]
    assert json.loads(page.text_content("#spec")) == chain.specs[chain.pretrain]
    assert "null" not in page.inner_text("#main")  # (the spec's JSON nulls sit in a closed <details>)
    # links the other way: a distill job's page leads up to its eval and pretrain
    page.goto(f"{stack.url}/#/job/{chain.distill}")
    page.wait_for_selector("#lineage-parents")
    ups = page.eval_on_selector_all("#lineage-parents a", "as => as.map(a => a.getAttribute('href'))")
    assert ups == [f"#/job/{chain.pretrain}", f"#/job/{chain.eval1}"]
    s.close()


def test_clone_fills_the_submit_form_with_the_jobs_spec(stack, api_key: str, chain: Chain, browser) -> None:  # type: ignore[no-untyped-def]
    s = Page(browser, stack.url, api_key)
    page = s.page
    for job_id in (chain.eval2, chain.pretrain, chain.finetune):
        page.goto(f"{stack.url}/#/job/{job_id}")
        page.click("#clone")
        page.wait_for_selector("#clone-note")
        reproduce = httpx.get(f"{stack.url}/v1/jobs/{job_id}/reproduce", headers={"Authorization": f"Bearer {api_key}"}).json()
        # what the form would send is the job's request: every field, as it was
        sent = page.evaluate("() => readForm(document.querySelector('#submit-form'))")
        want = {k: v for k, v in reproduce["request"].items() if k != "kind"}
        if "method_options" in want:  # the form sends a method's options as top-level fields (the server merges them)
            want.update(want.pop("method_options"))
        assert sent == want, (job_id, sent, want)
    # and the server, asked for the cost of the form as it stands, takes it as is
    page.click("#estimate-button")
    page.wait_for_selector("#estimate:not(:empty)")
    assert "device-hours" in page.text_content("#estimate") and page.query_selector_all(".field.invalid") == []
    s.close()


def test_select_on_the_jobs_list_and_compare(stack, api_key: str, chain: Chain, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = Page(browser, stack.url, api_key)
    page = s.page
    page.goto(f"{stack.url}/#/jobs?tag=runs-test")
    for job_id in (chain.eval1, chain.eval2):
        page.check(f"#jobs-body tr[data-job-id='{job_id}'] input.select")
    page.goto(f"{stack.url}/#/jobs")  # the selection survives another view of the list
    page.check(f"#jobs-body tr[data-job-id='{chain.distill}'] input.select")
    page.check(f"#jobs-body tr[data-job-id='{chain.finetune}'] input.select")
    assert page.text_content("#compare-selected") == "Compare selected (4)"
    page.click("#compare-selected")
    page.wait_for_selector("#results-chart[data-series='4'] canvas")
    page.wait_for_selector("#compare-loss canvas")
    # top-1 vs bit-width: one series per job, labelled by name, method, calibration and probe
    labels = page.eval_on_selector_all("#results-table thead th", "ths => ths.slice(1).map(t => t.textContent)")
    c1, c2 = (chain.specs[j]["config"] for j in (chain.eval1, chain.eval2))
    assert labels[0] == f"{FORMULA_NAME} · ssql · {c1['calibration']} · {c1['probe']} probe · eval {chain.eval1[:8]} · pretrain {chain.pretrain[:8]}"
    assert labels[1] == f"paper preset · ssql · minmax · linear probe · eval {chain.eval2[:8]} · pretrain {chain.pretrain[:8]}"
    assert labels[2].startswith("ssql · distill lsq · distill ") and labels[3].startswith("ssql · finetune psq · finetune ")
    # the curves of the jobs that train over steps, overlaid; each series' value at the cursor in the legend
    assert page.get_attribute("#compare-loss", "data-series") == "2"
    assert page.get_attribute("#compare-loss", "data-labels").split("|") == labels[2:]
    assert chain.eval1[:8] in page.text_content("#curves-skipped")
    over = page.query_selector("#compare-loss .u-over").bounding_box()
    page.mouse.move(over["x"] + over["width"] * 0.3, over["y"] + over["height"] / 2)
    values = page.eval_on_selector_all("#compare-loss .u-legend .u-series .u-value", "vs => vs.map(v => v.textContent)")
    assert len(values) == 3 and all(v not in ("", "–", "--") for v in values), values
    lr_values = page.eval_on_selector_all("#compare-lr .u-legend .u-series .u-value", "vs => vs.map(v => v.textContent)")
    assert all(v not in ("", "–", "--") for v in lr_values), lr_values  # the lr chart's cursor follows (synced)
    # the selection's results and every metric sample, as CSV files
    with page.expect_download() as info:
        page.click("#csv-results")
    info.value.save_as(str(tmp_path / "r.csv"))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert {r["job_id"] for r in rows} == {chain.eval1, chain.eval2, chain.distill, chain.finetune} and len(rows) == 8
    assert {r["job_name"] for r in rows if r["job_id"] == chain.eval1} == {"'" + FORMULA_NAME}
    with page.expect_download() as info:
        page.click("#csv-metrics")
    info.value.save_as(str(tmp_path / "m.csv"))
    metrics = list(csv.DictReader(io.StringIO((tmp_path / "m.csv").read_text())))
    assert len(metrics) == 3 + 0 + 50 + 50  # every sample of the four jobs (eval 1: its 3 probes; eval 2 reported none)
    s.close()


def test_another_owner_compares_nothing_of_alices(stack, other_key: str, chain: Chain, browser) -> None:  # type: ignore[no-untyped-def]
    s = Page(browser, stack.url, other_key)
    page = s.page
    page.goto(f"{stack.url}/#/compare?jobs={chain.eval1},{chain.eval2}")
    page.wait_for_selector(".errorbox")
    assert "not found" in page.text_content(".errorbox")
    page.goto(f"{stack.url}/#/job/{chain.foreign}")
    page.wait_for_selector("#lineage")
    assert chain.pretrain not in page.inner_html("#lineage")  # its source is alice's: not in its chain
    s.errors = [e for e in s.errors if "404" not in e]  # the refused fetches of alice's jobs
    s.close()


def test_screenshots_of_the_compare_and_job_pages(stack, api_key: str, client: httpx.Client, chain: Chain, browser, shots) -> None:  # type: ignore[no-untyped-def]
    """The README's pictures, with names a person would give (the tests above used hostile ones)."""
    for job_id, name in ((chain.pretrain, "r18 ssql synthetic"), (chain.eval1, "eval mse bn"), (chain.eval2, "eval paper preset"),
                         (chain.distill, "distill lsq 4w4a"), (chain.finetune, "finetune psq 4w4a")):
        assert client.patch(f"/v1/jobs/{job_id}", json={"name": name}).status_code == 200
    s = Page(browser, stack.url, api_key)
    page = s.page
    page.goto(f"{stack.url}/#/compare?jobs={chain.eval1},{chain.eval2},{chain.distill},{chain.finetune}")
    page.wait_for_selector("#results-chart canvas")
    page.wait_for_selector("#compare-lr canvas")
    over = page.query_selector("#compare-loss .u-over").bounding_box()
    page.mouse.move(over["x"] + over["width"] * 0.4, over["y"] + over["height"] / 2)
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    page.goto(f"{stack.url}/#/job/{chain.eval1}")
    page.wait_for_selector("#lineage-tree")
    page.wait_for_selector("#cli-command")
    page.wait_for_selector("#results-chart canvas")
    page.screenshot(path=str(shots / "job-lineage.png"), full_page=True)
    s.close()
