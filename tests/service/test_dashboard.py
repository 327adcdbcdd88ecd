"""The dashboard in a real browser: Debian's Chromium (/usr/bin/chromium, installed by .ci/run)
driven by Playwright's Python package (no browser of Playwright's own is downloaded), against the
real service in embedded mode.

Screenshots of each page go to a temporary folder; to update the README's copies in
docs/screenshots/:  SSQL_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest -q tests/service/test_dashboard.py
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssql_cli.stack import Stack, free_port
from ssql_client import Client
from tests.service.conftest import TINY, clean_env

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
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


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("SSQL_UPDATE_SCREENSHOTS") == "1":
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("screenshots")


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
    s.page.wait_for_function("document.querySelector('#signin-error').textContent.length > 0")
    s.key = key
    s.sign_in()
    assert s.page.evaluate("sessionStorage.getItem('ssql.apiKey')") == key
    assert s.page.evaluate("localStorage.length") == 0
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
    page.wait_for_function("document.querySelector('#log').textContent.includes('==> attempt 1 <==')", timeout=30_000)
    page.wait_for_selector("#chart-loss canvas")
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
    page.wait_for_function("[...document.querySelectorAll('#checkpoints button.dl')].some(b => b.textContent.includes('verified'))")
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
    page.wait_for_selector("text=No succeeded eval jobs yet.")
    assert not [u for u in s.urls if other in u or key in u]
    s.close()
