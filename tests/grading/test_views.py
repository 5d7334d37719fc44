"""The access funnel and the pages, with personas: alice and bob (raters), carol (researcher)."""

import html
import json
import re

import pytest
from django.test import Client
from django.urls import reverse

from grading.models import Assignment, Campaign, Item, Label
from grading.services import assignment_claim
from tests.factories import UserFactory, make_campaign, make_items

pytestmark = pytest.mark.django_db

SECRET_MODELS = ("model-x", "model-y")


@pytest.fixture
def campaign():
    c = make_campaign()
    make_items(c, 4, models=SECRET_MODELS)
    return c


def test_a_rater_sees_open_campaigns_and_starts_grading(login, alice, campaign):
    client = login(alice)
    assert campaign.name in client.get(reverse("grading:home")).content.decode()
    response = client.post(reverse("grading:next", args=[campaign.pk]))
    assignment = Assignment.objects.get(rater=alice)
    assert response.url == reverse("grading:task", args=[assignment.pk])


def test_alice_cannot_open_or_submit_or_skip_bobs_task(login, alice, bob, campaign):
    bobs = assignment_claim(rater=bob, campaign=campaign)
    client = login(alice)
    assert client.get(reverse("grading:task", args=[bobs.pk])).status_code == 404
    assert (
        client.post(
            reverse("grading:submit", args=[bobs.pk]), {"choice": "left_better"}
        ).status_code
        == 404
    )
    assert client.post(reverse("grading:skip", args=[bobs.pk]), {"reason": "x"}).status_code == 404
    bobs.refresh_from_db()
    assert bobs.status == "leased" and not Label.objects.exists()


def test_a_rater_cannot_open_researcher_pages(login, alice, campaign):
    client = login(alice)
    for name, args in [
        ("grading:campaigns", []),
        ("grading:campaign", [campaign.pk]),
        ("grading:labels", [campaign.pk]),
        ("grading:download", [1]),
        ("job_list", []),
    ]:
        assert client.get(reverse(name, args=args)).status_code == 403, name
    assert (
        client.post(reverse("grading:export", args=[campaign.pk]), {"format": "jsonl"}).status_code
        == 403
    )


def test_a_rater_not_enrolled_in_a_restricted_campaign_cannot_use_it(login, alice, bob, campaign):
    campaign.raters.add(bob)
    client = login(alice)
    assert campaign.name not in client.get(reverse("grading:home")).content.decode()
    assert client.post(reverse("grading:next", args=[campaign.pk])).status_code == 404


def test_a_researcher_without_the_rater_role_gets_no_tasks(login, carol, campaign):
    assert login(carol).post(reverse("grading:next", args=[campaign.pk])).status_code == 404


def test_model_names_and_response_ids_never_reach_a_rater_page(login, alice, campaign):
    client = login(alice)
    pages = [client.get(reverse("grading:home")).content.decode()]
    response = client.post(reverse("grading:next", args=[campaign.pk]), follow=True)
    pages.append(response.content.decode())
    assignment = Assignment.objects.get(rater=alice)
    pages.append(
        client.post(
            reverse("grading:submit", args=[assignment.pk]), {"choice": "bogus"}
        ).content.decode()
    )
    response_ids = [str(r.pk) for r in assignment.item.responses.all()]
    for page in pages:
        for name in SECRET_MODELS:
            assert name not in page
    task_page = pages[1]
    assert "Answer 0 to item" in task_page and "Answer 1 to item" in task_page
    for rid in response_ids:
        assert f'value="{rid}"' not in task_page and f"response-{rid}" not in task_page


def test_a_forged_choice_gets_a_clear_error_and_changes_nothing(login, alice, campaign):
    client = login(alice)
    client.post(reverse("grading:next", args=[campaign.pk]))
    assignment = Assignment.objects.get(rater=alice)
    response = client.post(
        reverse("grading:submit", args=[assignment.pk]), {"choice": "left_infinitely_better"}
    )
    assert response.status_code == 400
    assert "unknown choice" in response.content.decode()
    assignment.refresh_from_db()
    assert assignment.status == "leased" and not Label.objects.exists()


def test_submitting_moves_straight_to_the_next_task(login, alice, campaign):
    client = login(alice)
    client.post(reverse("grading:next", args=[campaign.pk]))
    first = Assignment.objects.get(rater=alice)
    response = client.post(reverse("grading:submit", args=[first.pk]), {"choice": "tie_both_bad"})
    second = Assignment.objects.filter(rater=alice).exclude(pk=first.pk).get()
    assert response.url == reverse("grading:task", args=[second.pk])
    assert Label.objects.get().level == "tie_both_bad"


def test_a_post_without_csrf_token_is_refused(alice, campaign):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assignment = assignment_claim(rater=alice, campaign=campaign)
    assert (
        client.post(
            reverse("grading:submit", args=[assignment.pk]), {"choice": "left_better"}
        ).status_code
        == 403
    )
    assert not Label.objects.exists()


def test_prompts_and_responses_render_markdown_but_never_markup(login, alice):
    campaign = make_campaign(name="xss")
    item = make_items(campaign, 1)[0]
    item.prompt = "Explain `<b>` and:\n\n```html\n<script>alert(1)</script>\n```"
    item.save()
    item.responses.filter(position=0).update(
        text="<script>document.title='pwned'</script><img src=x onerror=alert(1)> **bold**"
    )
    client = login(alice)
    page = client.post(reverse("grading:next", args=[campaign.pk]), follow=True).content.decode()
    assert "<script>document" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title" in page and "<strong>bold</strong>" in page
    assert '<code class="language-html">&lt;script&gt;alert(1)&lt;/script&gt;' in page


def test_a_researcher_creates_a_campaign_uploads_items_and_sees_the_dashboard(login, carol):
    client = login(carol)
    response = client.post(
        reverse("grading:campaigns"),
        {**CAMPAIGN_FORM, "name": "Arena sample", "threshold_min_gold_accuracy": "0.7"},
    )
    campaign = Campaign.objects.get(name="Arena sample")
    assert response.url == reverse("grading:campaign", args=[campaign.pk])
    from django.core.files.uploadedfile import SimpleUploadedFile

    good = SimpleUploadedFile(
        "items.jsonl", b'{"prompt": "p", "response_a": "a", "response_b": "b"}\n'
    )
    page = client.post(reverse("grading:upload", args=[campaign.pk]), {"file": good}, follow=True)
    assert "Imported 1 items." in page.content.decode()
    bad = SimpleUploadedFile(
        "items.jsonl", b'{"prompt": "p", "response_a": "a", "response_b": "b"}\n{'
    )
    page = client.post(reverse("grading:upload", args=[campaign.pk]), {"file": bad}, follow=True)
    assert "Nothing was imported" in page.content.decode() and "row 2" in page.content.decode()
    assert Item.objects.filter(campaign=campaign).count() == 1
    assert client.get(reverse("grading:labels", args=[campaign.pk])).status_code == 200


def test_the_dashboard_shows_agreement_and_flags_a_biased_rater(login, carol, alice, bob):
    from grading.services import assignment_submit

    campaign = make_campaign(
        overlap=2, thresholds={"min_labels_for_flags": 5, "min_median_seconds": 0}
    )
    make_items(campaign, 12)
    for rater in (alice, bob):
        while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
            choice = "left_better" if rater == alice else "tie_both_good"
            assignment_submit(assignment=a, data={"choice": choice})
    page = login(carol).get(reverse("grading:campaign", args=[campaign.pk])).content.decode()
    assert "pairwise agreement" in page and "Fleiss" in page
    assert "alice" in page and "bob" in page
    assert "left" in page.split("alice")[1].split("</tr>")[0].lower()  # alice's row is flagged


def _api(client, url, token, body=None):
    return client.post(
        url,
        data=json.dumps(body or {}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )


def test_the_rater_api_hands_out_tasks_without_model_names_and_takes_labels(
    client, alice, bob, campaign
):
    from core.models import ApiToken

    _, alice_token = ApiToken.issue(user=alice, name="a")
    _, bob_token = ApiToken.issue(user=bob, name="b")
    response = _api(client, reverse("grading:api_next", args=[campaign.pk]), alice_token)
    task = response.json()["task"]
    assert set(task) == {"id", "context", "prompt", "kind", "expires_at", "left", "right"}
    assert not any(name in response.content.decode() for name in SECRET_MODELS)
    submit_url = reverse("grading:api_submit", args=[task["id"]])
    assert _api(client, submit_url, bob_token, {"choice": "left_better"}).status_code == 404
    bad = _api(client, submit_url, alice_token, {"choice": "left_best"})
    assert bad.status_code == 400 and "unknown choice" in bad.json()["error"]
    ok = _api(client, submit_url, alice_token, {"choice": "left_better"})
    again = _api(client, submit_url, alice_token, {"choice": "right_better"})
    assert ok.status_code == 200 and again.json()["label"] == ok.json()["label"]
    assert Label.objects.get().level == "better"


ADMIN_FORM = {
    "name": "Thresholds",
    "kind": "side_by_side",
    "guidelines": "",
    "overlap": 3,
    "gold_rate": 0.1,
    "lease_seconds": 600,
    "quota_per_rater": "",
    "status": "open",
    "aspects": "[]",
}


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ('{"bogus": 1}', "unknown threshold 'bogus'"),
        ("[1, 2]", "thresholds must be a JSON object"),
        ('"x"', "thresholds must be a JSON object"),
        ("", "thresholds must be a JSON object"),
        ("{not json", "not valid JSON"),
        ('{"min_gold_accuracy": 2}', "between 0 and 1"),
        ('{"min_gold_accuracy": "high"}', "must be a number"),
        ('{"min_gold_accuracy": true}', "must be a number"),
        ('{"min_labels_for_flags": 2.5}', "whole number"),
        ('{"min_gold_accuracy": 1e400}', "not a finite number"),
        ('{"min_gold_accuracy": NaN}', "not a finite number"),
        ('{"a\\u0000": 1}', "NUL"),
        ("[" * 1000 + "]" * 1000, "nested more than 32 levels"),
    ],
)
def test_the_admins_json_thresholds_are_checked(db, thresholds, message):
    from grading.forms import CampaignForm

    form = CampaignForm(data={**ADMIN_FORM, "thresholds": thresholds})
    assert not form.is_valid()
    assert message in " ".join(form.errors["thresholds"]), form.errors


def test_the_admins_json_aspects_are_checked(db):
    from grading.forms import CampaignForm

    for aspects in ('[{"key": "a", "name": "\\u0000"}]', "[" * 100 + "]" * 100, "[1e400]"):
        data = {**ADMIN_FORM, "kind": "single_sided", "aspects": aspects, "thresholds": "{}"}
        form = CampaignForm(data=data)
        assert not form.is_valid() and "aspects" in form.errors, aspects
    form = CampaignForm(data={**ADMIN_FORM, "thresholds": '{"min_labels_for_flags": 5}'})
    assert form.is_valid(), form.errors


CAMPAIGN_FORM = {
    "name": "Thresholds",
    "kind": "side_by_side",
    "guidelines": "",
    "overlap": 3,
    "gold_rate": 0.1,
    "lease_seconds": 600,
    "quota_per_rater": "",
    "status": "open",
}
SBS_ROWS = (
    b'{"prompt": "p1", "response_a": "a", "response_b": "b", "model_a": "m1", "model_b": "m2"}\n'
    b'{"prompt": "p2", "response_a": "c", "response_b": "d"}\n'
)


def _file(content: bytes, name: str = "items.jsonl"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content)


def test_the_new_campaign_form_has_real_widgets_and_the_upload_and_no_json(login, carol):
    page = login(carol).get(reverse("grading:campaigns")).content.decode()
    form = page.split('id="campaign-form"')[1].split("</form>")[0]
    assert 'enctype="multipart/form-data"' in page.split('id="campaign-form"')[0][-200:]
    assert 'type="file" name="file"' in form
    assert 'type="radio" name="kind" value="side_by_side"' in form
    for aspect in ("instruction_following", "conciseness", "truthfulness", "harmlessness"):
        assert f'type="checkbox" name="aspects" value="{aspect}"' in form
        assert f'value="{aspect}" id="id_aspects_' in form  # ticked by default below
    assert form.count("checked") >= 4
    assert 'type="number" name="threshold_min_gold_accuracy" value="0.7"' in form
    assert 'type="number" name="threshold_min_labels_for_flags" value="10"' in form
    assert "null" not in page and "{" not in form.replace("{%", "")


def test_a_campaign_is_created_with_its_upload_in_one_submit(login, carol):
    client = login(carol)
    data = {
        **CAMPAIGN_FORM,
        "name": "One step",
        "kind": "single_sided",
        "aspects": ["conciseness", "truthfulness"],
        "more_aspects": "Tone of voice\n\n  Code  quality ",
        "threshold_min_gold_accuracy": "0.8",
        "threshold_min_labels_for_flags": "",  # left empty: the default
        "file": _file(b'{"prompt": "p", "response": "r", "model": "m"}\n'),
    }
    response = client.post(reverse("grading:campaigns"), data, follow=True)
    campaign = Campaign.objects.get(name="One step")
    assert response.redirect_chain[-1][0] == reverse("grading:campaign", args=[campaign.pk])
    assert "Created “One step” with 1 items." in response.content.decode()
    assert campaign.items.count() == 1 and campaign.created_by == carol
    assert [(a["key"], a["name"]) for a in campaign.aspects] == [
        ("conciseness", "Conciseness"),
        ("truthfulness", "Truthfulness"),
        ("tone_of_voice", "Tone of voice"),
        ("code_quality", "Code quality"),
    ]
    assert campaign.aspects[0]["anchors"]["5"] == "Exactly as long as the request needs."
    assert campaign.thresholds["min_gold_accuracy"] == 0.8
    assert "min_labels_for_flags" not in campaign.thresholds


def test_a_campaign_may_be_created_without_a_file(login, carol):
    response = login(carol).post(reverse("grading:campaigns"), CAMPAIGN_FORM)
    campaign = Campaign.objects.get()
    assert response.url == reverse("grading:campaign", args=[campaign.pk])
    assert campaign.items.count() == 0 and campaign.thresholds == {}


def test_a_bad_file_is_a_400_naming_the_row_and_field_and_creates_no_campaign(login, carol):
    client = login(carol)
    bad = SBS_ROWS + b'{"prompt": "p3", "response_a": "e"}\n'
    response = client.post(reverse("grading:campaigns"), {**CAMPAIGN_FORM, "file": _file(bad)})
    page = html.unescape(response.content.decode())
    assert response.status_code == 400
    assert "Nothing was imported and no campaign was created: 1 problem(s)." in page
    assert "row 3: missing 'response_b'" in page
    assert "choose the file again" in page
    assert not Campaign.objects.exists() and not Item.objects.exists()


def test_a_file_of_the_other_kind_creates_no_campaign(login, carol):
    client = login(carol)
    data = {**CAMPAIGN_FORM, "kind": "single_sided", "aspects": ["conciseness"]}
    response = client.post(reverse("grading:campaigns"), {**data, "file": _file(SBS_ROWS)})
    assert response.status_code == 400 and "row 1" in response.content.decode()
    assert not Campaign.objects.exists()


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"threshold_min_gold_accuracy": "2"}, "threshold_min_gold_accuracy", "less than or"),
        ({"threshold_min_gold_accuracy": "nan"}, "threshold_min_gold_accuracy", "number"),
        ({"threshold_min_gold_accuracy": "inf"}, "threshold_min_gold_accuracy", "number"),
        ({"threshold_min_labels_for_flags": "2.5"}, "threshold_min_labels_for_flags", "whole"),
        ({"threshold_max_left_pick_deviation": "0.6"}, "threshold_max_left_pick_deviation", "0.5"),
        ({"overlap": "0"}, "overlap", "overlap must be between 1 and 50"),
        ({"lease_seconds": "5"}, "lease_seconds", "shorter than 30 seconds"),
        ({"kind": "triple"}, "kind", "Select a valid choice"),
        ({"kind": "single_sided"}, "aspects", "grades at least one aspect"),
        ({"more_aspects": "Conciseness"}, "more_aspects", "'Conciseness' is named twice"),
        ({"more_aspects": "x" * 101}, "more_aspects", "line 1: a name of at most 100"),
        ({"name": ""}, "name", "This field is required"),
        ({"more_aspects": "Tone\x00"}, "more_aspects", "Null characters are not allowed"),
    ],
)
def test_a_bad_field_is_a_400_naming_it_and_creates_nothing(login, carol, fields, field, message):
    client = login(carol)
    data = {**CAMPAIGN_FORM, "aspects": ["conciseness"], **fields, "file": _file(SBS_ROWS)}
    if fields.get("kind") == "single_sided":
        data.pop("aspects")
    response = client.post(reverse("grading:campaigns"), data)
    page = html.unescape(response.content.decode())
    assert response.status_code == 400
    assert any(message in error for error in _field_errors(page, field)), page
    assert "The campaign was not created" in page
    assert not Campaign.objects.exists() and not Item.objects.exists()


def _field_errors(page: str, field: str) -> list[str]:
    return re.findall(rf'<p class="error" role="alert" data-field="{field}">([^<]*)</p>', page)


def test_a_duplicate_campaign_name_is_a_400(login, carol):
    make_campaign(name="Taken")
    response = login(carol).post(reverse("grading:campaigns"), {**CAMPAIGN_FORM, "name": "Taken"})
    assert response.status_code == 400
    assert "already exists" in " ".join(_field_errors(response.content.decode(), "name"))
    assert Campaign.objects.count() == 1


@pytest.mark.parametrize("stored", [{"bogus": 1}, [1, 2], "x", {"min_gold_accuracy": "high"}])
def test_the_dashboard_survives_thresholds_stored_before_they_were_checked(login, carol, stored):
    campaign = make_campaign()
    Campaign.objects.filter(pk=campaign.pk).update(thresholds=stored)
    client = login(carol)
    client.raise_request_exception = False
    response = client.get(reverse("grading:campaign", args=[campaign.pk]))
    assert response.status_code == 200
    assert "thresholds are invalid" in response.content.decode()


def test_the_admin_checks_thresholds_too(admin_user):
    from grading.admin import CampaignAdmin

    assert CampaignAdmin.form.__name__ == "CampaignForm"


def test_a_bad_conversation_upload_is_a_400_naming_the_row_and_message_and_imports_nothing(
    login, carol
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    campaign = make_campaign()
    good = {"role": "user", "content": "<b>hi</b>"}
    rows = [
        {"messages": [good], "response_a": "a", "response_b": "b"},
        {
            "messages": [good, {"role": "user", "content": "x"}],
            "response_a": "a",
            "response_b": "b",
        },
    ]
    upload = SimpleUploadedFile("chats.jsonl", "\n".join(map(json.dumps, rows)).encode())
    response = login(carol).post(reverse("grading:upload", args=[campaign.pk]), {"file": upload})
    page = response.content.decode()
    assert response.status_code == 400 and "Nothing was imported" in page
    assert "row 2: messages[1].role is &#x27;user&#x27; where &#x27;assistant&#x27;" in page
    assert Item.objects.filter(campaign=campaign).count() == 0


def test_the_rater_api_gives_a_conversations_earlier_turns_without_model_names(client, alice):
    from core.models import ApiToken
    from tests.grading.conversations import upload_conversations

    campaign = make_campaign(overlap=1)
    conversations = upload_conversations(campaign, 1)
    _, token = ApiToken.issue(user=alice, name="a")
    task = _api(client, reverse("grading:api_next", args=[campaign.pk]), token).json()["task"]
    assert task["context"] == conversations[0][:-1]
    assert task["prompt"] == conversations[0][-1]["content"]
    assert {task["left"], task["right"]} == {"Two (0).", "Four (0)."}
    assert "secret-model" not in json.dumps(task)


def _claimed(client, campaign, rater):
    client.post(reverse("grading:next", args=[campaign.pk]))
    return Assignment.objects.get(rater=rater, status="leased")


def test_submitting_without_a_choice_is_a_400_on_the_task_page_naming_the_choice(
    login, alice, campaign
):
    client = login(alice)
    assignment = _claimed(client, campaign, alice)
    response = client.post(reverse("grading:submit", args=[assignment.pk]), {})
    page = html.unescape(response.content.decode())
    assert response.status_code == 400
    assert "no choice given: choose which response is better, or a tie" in page
    assert 'id="label-form"' in page and "unknown choice" not in page  # the task, not a bare page
    assignment.refresh_from_db()
    assert assignment.status == "leased" and not Label.objects.exists()


def test_a_single_sided_submit_missing_a_score_names_it_and_keeps_the_others(login, alice):
    campaign = make_campaign(kind="single_sided")
    make_items(campaign, 1)
    client = login(alice)
    assignment = _claimed(client, campaign, alice)
    given = {"score_instruction_following": "4", "score_conciseness": "2", "comment": "<b>hm</b>"}
    response = client.post(reverse("grading:submit", args=[assignment.pk]), given)
    page = response.content.decode()
    assert response.status_code == 400 and "give truthfulness a score from 1 to 5" in page
    assert 'name="score_instruction_following" value="4" checked' in page
    assert 'name="score_conciseness" value="2" checked' in page
    assert page.count(" checked>") == 2
    assert "&lt;b&gt;hm&lt;/b&gt;</textarea>" in page
    assert not Label.objects.exists()


def test_a_forged_choice_is_refused_but_an_unknown_value_is_never_echoed_as_markup(
    login, alice, campaign
):
    client = login(alice)
    assignment = _claimed(client, campaign, alice)
    response = client.post(
        reverse("grading:submit", args=[assignment.pk]), {"choice": "<script>x</script>"}
    )
    assert response.status_code == 400 and "<script>x" not in response.content.decode()


def test_skipping_without_a_reason_is_a_400_on_the_task_page(login, alice, campaign):
    client = login(alice)
    assignment = _claimed(client, campaign, alice)
    response = client.post(reverse("grading:skip", args=[assignment.pk]), {"reason": "  "})
    assert response.status_code == 400
    assert "say why you skip this task" in response.content.decode()
    assignment.refresh_from_db()
    assert assignment.status == "leased"


def _label_with_left(campaign, rater, left: int, choice: str) -> Label:
    assignment = assignment_claim(rater=rater, campaign=campaign)
    Assignment.objects.filter(pk=assignment.pk).update(left_position=left)
    assignment.refresh_from_db()
    from grading.services import assignment_submit

    assignment_submit(assignment=assignment, data={"choice": choice})
    return Label.objects.get(assignment=assignment)


def _label_rows(page: str) -> list[str]:
    return page.split("<tbody>")[1].split("</tbody>")[0].split("</tr>")[:-1]


def test_the_label_browser_shows_what_the_rater_pressed_and_the_winner_apart(
    login, alice, bob, carol, campaign
):
    # Alice saw the upload's response_b (model-y) on the left and pressed 1, "A is
    # significantly better"; Bob saw it on the right and pressed 6, a tie.
    label = _label_with_left(campaign, alice, 1, "left_significantly_better")
    assert label.preferred.model_name == "model-y"
    _label_with_left(campaign, bob, 0, "tie_both_bad")
    page = login(carol).get(reverse("grading:labels", args=[campaign.pk])).content.decode()
    page = html.unescape(page)
    rows = {row.split("<td>")[2].split("<")[0]: row for row in _label_rows(page)}
    alices = rows["alice"]
    assert "Pressed <kbd>1</kbd> “A is significantly better”" in alices
    assert "A (left): model-y · B (right): model-x" in alices
    assert "Winner: <strong>model-y</strong> (the upload's response_b)" in alices
    assert "(B) significantly better" not in alices
    bobs = rows["bob"]
    assert "Pressed <kbd>6</kbd> “Tie: both bad”" in bobs
    assert "A (left): model-x · B (right): model-y" in bobs
    assert "No winner: tie both bad" in bobs


def test_the_label_browser_shows_single_sided_aspects_by_name(login, alice, carol):
    from grading.services import assignment_submit

    campaign = make_campaign(kind="single_sided")
    make_items(campaign, 1)
    scores = {"instruction_following": 5, "conciseness": 4, "truthfulness": 2, "harmlessness": 3}
    assignment = assignment_claim(rater=alice, campaign=campaign)
    assignment_submit(assignment=assignment, data={"scores": scores, "comment": "<i>ok</i>"})
    page = login(carol).get(reverse("grading:labels", args=[campaign.pk])).content.decode()
    (row,) = _label_rows(page)
    assert (
        "Instruction following <strong>5</strong> · Conciseness <strong>4</strong> · "
        "Truthfulness <strong>2</strong> · Harmlessness <strong>3</strong>"
    ) in row
    assert "&lt;i&gt;ok&lt;/i&gt;" in row and "instruction_following=" not in row


def test_the_label_browser_makes_no_query_per_label(login, alice, bob, carol, campaign):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client = login(carol)
    _label_with_left(campaign, alice, 0, "left_better")
    with CaptureQueriesContext(connection) as one:
        client.get(reverse("grading:labels", args=[campaign.pk]))
    for _ in range(2):
        _label_with_left(campaign, bob, 1, "right_better")
        bob = UserFactory()
        bob.groups.add(alice.groups.first())
    with CaptureQueriesContext(connection) as three:
        client.get(reverse("grading:labels", args=[campaign.pk]))
    assert len(three) == len(one)


def test_an_export_in_an_unknown_format_is_a_400_on_the_campaign_page(login, carol, campaign):
    from core.models import Job

    response = login(carol).post(reverse("grading:export", args=[campaign.pk]), {"format": "xlsx"})
    page = response.content.decode()
    assert response.status_code == 400 and "Select a valid choice. xlsx" in page
    assert "Export labels" in page and not Job.objects.exists()
