"""The dashboard's datasets (issue 16) in a real browser (Debian's Chromium driven by Playwright, as
tests/service/test_dashboard.py) against the real service: an archive uploaded from the page is
listed and becomes ready, a bad one shows its offending file as text, the submit form offers the
ready one as ``upload:<id>`` (and "train on it" selects it), another owner sees none of them.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from tests.service.browser import needs_chromium
from tests.service.test_dashboard import Session
from tests.service.test_storage import good_entries

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium
EVIL = "<img src=x onerror=alert(1)>"



def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return path


def test_datasets_page_upload_list_and_submit_form(stack, api_key: str, other_key: str, browser, shots: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = Session(browser, stack.url, api_key)
    s.sign_in()
    page = s.page
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: d.accept())
    page.click("#nav-datasets")
    page.wait_for_selector("#dataset-form")

    good = _zip(tmp_path / "pets.zip", {**good_entries("pets/"), "pets/train/a/more.png": good_entries()["train/a/0.png"]})
    page.fill("#dataset-name", EVIL)
    page.set_input_files("#dataset-file", str(good))
    page.click("#dataset-submit")
    row = page.wait_for_selector("tr[data-status=ready]", timeout=60_000)
    dataset_id = row.get_attribute("data-dataset-id")
    assert row.query_selector("td.name").inner_text() == EVIL  # a user's text is text
    assert "2 classes, 5 train / 4 val" in row.inner_text()

    bad = _zip(tmp_path / "bad.zip", {**good_entries(), "val/b/broken.jpg": b"\xff\xd8 not a jpeg"})
    page.fill("#dataset-name", "broken")
    page.set_input_files("#dataset-file", str(bad))
    page.click("#dataset-submit")
    bad_row = page.wait_for_selector("tr[data-status=invalid]", timeout=60_000)
    assert "val/b/broken.jpg: does not decode" in bad_row.query_selector("td.ds-error").inner_text()
    page.fill("#dataset-name", "nowhere")
    page.fill("#dataset-uri", "http://example.com/x/")
    page.click("#dataset-submit")
    page.wait_for_function("() => document.querySelector('#dataset-form-error').textContent.includes('uri:')")
    page.screenshot(path=str(shots / "datasets.png"), full_page=True)  # a ready, an invalid and a refused registration

    # the submit form offers the ready dataset; "train on it" selects it; the estimate accepts it
    page.click(f"tr[data-dataset-id='{dataset_id}'] a.button")
    page.wait_for_selector("#submit-form")
    assert page.eval_on_selector("#f-dataset", "el => el.value") == f"upload:{dataset_id}"
    offered = page.eval_on_selector_all("#uploaded-datasets option", "els => els.map(e => [e.value, e.textContent])")
    assert [v for v, _ in offered] == [f"upload:{dataset_id}"] and EVIL in offered[0][1]
    page.fill("#f-max_samples", "16")
    page.click("#estimate-button")
    page.wait_for_function("() => document.querySelector('#estimate').textContent.length > 0")
    assert not page.eval_on_selector("#form-error", "el => el.textContent")

    # deleting it from the page: gone from the list and from the form
    page.goto(stack.url + "/#/datasets")
    page.click(f"tr[data-dataset-id='{dataset_id}'] button[data-delete]")
    page.wait_for_function("id => !document.querySelector(`tr[data-dataset-id='${id}']`)", arg=dataset_id)
    assert not [e for e in errors if "status of 422" not in e], errors  # the 422 is the refused URI's, asked for above
    s.close()

    other = Session(browser, stack.url, other_key)
    other.sign_in()
    other.page.click("#nav-datasets")
    other.page.wait_for_selector("#dataset-form")
    assert other.page.query_selector("#datasets-table") is None  # another owner's datasets are not listed
    other.close()
