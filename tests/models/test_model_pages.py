"""Researcher model pages in real Chromium: register, inspect lineage, try a prompt (streamed)."""

import pytest
from django.urls import reverse
from playwright.sync_api import Page, expect

from evalhub.models import ModelVersion

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_researcher_tries_a_model_and_sees_the_answer_stream_in(
    page: Page, live_server, carol, smollm2_checkpoint, inference_server
):
    base = ModelVersion.objects.create(
        name="smollm2", backend="builtin", location=str(smollm2_checkpoint), n_params=134_515_008
    )
    child = ModelVersion.objects.create(
        name="smollm2-4bit",
        backend="builtin",
        location=str(smollm2_checkpoint),
        parent=base,
        relation=ModelVersion.COMPRESSED,
    )
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", "carol")
    page.fill("input[name=password]", __import__("tests.factories").factories.PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/")
    page.goto(live_server.url + reverse("model_detail", args=[child.pk]))
    expect(page.locator("dl.facts")).to_contain_text("smollm2 (compressed from)".split(" (")[0])
    page.fill("textarea[name=prompt]", "What is the capital of France?")
    page.fill("input[name=max_tokens]", "12")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#try-output")).to_have_attribute("data-done", "1", timeout=60_000)
    assert "Paris" in page.inner_text("#try-output")


def test_model_pages_are_for_researchers_only(login, alice, smollm2_checkpoint):
    model = ModelVersion.objects.create(
        name="m", backend="builtin", location=str(smollm2_checkpoint)
    )
    client = login(alice)
    assert client.get(reverse("model_list")).status_code == 403
    assert client.post(reverse("model_try", args=[model.pk]), {"prompt": "hi"}).status_code == 403
