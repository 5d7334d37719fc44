"""Jobs pages, the jobs API, roles, CSRF and /healthz through Django's test client."""

import json
from unittest import mock

import pytest
from django.test import Client
from django.urls import reverse

from core.jobs import KINDS
from core.models import ApiToken, Job

pytestmark = pytest.mark.django_db


def test_anonymous_users_are_sent_to_the_login_page(client):
    response = client.get(reverse("job_list"))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_a_rater_cannot_open_the_jobs_pages(login, alice):
    job = Job.objects.create(kind="demo")
    client = login(alice)
    for url in (reverse("job_list"), reverse("job_table"), reverse("job_detail", args=[job.pk])):
        assert client.get(url).status_code == 403
    assert client.post(reverse("job_cancel", args=[job.pk])).status_code == 403
    job.refresh_from_db()
    assert job.status == "queued"


def test_a_researcher_sees_live_progress_that_polls_only_while_active(login, carol):
    running = Job.objects.create(kind="demo", status="running", progress=0.4, message="chunk 8/20")
    client = login(carol)
    page = client.get(reverse("job_list")).content.decode()
    assert 'aria-valuenow="40"' in page and "chunk 8/20" in page
    assert 'hx-trigger="every 1s"' in page
    running.succeed({"primes": 3})
    partial = client.get(reverse("job_table"), HTTP_HX_REQUEST="true").content.decode()
    assert "succeeded" in partial and "hx-trigger" not in partial


def test_a_failed_job_shows_its_error_and_traceback_to_researchers(login, carol):
    job = Job.objects.create(kind="demo")
    job.fail("ValueError: nope", "Traceback (most recent call last):\n  boom")
    page = login(carol).get(reverse("job_detail", args=[job.pk])).content.decode()
    assert "ValueError: nope" in page and "Traceback (most recent call last)" in page


def test_a_researcher_cancels_a_running_job(login, carol):
    job = Job.objects.create(kind="demo", status="running")
    response = login(carol).post(reverse("job_cancel", args=[job.pk]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == "cancelled"


def test_a_cancel_post_without_csrf_token_is_refused(carol):
    job = Job.objects.create(kind="demo", status="running")
    client = Client(enforce_csrf_checks=True)
    client.force_login(carol)
    assert client.post(reverse("job_cancel", args=[job.pk])).status_code == 403
    job.refresh_from_db()
    assert job.status == "running"


def test_the_jobs_api_submits_with_a_bearer_token(
    client, carol, django_capture_on_commit_callbacks
):
    _, raw = ApiToken.issue(user=carol, name="ci")
    with mock.patch.object(KINDS["demo"], "apply_async") as enqueue:
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(
                reverse("api_jobs"),
                data=json.dumps({"kind": "demo", "params": {"steps": 2}}),
                content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {raw}",
            )
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert job.created_by == carol and job.params == {"steps": 2}
    enqueue.assert_called_once()


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "malformed"),
        (b'{"params": {}}', "malformed"),
        (b'{"kind": "demo", "params": [1]}', "params must be an object"),
        (b'{"kind": "format_disk"}', "unknown job kind"),
    ],
)
def test_the_jobs_api_rejects_bad_requests_and_creates_nothing(client, carol, body, message):
    _, raw = ApiToken.issue(user=carol, name="ci")
    response = client.post(
        reverse("api_jobs"),
        data=body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )
    assert response.status_code == 400 and message in response.json()["error"]
    assert not Job.objects.exists()


def test_the_jobs_api_refuses_bad_tokens_and_raters(client, alice):
    assert (
        client.get(reverse("api_jobs"), HTTP_AUTHORIZATION="Bearer evh_forged").status_code == 401
    )
    _, raw = ApiToken.issue(user=alice, name="mine")
    assert client.get(reverse("api_jobs"), HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 403


def test_a_revoked_token_no_longer_authenticates(client, carol):
    token, raw = ApiToken.issue(user=carol, name="old")
    token.revoked_at = token.created_at
    token.save(update_fields=["revoked_at"])
    assert client.get(reverse("api_jobs"), HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


def test_a_session_call_to_the_api_needs_a_csrf_token(carol):
    client = Client(enforce_csrf_checks=True)
    client.force_login(carol)
    response = client.post(
        reverse("api_jobs"), data='{"kind": "demo"}', content_type="application/json"
    )
    assert response.status_code == 403 and "CSRF" in response.json()["error"]
    assert not Job.objects.exists()


def test_healthz_is_ok_when_database_and_broker_answer(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "down": [], "database": "ok", "broker": "ok"}


def test_login_page_logs_a_user_in(client, carol):
    from tests.factories import PASSWORD

    response = client.post(reverse("login"), {"username": "carol", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get(reverse("job_list")).status_code == 200


def test_healthz_tells_anonymous_callers_what_is_down_but_not_the_drivers_error(client, admin_user):
    leak = "Error 111 connecting to broker.internal:6379. Connection refused."
    with mock.patch("evalhub.views.app.connection_for_write", side_effect=OSError(leak)):
        anonymous = client.get("/healthz")
        client.force_login(admin_user)
        admin = client.get("/healthz")
    assert anonymous.status_code == 503
    assert anonymous.json() == {
        "status": "down",
        "down": ["broker"],
        "database": "ok",
        "broker": "error",
    }
    assert "broker.internal" not in anonymous.content.decode()
    assert admin.status_code == 503 and "broker.internal:6379" in admin.json()["broker"]


def test_bootstrap_names_demo_campaigns_without_their_models_and_renames_old_ones():
    from django.core.management import call_command

    from grading.models import Campaign
    from grading.quality import model_names_shown_to_raters

    call_command("bootstrap", "--no-models", stdout=mock.MagicMock())
    campaigns = list(Campaign.objects.all())
    assert len(campaigns) == 2
    for campaign in campaigns:
        assert campaign.items.exists() and model_names_shown_to_raters(campaign) == []
        models = set(campaign.items.values_list("responses__model_name", flat=True)) - {""}
        assert models and not any(m.casefold() in campaign.name.casefold() for m in models)
    # An install bootstrapped with the old names gets them replaced on the next run.
    Campaign.objects.filter(name__startswith="Arena").update(
        name="Arena-Hard v2.0: o3-mini vs gemini-2.0-flash"
    )
    call_command("bootstrap", "--no-models", stdout=mock.MagicMock())
    assert not Campaign.objects.filter(name__contains="o3-mini").exists()


def test_an_upload_warns_when_the_campaign_name_shows_a_model(login, carol):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.factories import make_campaign

    campaign = make_campaign(name="gpt-4o vs llama")
    row = b'{"prompt": "p", "response_a": "a", "response_b": "b", "model_a": "GPT-4o"}'
    page = login(carol).post(
        reverse("grading:upload", args=[campaign.pk]),
        {"file": SimpleUploadedFile("a.jsonl", row)},
        follow=True,
    )
    assert "Imported 1 items." in page.content.decode()
    assert "mention the model &#x27;GPT-4o&#x27;" in page.content.decode()
