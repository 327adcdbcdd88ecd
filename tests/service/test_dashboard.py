"""The dashboard in a real browser: Debian's Chromium (/usr/bin/chromium, installed by .ci/run)
driven by Playwright's Python package (no browser of Playwright's own is downloaded), against the
real service in embedded mode. The page's Content-Security-Policy forbids eval, so every
``wait_for_function`` is given a function, not an expression (which Playwright would eval).

Screenshots of each page go to a temporary folder; to update the README's copies in
docs/screenshots/:  SSQL_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest -q tests/service/test_dashboard.py
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ssql_cli.stack import Stack, free_port
from ssql_client import Client
from tests.service.browser import needs_chromium
from tests.service.conftest import TINY, clean_env

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium
T = 240_000  # ms: tiny jobs on a small, busy CPU


def _key(env: dict[str, str], name: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ssql_cli.main", "keys", "create", name], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("dashboard_home")
    env = clean_env(SSQL_HOME=str(home), SSQL_DEVICE="cpu", SSQL_TORCH_THREADS="1")
    key, other = _key(env, "fiona"), _key(env, "gus")
    stack = Stack(env, free_port(), log_dir=home / "logs")
    stack.start(timeout=120)
    yield stack, key, other
    stack.stop()


@pytest.fixture(scope="module")
def finished(service):  # type: ignore[no-untyped-def]
    """A pretrain (fp + 4w4a files) and two eval jobs of it, made through the client."""
    stack, key, _other = service
    c = Client(stack.url, key)
    pre = c.wait(c.pretrain(**{k: v for k, v in TINY.items() if k != "kind"}, epochs=2, export_bits=["fp", "4w4a"])["id"], poll_s=0.3)
    assert pre["status"] == "succeeded", pre
    evals = []
    for bits in (["fp", "4w4a", "2w4a"], ["fp", "8w8a", "4w4a", "2w4a"]):
        ev = c.wait(c.evaluate(pre["id"], bits, epochs=1, calib_images=16, max_samples=64)["id"], poll_s=0.3)
        assert ev["status"] == "succeeded", ev
        evals.append(ev["id"])
    return pre["id"], evals




class Session:
    """One browser context signed in with one key; records every URL the page requested."""

    def __init__(self, browser, url: str, key: str) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.urls: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.set_default_timeout(60_000)
        self.url, self.key = url, key

    def sign_in(self) -> None:
        self.page.goto(self.url + "/")
        self.page.fill("#api-key", self.key)
        self.page.click("#signin-form button[type=submit]")
        self.page.wait_for_selector("#jobs-table")

    def close(self) -> None:
        self.context.close()


def test_sign_in_rejects_a_bad_key_and_keeps_the_key_out_of_urls(service, browser, shots) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    s = Session(browser, stack.url, "not-a-key")
    s.page.goto(stack.url + "/")
    s.page.screenshot(path=str(shots / "signin.png"))
    s.page.fill("#api-key", "not-a-key")
    s.page.click("#signin-form button[type=submit]")
    s.page.wait_for_function("() => document.querySelector('#signin-error').textContent.length > 0")
    s.key = key
    s.sign_in()
    assert s.page.evaluate("localStorage.getItem('ssql.apiKey')") == key  # kept per browser (issue 18), not per tab
    assert s.page.evaluate("sessionStorage.length") == 0
    assert not [u for u in s.urls if key in u]
    s.close()


def test_submit_from_the_form_and_watch_it_finish(service, browser, shots) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    s = Session(browser, stack.url, key)
    s.sign_in()
    page = s.page
    page.goto(stack.url + "/#/submit?kind=pretrain")
    page.wait_for_selector("#submit-form")
    # the choices come from /v1/catalog
    methods = page.eval_on_selector_all("#f-method option", "os => os.map(o => o.value).filter(Boolean)")
    catalog = Client(stack.url, key).catalog()
    assert sorted(methods) == sorted(catalog["methods"])
    assert page.eval_on_selector_all("#f-export_bits input", "xs => xs.map(x => x.value)") == catalog["bits"]["paper_set"]
    page.select_option("#f-method", "ssql")
    page.wait_for_selector("#method-options .field")  # the method's own options appear
    page.select_option("#f-dataset", "synthetic")
    page.select_option("#f-backbone", "resnet18")
    for name in ("batch_size", "image_size", "width", "max_samples"):
        page.fill(f"#f-{name}", str(TINY[name]))
    page.click("details summary")
    page.fill("#f-checkpoint_every_steps", "4")
    for box in page.query_selector_all("#f-export_bits input"):
        if box.get_attribute("value") != "fp":
            box.uncheck()
    # a 422 shows at the field it names
    page.fill("#f-epochs", "100000")
    page.click("#submit")
    page.wait_for_selector(".field.invalid[data-field=epochs]")
    assert "1000" in page.text_content("#err-epochs")
    page.screenshot(path=str(shots / "submit-422.png"), full_page=True)
    page.fill("#f-epochs", "3")
    page.click("#submit")
    page.wait_for_url("**/#/job/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#job-head .progress")
    fractions: list[float] = []
    page.expose_function("seen", lambda f: fractions.append(float(f)))
    page.evaluate("""() => new MutationObserver(() => { const p = document.querySelector('#job-head .progress');
        if (p) window.seen(p.dataset.fraction); }).observe(document.querySelector('#job-head'), {childList: true, subtree: true})""")
    page.wait_for_selector("#job-head .progress[data-fraction='1']", timeout=T)  # the bar at 100 %
    page.wait_for_selector("#job-head .status.succeeded", timeout=T)  # (then the exports, and the end)
    assert page.get_attribute("#job-head .progress .bar", "aria-valuenow") == "100"
    assert fractions and fractions[-1] == 1.0  # it got there live, without a reload
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('==> attempt 1 <==')", timeout=30_000)
    page.wait_for_selector("#chart-loss canvas")
    # the page loaded the job while it was queued: the times came with the event stream
    assert re.fullmatch(r"\d\d:\d\d", page.text_content("#job-duration")), page.text_content("#job-duration")
    assert "null" not in page.inner_text("#job-head")
    page.screenshot(path=str(shots / "job.png"), full_page=True)
    page.goto(stack.url + "/#/jobs")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{job_id}']")
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    assert not [u for u in s.urls if key in u]
    s.close()


def test_results_chart_and_compare(service, finished, browser, shots) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    _pre, (ev1, ev2) = finished
    s = Session(browser, stack.url, key)
    s.sign_in()
    page = s.page
    page.goto(f"{stack.url}/#/job/{ev1}")
    page.wait_for_selector("#results-chart canvas")
    chart = page.query_selector("#results-chart")
    assert chart.get_attribute("data-points") == "2" and chart.get_attribute("data-bits") == "4w4a,2w4a"
    assert page.eval_on_selector_all("#results-table tbody tr", "rs => rs.map(r => r.cells[0].textContent)") == ["fp", "4w4a", "2w4a"]
    page.screenshot(path=str(shots / "results.png"), full_page=True)
    page.goto(f"{stack.url}/#/compare?jobs={ev1},{ev2}")
    page.wait_for_selector("#compare-form")
    page.wait_for_selector("#results-chart[data-series='2'] canvas")
    chart = page.query_selector("#results-chart")
    assert chart.get_attribute("data-series") == "2" and chart.get_attribute("data-points") == "5"
    assert chart.get_attribute("data-bits") == "8w8a,4w4a,2w4a"  # the paper's order
    # each series says what it is: method, calibration, probe, the job and its pretrain, ids as written
    labels = page.eval_on_selector_all("#results-table thead th", "ths => ths.slice(1).map(t => t.innerText)")
    configs = [Client(stack.url, key).job(ev)["spec"]["config"] for ev in (ev1, ev2)]
    assert labels == [f"ssql · {c['calibration']} · {c['probe']} probe · eval {ev[:8]} · pretrain {_pre[:8]}"
                      for ev, c in zip((ev1, ev2), configs, strict=True)], labels
    assert page.eval_on_selector("#results-table thead th", "t => getComputedStyle(t).textTransform") == "none"
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    assert not [u for u in s.urls if key in u]
    s.close()


def test_download_a_checkpoint_with_its_sha256(service, finished, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    pre, _evals = finished
    s = Session(browser, stack.url, key)
    s.sign_in()
    page = s.page
    page.goto(f"{stack.url}/#/job/{pre}")
    button = page.wait_for_selector("#checkpoints button.dl[data-bits='4w4a'][data-format='safetensors']")
    # an SSQL pretrain: how often each bit pair was drawn, over its 8 steps (2 epochs x 4)
    counts = page.eval_on_selector_all("#bit-pairs tr td:nth-child(2)", "tds => tds.map(t => Number(t.textContent))")
    assert sum(counts) == 8 and counts == sorted(counts, reverse=True), counts
    expected = button.get_attribute("data-sha256")
    listed = {(c["bits"], c["format"]): c["sha256"] for c in Client(stack.url, key).checkpoints(pre)}
    assert expected == listed[("4w4a", "safetensors")]
    with page.expect_download() as info:
        button.click()
    dest = tmp_path / "4w4a.safetensors"
    info.value.save_as(str(dest))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected
    page.wait_for_function("() => [...document.querySelectorAll('#checkpoints button.dl')].some(b => b.textContent.includes('verified'))")
    assert not [u for u in s.urls if key in u]  # fetched with the header, saved from a blob: URL
    s.close()


def test_another_owner_sees_none_of_the_jobs(service, finished, browser) -> None:  # type: ignore[no-untyped-def]
    stack, key, other = service
    pre, evals = finished
    s = Session(browser, stack.url, other)
    s.sign_in()
    page = s.page
    page.wait_for_selector("#jobs-empty:not([hidden])")
    assert page.query_selector_all("#jobs-body tr") == []
    page.goto(f"{stack.url}/#/job/{pre}")
    page.wait_for_selector(".errorbox")
    assert "not found" in page.text_content(".errorbox")
    page.goto(f"{stack.url}/#/compare")
    page.wait_for_selector("text=No succeeded jobs yet.")
    assert not [u for u in s.urls if other in u or key in u]
    s.close()


# -- issue 18: the defects a new user met -----------------------------------------------------------


@pytest.fixture(scope="module")
def derived(service, finished):  # type: ignore[no-untyped-def]
    """An export job (2w4a of the pretrain) and a 2-epoch finetune job of it."""
    stack, key, _other = service
    pre, _evals = finished
    c = Client(stack.url, key)
    ex = c.wait(c.export(pre, {"bits": ["2w4a"], "formats": ["safetensors"]})["id"], poll_s=0.3)
    ft = c.wait(c.finetune(pre, "4w4a", epochs=2, batch_size=16, max_samples=64, calib_images=16, baseline_epochs=1)["id"], poll_s=0.3)
    assert ex["status"] == "succeeded" and ft["status"] == "succeeded", (ex, ft)
    return ex["id"], ft["id"]


def _ticks(page, chart: str) -> list[str]:  # type: ignore[no-untyped-def]
    return page.get_attribute(f"{chart}", "data-y-ticks").split("|")


def test_signed_out_shows_no_nav_and_one_sign_in_serves_every_tab(service, browser) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    s = Session(browser, stack.url, key)
    s.page.goto(stack.url + "/")
    s.page.wait_for_selector("#signin-form")
    assert not s.page.is_visible("#nav") and not s.page.is_visible("#signout")  # `hidden` wins over nav's display
    s.sign_in()
    assert s.page.is_visible("#signout")
    second = s.context.new_page()  # another tab of the same browser: no second sign-in
    second.goto(stack.url + "/#/jobs")
    second.wait_for_selector("#jobs-table")
    second.click("#signout")  # signing out in one tab signs out the others
    second.wait_for_selector("#signin-form")
    s.page.wait_for_selector("#signin-form")
    assert s.page.evaluate("localStorage.getItem('ssql.apiKey')") is None
    assert not s.page.is_visible("#nav") and not second.is_visible("#nav")
    s.close()


def test_job_pages_of_every_kind(service, finished, derived, browser, shots) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    pre, (ev1, _ev2) = finished
    ex, ft = derived
    c = Client(stack.url, key)
    s = Session(browser, stack.url, key)
    s.sign_in()
    page = s.page
    # pretrain: curves over the optimisation step (not the sample's index), tick labels that differ
    page.goto(f"{stack.url}/#/job/{pre}")
    page.wait_for_selector("#chart-lr canvas")
    steps = [m["step"] for m in c.metrics(pre)["items"]]
    assert page.get_attribute("#chart-loss", "data-x") == ",".join(map(str, sorted(set(steps))))
    for chart in ("#chart-lr", "#chart-z_std", "#chart-loss"):
        ticks = _ticks(page, chart)
        assert len(ticks) >= 2 and len(set(ticks)) == len(ticks), (chart, ticks)
    assert page.text_content("#progress-detail") == "epoch 2/2 · step 8/8 · pretrain"
    secondary = page.eval_on_selector(".actions a.button.secondary", "a => getComputedStyle(a).backgroundColor")
    assert secondary == "rgb(255, 255, 255)"  # a secondary link-button looks secondary, not primary
    assert "null" not in page.inner_text("#main")
    # eval: one loss line per bit-width's probe, over that probe's epochs; no empty panels
    page.goto(f"{stack.url}/#/job/{ev1}")
    page.wait_for_selector("#results-chart canvas")
    page.wait_for_selector("#chart-loss canvas")
    assert page.get_attribute("#chart-loss", "data-series") == "3" and page.get_attribute("#chart-loss", "data-x") == "1"
    assert page.eval_on_selector_all("#charts .chart", "cs => cs.map(c => c.id)") == ["chart-loss"]  # no empty lr/images_per_s panels
    assert page.text_content("#progress-detail") == "probe 2w4a (3/3) · epoch 1/1 · linear"
    assert "null" not in page.inner_text("#main")
    page.screenshot(path=str(shots / "job-eval.png"), full_page=True)
    # export: no curves at all, the files it wrote (served under the pretrain)
    page.goto(f"{stack.url}/#/job/{ex}")
    page.wait_for_selector("#export-files #checkpoints")
    assert page.query_selector_all(".chart") == [] and page.query_selector("#curves-note") is None
    assert page.eval_on_selector_all("#export-files #checkpoints tbody tr", "rs => rs.map(r => r.cells[0].textContent)") == ["2w4a"]
    assert "null" not in page.inner_text("#main")
    page.screenshot(path=str(shots / "job-export.png"), full_page=True)
    # finetune: test top-1 per epoch, with the PTQ + linear-probe baseline it is measured against
    page.goto(f"{stack.url}/#/job/{ft}")
    page.wait_for_selector("#finetune-chart canvas")
    (row,) = c.result_rows(ft)
    assert page.get_attribute("#finetune-chart", "data-points") == "2" and page.get_attribute("#finetune-chart", "data-series") == "3"
    shown = page.text_content("#finetune-summary dd[data-key='PTQ + linear probe top-1']")
    assert shown == f"{row['ptq_linear_top1']:.2f}"
    assert page.query_selector("#results-chart") is None  # no one-point top-1-vs-bits chart
    page.screenshot(path=str(shots / "job-finetune.png"), full_page=True)
    s.close()


def test_submit_form_defaults_ranges_and_every_bad_field(service, finished, browser, shots) -> None:  # type: ignore[no-untyped-def]
    stack, key, _other = service
    pre, _evals = finished
    defaults = Client(stack.url, key).catalog()["defaults"]
    s = Session(browser, stack.url, key)
    s.sign_in()
    page = s.page
    page.goto(f"{stack.url}/#/submit?kind=eval&source_job={pre}")
    page.wait_for_selector("#submit-form")
    assert page.text_content("h1") == "Submit an eval job"
    assert page.get_attribute("#f-epochs", "placeholder") == f"default {defaults['eval']['epochs']}"
    calibration = defaults["eval"]["calibration"]
    assert page.eval_on_selector("#f-calibration option", "o => o.textContent") == f"(default: {calibration or 'not set'})"
    page.goto(f"{stack.url}/#/submit?kind=pretrain")  # (the eval form stays until the pretrain one is built: wait for it)
    page.wait_for_function("() => document.querySelector('h1').textContent === 'Submit a pretrain job'")
    assert page.get_attribute("#f-epochs", "placeholder") == f"default {defaults['pretrain']['epochs']}"
    assert page.eval_on_selector("#f-method option", "o => o.textContent") == f"(default: {defaults['pretrain']['method']})"
    # one range per field, this server's (SSQL_MAX_EPOCHS 1000), in the help and in the 422
    assert "from 1 to 1000" in page.inner_text(".field[data-field=epochs]") and "10000" not in page.inner_text(".field[data-field=epochs]")
    page.fill("#f-epochs", "0")
    page.fill("#f-batch_size", "1")
    page.fill("#f-lr", "-1")
    page.click("#submit")
    page.wait_for_selector(".field.invalid[data-field=lr]")
    invalid = page.eval_on_selector_all(".field.invalid", "fs => fs.map(f => f.dataset.field)")
    assert sorted(invalid) == ["batch_size", "epochs", "lr"], invalid
    assert page.text_content("#err-epochs") == "must be between 1 and 1000 on this server, got 0"
    page.screenshot(path=str(shots / "submit-422.png"), full_page=True)
    s.close()


def test_jobs_page_shows_the_quota_and_its_usage(service, browser) -> None:  # type: ignore[no-untyped-def]
    """Issue 19: the dashboard shows the caller's quota (GET /v1/usage); embedded mode (SQLite)."""
    stack, _key, other = service
    done = subprocess.run([sys.executable, "-m", "ssql_cli.main", "owners", "set-quota", "gus", "--max-active-jobs", "0"],
                          env=stack.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    s = Session(browser, stack.url, other)
    try:
        s.sign_in()
        s.page.wait_for_function("() => document.querySelector('#usage').textContent.length > 0")
        text = s.page.text_content("#usage") or ""
        assert "0 of 0 queued + running jobs" in text and "no limit" in text, text
        assert "refused now" in text and "max_active_jobs" in text, text
        assert "fair-share weight 1" in text, text  # decision 019
    finally:
        s.close()
        subprocess.run([sys.executable, "-m", "ssql_cli.main", "owners", "set-quota", "gus", "--max-active-jobs", "default"],
                       env=stack.env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_names_and_tags_are_text_and_the_filter_lives_in_the_url(service, finished, browser, shots) -> None:  # type: ignore[no-untyped-def]
    """User-written text is shown as text, never markup (a `<script>` name runs nothing); the job
    list's filters are in the page URL, so a link reproduces the view."""
    stack, key, _other = service
    pre, (ev1, _ev2) = finished
    c = Client(stack.url, key)
    evil = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    c.update(pre, name=evil, tags=["xss", "paper"], notes="<b>not bold</b>")
    c.update(ev1, name="plain eval", tags=["paper"])
    s = Session(browser, stack.url, key)
    s.sign_in()
    page = s.page
    page.goto(f"{stack.url}/#/jobs?tag=xss")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{pre}']")
    assert page.eval_on_selector_all("#jobs-body tr", "rs => rs.map(r => r.dataset.jobId)") == [pre]  # the URL's filter applied
    assert page.text_content(f"#jobs-body tr[data-job-id='{pre}'] td.name") == evil
    assert page.input_value("#filter-tag") == "xss"
    assert page.query_selector_all("#main script, #main img") == []
    # change the filter on the page: the URL follows, and the rows
    page.fill("#filter-tag", "paper")
    page.press("#filter-tag", "Enter")
    page.wait_for_function("() => location.hash.includes('tag=paper')")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{ev1}']")
    page.select_option("#filter-sort", "name")
    page.wait_for_function("() => location.hash.includes('sort=name')")
    page.wait_for_selector(f"#jobs-body tr:first-child[data-job-id='{pre}']")  # '<' sorts before 'p'
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    # pages, with the filters kept
    page.goto(f"{stack.url}/#/jobs?tag=paper&sort=name&limit=1")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{pre}']")
    assert page.query_selector("#page-prev") is None
    page.click("#page-next")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{ev1}']")
    assert "tag=paper" in page.evaluate("() => location.hash") and len(page.query_selector_all("#jobs-body tr")) == 1
    assert page.query_selector("#page-next") is None and page.query_selector("#page-prev") is not None
    # the job page, and editing the labels there (a bad tag: 422 shown as text)
    page.goto(f"{stack.url}/#/job/{pre}")
    page.wait_for_selector("#job-name")
    assert page.text_content("#job-name") == evil and page.text_content("#job-notes") == "<b>not bold</b>"
    assert page.query_selector_all("#main script, #main img, #job-notes b") == []
    page.click("#labels summary")
    page.fill("#edit-tags", "xss, <b>")
    page.click("#labels-form button[type=submit]")
    page.wait_for_function("() => document.querySelector('#labels-error').textContent.includes('tags')")
    assert page.query_selector_all("#labels-error b") == []
    page.fill("#edit-tags", "xss, renamed")
    page.fill("#edit-name", "a name")
    page.click("#labels-form button[type=submit]")
    page.wait_for_function("() => document.querySelector('#job-name').textContent === 'a name'")
    assert c.job(pre)["tags"] == ["xss", "renamed"]
    assert page.evaluate("window.__pwned") is None
    csp = httpx.get(stack.url + "/").headers["content-security-policy"]  # and had one slipped through: only our own scripts run
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    s.close()


def test_submit_form_estimates_the_cost_without_queueing(service, browser) -> None:  # type: ignore[no-untyped-def]
    """Issue 19: the form's "Estimate cost" is a dry run (POST /v1/jobs?dry_run=1): an estimate, no job."""
    stack, key, _other = service
    before = len(Client(stack.url, key).jobs(limit=1000)["items"])
    s = Session(browser, stack.url, key)
    try:
        s.sign_in()
        page = s.page
        page.goto(stack.url + "/#/submit?kind=pretrain")
        page.wait_for_selector("#submit-form")
        page.select_option("#f-dataset", "synthetic")
        for name in ("batch_size", "image_size", "width", "max_samples"):
            page.fill(f"#f-{name}", str(TINY[name]))
        page.click("#estimate-button")
        page.wait_for_selector("#estimate:not(:empty)")
        text = page.text_content("#estimate") or ""
        assert "device-hours" in text and "GB per device" in text, text
        page.fill("#f-batch_size", "1")  # a bad field: marked at the field, no estimate
        page.click("#estimate-button")
        page.wait_for_selector(".field.invalid")
    finally:
        s.close()
    assert len(Client(stack.url, key).jobs(limit=1000)["items"]) == before
