"""Raters in real headless Chromium: keyboard-only grading, and model output that stays inert."""

import re

import pytest
from playwright.sync_api import Page, expect

from grading.models import Label
from tests.factories import PASSWORD, make_campaign, make_items

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _task_ready(page: Page):
    page.wait_for_selector("body[data-keys-ready]")


def _keyboard_login(page: Page, base: str, username: str) -> None:
    page.goto(f"{base}/accounts/login/")
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/grading/")


def test_a_rater_grades_side_by_side_and_single_sided_tasks_with_the_keyboard_only(
    page: Page, live_server, alice
):
    pairwise = make_campaign(name="A pairwise", overlap=1)
    make_items(pairwise, 2)
    single = make_campaign(name="B single", kind="single_sided", overlap=1)
    make_items(single, 1)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _keyboard_login(page, live_server.url, "alice")

    expect(page.locator("button[autofocus]")).to_be_focused()
    page.keyboard.press("Enter")  # "Start grading" on the first campaign has focus
    expect(page).to_have_url(re.compile(r"/grading/task/\d+/$"))
    _task_ready(page)
    page.keyboard.press("2")  # A is better
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("Done 1")
    _task_ready(page)
    page.keyboard.press("5")  # tie, both good
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/grading/$"))
    expect(page.get_by_text("No more tasks")).to_be_visible()

    page.keyboard.press("Tab")  # to the second campaign's button
    page.locator("button:has-text('Start grading')").nth(1).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#task")).to_have_attribute("data-kind", "single_sided")
    _task_ready(page)
    for key in "4325":  # one score per aspect, focus moves down by itself
        page.keyboard.press(key)
    page.keyboard.press("u")
    page.keyboard.press("c")
    page.keyboard.type("Confident but wrong about dates.")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    expect(page.get_by_text("No more tasks")).to_be_visible()

    levels = sorted(Label.objects.filter(campaign=pairwise).values_list("level", flat=True))
    assert levels == ["better", "tie_both_good"]
    better = Label.objects.get(campaign=pairwise, level="better")
    assert better.picked_left is True
    assert better.preferred.position == better.assignment.left_position
    graded = Label.objects.get(campaign=single)
    assert graded.scores == {
        "instruction_following": 4,
        "conciseness": 3,
        "truthfulness": 2,
        "harmlessness": 5,
    }
    assert graded.unsafe and graded.comment == "Confident but wrong about dates."
    assert dialogs == []


def test_skipping_with_the_keyboard_records_the_reason(page: Page, live_server, alice):
    campaign = make_campaign(overlap=1)
    make_items(campaign, 1)
    _keyboard_login(page, live_server.url, "alice")
    expect(page.locator("button[autofocus]")).to_be_focused()
    page.keyboard.press("Enter")
    _task_ready(page)
    page.keyboard.press("s")
    page.keyboard.type("Needs legal expertise")
    page.keyboard.press("Enter")
    expect(page.get_by_text("No more tasks")).to_be_visible()
    from grading.models import Assignment

    assert Assignment.objects.get().skip_reason == "Needs legal expertise"


def test_script_and_onerror_payloads_in_model_output_render_inert(page: Page, live_server, alice):
    campaign = make_campaign(overlap=1)
    item = make_items(campaign, 1)[0]
    payload = (
        "<script>document.title='pwned';window.__xss=1</script>"
        "<img src=x onerror=\"window.__xss=2;alert('xss')\"> Plain **answer**."
    )
    item.responses.update(text=payload)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _keyboard_login(page, live_server.url, "alice")
    expect(page.locator("button[autofocus]")).to_be_focused()
    page.keyboard.press("Enter")
    _task_ready(page)
    assert page.evaluate("window.__xss") is None and dialogs == []
    assert "pwned" not in page.title()
    assert (
        page.locator(".response img").count() == 0 and page.locator(".response script").count() == 0
    )
    expect(page.locator(".response").first).to_contain_text("<script>document.title='pwned'")
    expect(page.locator(".response strong").first).to_have_text("answer")


def test_a_rater_grades_turn_two_of_a_conversation_with_the_keyboard(
    page: Page, live_server, alice
):
    from tests.grading.conversations import FIRST, REPLY, SYSTEM, upload_conversations

    campaign = make_campaign(name="Chats", overlap=1)
    conversations = upload_conversations(campaign, 1)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _keyboard_login(page, live_server.url, "alice")
    expect(page.locator("button[autofocus]")).to_be_focused()
    page.keyboard.press("Enter")
    _task_ready(page)

    history = page.locator("#history")
    expect(history).to_have_attribute("open", "")
    turns = history.locator(".turn")
    expect(turns).to_have_count(3)
    expect(turns.nth(0)).to_contain_text(SYSTEM["content"])
    expect(turns.nth(1).locator(".role")).to_have_text("User")
    expect(turns.nth(1)).to_contain_text("<script>window.__xss=1</script>")  # shown as text
    expect(turns.nth(1).locator("strong")).to_have_text("prime")
    expect(turns.nth(2)).to_contain_text(REPLY["content"])
    graded = page.locator("#graded-turn.graded-turn")
    expect(graded).to_contain_text(conversations[0][-1]["content"])
    assert FIRST["content"][:10] not in graded.inner_text()
    # The earlier turns are quieter than the graded one.
    size = "el => parseFloat(getComputedStyle(el).fontSize)"
    assert history.evaluate(size) < graded.locator(".md").evaluate(size)
    assert "secret-model" not in page.content()

    page.keyboard.press("h")  # fold the history away and back
    expect(history).not_to_have_attribute("open", "")
    page.keyboard.press("h")
    expect(history).to_have_attribute("open", "")
    page.keyboard.press("9")  # B is better
    page.keyboard.press("Enter")
    expect(page.get_by_text("No more tasks")).to_be_visible()

    label = Label.objects.get(campaign=campaign)
    assert label.level == "better" and label.picked_left is False
    assert label.preferred.position == 1 - label.assignment.left_position
    assert page.evaluate("window.__xss") is None and dialogs == []


def _password_login(page: Page, base: str, username: str, lands_on: str) -> None:
    page.goto(f"{base}/accounts/login/")
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}{lands_on}")


def test_enter_with_no_choice_or_scores_says_what_is_missing_on_the_same_page(
    page: Page, live_server, alice
):
    make_items(make_campaign(name="A pairwise", overlap=1), 1)
    make_items(make_campaign(name="B single", kind="single_sided", overlap=1), 1)
    _keyboard_login(page, live_server.url, "alice")
    page.keyboard.press("Enter")
    _task_ready(page)
    url = page.url
    error = page.locator("#task-error")
    expect(error).to_be_hidden()
    page.keyboard.press("Enter")  # no choice yet
    expect(error).to_be_visible()
    expect(error).to_contain_text("Choose how the two responses compare first")
    assert page.url == url and not Label.objects.exists()
    page.keyboard.press("s")
    page.keyboard.press("Enter")  # a skip without a reason
    expect(error).to_contain_text("Say why you skip this task")
    page.keyboard.press("Escape")
    page.keyboard.press("3")
    expect(error).to_be_hidden()
    page.keyboard.press("Enter")
    expect(page.get_by_text("No more tasks")).to_be_visible()
    assert Label.objects.get().level == "slightly_better"

    page.locator("button:has-text('Start grading')").nth(1).focus()
    page.keyboard.press("Enter")
    _task_ready(page)
    page.keyboard.press("4")  # instruction following; three aspects left
    page.keyboard.press("Enter")
    expect(error).to_contain_text(
        "Give a score from 1 to 5 for Conciseness, Truthfulness, Harmlessness"
    )
    expect(page.locator(".aspect.active")).to_have_attribute("data-aspect", "conciseness")
    for key in "345":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    expect(page.get_by_text("No more tasks")).to_be_visible()
    assert Label.objects.filter(campaign__kind="single_sided").get().scores["harmlessness"] == 5


def test_a_campaign_is_created_with_its_file_graded_exported_and_downloaded(
    page: Page, browser, live_server, alice, carol, tmp_path
):
    import json

    from grading.models import Campaign
    from tests.services import flush_redis, redis_url, start_worker

    rows = [
        {
            "prompt": f"Question {i}",
            "response_a": f"First {i}",
            "response_b": f"Second {i}",
            "model_a": "model-one",
            "model_b": "model-two",
        }
        for i in range(2)
    ]
    good = tmp_path / "items.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + '\n{"prompt": "q", "response_a": "a"}\n')
    base = live_server.url
    _password_login(page, base, "carol", "/")

    def create(file):
        page.goto(f"{base}/grading/campaigns/")
        page.get_by_label("Name").fill("Flow")
        page.get_by_label("Overlap").fill("1")
        page.get_by_label("Gold rate").fill("0")
        page.get_by_label("Items").set_input_files(str(file))
        page.get_by_role("button", name="Create campaign").click()

    create(bad)
    expect(page.locator("[data-field=file]").first).to_contain_text("no campaign was created")
    expect(page.locator("[data-field=file]").nth(1)).to_contain_text("row 2: missing 'response_b'")
    assert not Campaign.objects.exists()
    create(good)
    expect(page.get_by_text("Created “Flow” with 2 items.")).to_be_visible()
    campaign = Campaign.objects.get(name="Flow")
    assert campaign.items.count() == 2 and campaign.overlap == 1

    rater = browser.new_page()
    _keyboard_login(rater, base, "alice")
    rater.keyboard.press("Enter")
    for key in "10":  # A significantly better, then B significantly better
        _task_ready(rater)
        rater.keyboard.press(key)
        rater.keyboard.press("Enter")
    expect(rater.get_by_text("No more tasks")).to_be_visible()
    rater.close()
    labels = list(Label.objects.filter(campaign=campaign).select_related("assignment", "preferred"))
    assert [lb.picked_left for lb in sorted(labels, key=lambda lb: lb.pk)] == [True, False]

    page.goto(f"{base}/grading/campaigns/{campaign.pk}/labels/")
    expect(page.get_by_text("“A is significantly better”")).to_be_visible()
    expect(page.get_by_text("“B is significantly better”")).to_be_visible()

    flush_redis(redis_url())
    worker = start_worker(tmp_path, "gradingux-export")
    try:
        page.goto(f"{base}/grading/campaigns/{campaign.pk}/")
        page.get_by_label("Format").select_option("jsonl")
        page.get_by_role("button", name="Export").click()
        expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
        link = page.locator("#download")
        expect(link).to_be_visible(timeout=60_000)
        with page.expect_download() as download:
            link.click()
        exported = [json.loads(line) for line in open(download.value.path())]
    finally:
        worker.kill()
    by_prompt = {row["prompt"]: row for row in exported}
    assert len(exported) == 2
    for label in labels:
        row = by_prompt[label.item.prompt]
        assert row["chosen"] == label.preferred.text
        assert row["chosen_model"] == label.preferred.model_name
        assert row["level"] == "significantly_better" and row["rater"] == "alice"
        shown_left = label.item.responses.get(position=label.assignment.left_position)
        assert (row["chosen"] == shown_left.text) is label.picked_left
