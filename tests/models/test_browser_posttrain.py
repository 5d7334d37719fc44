"""Post-training from the browser, on a real worker: a researcher starts SFT from a model's
page with a campaign's labels, watches the job page draw its curves without a reload, and
follows the link to the registered result and its lineage."""

import re
import time

import pytest
from playwright.sync_api import Page, expect

from tests.factories import PASSWORD
from tests.models.test_posttrain_jobs import campaign  # noqa: F401
from tests.services import flush_redis, redis_url, start_worker

pytestmark = [pytest.mark.browser, pytest.mark.services, pytest.mark.django_db(transaction=True)]


def test_a_researcher_fine_tunes_a_model_from_its_page_and_opens_the_result(
    page: Page,
    live_server,
    carol,
    parent,  # noqa: F811
    campaign,  # noqa: F811
    tmp_path,
):
    flush_redis(redis_url())
    worker = start_worker(tmp_path, "posttrain")
    try:
        page.goto(f"{live_server.url}/accounts/login/")
        page.keyboard.type("carol")
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{live_server.url}/")
        page.goto(f"{live_server.url}/models/{parent.pk}/")
        form = page.locator("#posttrain-form")
        form.get_by_label("Algorithm").select_option("sft")
        form.get_by_label("Campaigns").select_option(str(campaign.pk))
        form.get_by_label("Max steps").fill("6")
        form.get_by_label("Epochs").fill("20")
        form.get_by_label("Batch size").fill("2")
        form.get_by_label("Learning rate").fill("0.001")
        for box in form.locator("input[name=suites]").all():
            box.uncheck()
        form.get_by_role("button", name="Start training job").click()
        expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
        page.evaluate("window.__noReload = true")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "succeeded" not in page.inner_text("#job-card"):
            assert "failed" not in page.inner_text("#job-card .badge"), page.inner_text("#job-card")
            time.sleep(0.5)
        expect(page.locator("#job-card .badge")).to_have_text("succeeded")
        assert page.evaluate("window.__noReload") is True  # the card updated in place
        expect(page.locator("#job-card svg[aria-label='loss curve']")).to_be_visible()
        page.locator("#job-card .result-link a").first.click()
        expect(page.locator("h1")).to_contain_text("tiny-base-sft-job")
        expect(page.locator("dl.facts").first).to_contain_text("(trained from) ← tiny-base")
        expect(page.get_by_text("Post-training", exact=True)).to_be_visible()
    finally:
        worker.kill()
