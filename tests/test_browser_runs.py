"""The run page in real headless Chromium: a limited run's page goes from queued to running to
succeeded by itself, counting samples with a rate and an ETA, and marks the score partial."""

import pytest
from playwright.sync_api import Page, expect

from core.models import Job
from evalhub.models import EvalRun, ModelVersion
from suites import REGISTRY
from tests.factories import PASSWORD
from tests.test_run_pages import AlwaysA, Tiny, evaluate

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def log_in(page: Page, base: str, username: str) -> None:
    page.goto(f"{base}/accounts/login/")
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/")


def test_the_run_page_follows_a_partial_run_without_a_reload(
    page: Page, live_server, carol, monkeypatch
):
    monkeypatch.setitem(REGISTRY, "tiny", Tiny)  # the live server runs in this process
    model = ModelVersion.objects.create(name="policy-a", backend="hf", location="/nowhere")
    run = EvalRun.objects.create(
        model=model, suite="tiny", settings={"limit": 4, "seed": 1, "batch_size": 2}
    )
    log_in(page, live_server.url, "carol")
    run.job = Job.objects.create(kind="evaluate", params={"run_id": run.pk})  # not yet picked up
    run.save(update_fields=["job"])
    page.goto(f"{live_server.url}/runs/{run.pk}/")
    expect(page.locator("#run-status")).to_have_text("queued")
    expect(page.locator("#partial-mark")).to_contain_text("partial")
    page.evaluate("window.__noReload = true")

    counts = page.locator("#run-counts")
    seen = []

    def watch(batch: int) -> None:
        """Before each batch is answered, the page must already show the last one's samples."""
        expect(page.locator("#run-status")).to_have_text("running", timeout=10_000)
        expect(counts).to_contain_text(f"{2 * batch} / 4 samples", timeout=10_000)
        seen.append(counts.inner_text())

    job = evaluate(run, AlwaysA(before_batch=watch))
    assert job.status == "succeeded", job.error

    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=10_000)
    expect(page.locator("#metrics")).to_contain_text("acc")
    expect(page.locator("#partial-mark")).to_contain_text("4 of 12 examples, seed 1")
    expect(page.locator("#samples tbody tr")).to_have_count(4)
    assert page.evaluate("window.__noReload") is True  # htmx swapped it in place
    assert "per min · ETA" in seen[1], seen  # a rate once a batch is in
