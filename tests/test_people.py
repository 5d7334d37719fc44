"""The People page: admins add raters and researchers, set roles, deactivate accounts and issue
or revoke API tokens; everyone else gets 403 and changes nothing."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from playwright.sync_api import Page, expect

from core.models import ApiToken
from tests.factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db
User = get_user_model()


def _roles(user) -> set[str]:
    return set(user.groups.values_list("name", flat=True))


def _api_status(raw: str) -> int:
    return Client().get(reverse("api_jobs"), HTTP_AUTHORIZATION=f"Bearer {raw}").status_code


def _posts(user) -> list[tuple[str, dict]]:
    token, _ = ApiToken.issue(user=user, name="theirs")
    return [
        (reverse("person_add"), {"username": "mallory", "roles": ["admin"]}),
        (reverse("person_roles", args=[user.pk]), {"roles": ["admin"]}),
        (reverse("person_active", args=[user.pk]), {"active": "false"}),
        (reverse("person_password", args=[user.pk]), {}),
        (reverse("person_token", args=[user.pk]), {"name": "stolen"}),
        (reverse("person_token_revoke", args=[user.pk, token.pk]), {}),
    ]


@pytest.mark.parametrize("persona", ["alice", "carol"])
def test_raters_and_researchers_get_403_and_change_nothing(request, login, persona, bob):
    client = login(request.getfixturevalue(persona))
    assert client.get(reverse("people")).status_code == 403
    assert client.get(reverse("person", args=[bob.pk])).status_code == 403
    password = bob.password
    for url, data in _posts(bob):
        assert client.post(url, data).status_code == 403, url
    bob.refresh_from_db()
    assert bob.is_active and bob.password == password and _roles(bob) == {"rater"}
    assert not User.objects.filter(username="mallory").exists()
    assert list(ApiToken.objects.filter(user=bob).values_list("name", "revoked_at")) == [
        ("theirs", None)
    ]


def test_anonymous_users_are_sent_to_the_login_page(client, bob):
    response = client.get(reverse("people"))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    response = client.post(reverse("person_add"), {"username": "x", "roles": ["admin"]})
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    assert not User.objects.filter(username="x").exists()


def test_the_nav_links_the_people_page_for_admins_only(login, admin_user, carol):
    assert reverse("people") in login(admin_user).get(reverse("home")).content.decode()
    assert reverse("people") not in login(carol).get(reverse("home")).content.decode()


def test_the_list_shows_each_users_roles_and_live_tokens_in_a_few_queries(
    login, admin_user, alice, carol, django_assert_max_num_queries
):
    for i in range(20):
        UserFactory(username=f"extra{i}")
    ApiToken.issue(user=carol, name="a")
    revoked, _ = ApiToken.issue(user=carol, name="b")
    revoked.revoked_at = revoked.created_at
    revoked.save(update_fields=["revoked_at"])
    client = login(admin_user)
    with django_assert_max_num_queries(8):
        page = client.get(reverse("people")).content.decode()
    carol_row = re.search(r'<tr data-user="carol">.*?</tr>', page, re.S).group(0)
    assert '<td class="roles">researcher</td>' in carol_row
    assert '<td class="tokens">1</td>' in carol_row
    assert '<td class="roles">rater</td>' in re.search(r'data-user="alice">.*?</tr>', page, re.S)[0]


def test_an_admin_adds_a_researcher_whose_password_is_shown_once_and_works(login, admin_user):
    client = login(admin_user)
    response = client.post(
        reverse("person_add"),
        {"username": "dana", "email": "dana@example.org", "roles": ["researcher"]},
    )
    assert response.status_code == 200
    dana = User.objects.get(username="dana")
    assert _roles(dana) == {"researcher"} and dana.email == "dana@example.org" and dana.is_active
    password = re.search(r'<code id="secret-value">([^<]+)</code>', response.content.decode())[1]
    assert Client().login(username="dana", password=password)
    assert password not in client.get(reverse("person", args=[dana.pk])).content.decode()


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"username": "Carol", "roles": ["rater"]}, "username", "already exists"),
        ({"username": "eve", "roles": ["overlord"]}, "roles", "overlord is not one of"),
        ({"username": "eve"}, "roles", "This field is required"),
        ({"username": "e ve<script>", "roles": ["rater"]}, "username", "Enter a valid username"),
        ({"username": "", "roles": ["rater"]}, "username", "This field is required"),
        ({"username": "eve", "email": "not-mail", "roles": ["rater"]}, "email", "valid email"),
    ],
)
def test_a_bad_new_user_is_a_400_naming_the_field_and_creates_nobody(
    login, admin_user, carol, data, field, message
):
    before = User.objects.count()
    response = login(admin_user).post(reverse("person_add"), data)
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert list(errors) == [field] and message in errors[field][0]
    assert f'id="id_{field}_error"' in response.content.decode()
    assert User.objects.count() == before
    assert "<script>" not in response.content.decode()


def test_posts_without_a_csrf_token_are_refused(admin_user, carol):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = client.post(reverse("person_add"), {"username": "eve", "roles": ["admin"]})
    assert response.status_code == 403
    assert client.post(reverse("person_token", args=[carol.pk]), {"name": "x"}).status_code == 403
    assert not User.objects.filter(username="eve").exists()
    assert not ApiToken.objects.exists()


def test_an_admin_changes_roles_and_an_unknown_role_changes_nothing(login, admin_user, alice):
    client = login(admin_user)
    url = reverse("person_roles", args=[alice.pk])
    assert client.post(url, {"roles": ["rater", "researcher"]}).status_code == 302
    assert _roles(alice) == {"rater", "researcher"}
    response = client.post(url, {"roles": ["rater", "god"]})
    assert response.status_code == 400 and "roles" in response.context["roles_form"].errors
    assert _roles(alice) == {"rater", "researcher"}


def test_an_admin_cannot_remove_their_own_admin_role_or_deactivate_themselves(login, admin_user):
    client = login(admin_user)
    response = client.post(reverse("person_roles", args=[admin_user.pk]), {"roles": ["rater"]})
    assert response.status_code == 400
    assert "your own admin role" in response.context["roles_form"].errors["roles"][0]
    response = client.post(reverse("person_active", args=[admin_user.pk]), {"active": "false"})
    assert response.status_code == 400 and b"active: you cannot deactivate" in response.content
    admin_user.refresh_from_db()
    assert admin_user.is_active and _roles(admin_user) == {"admin"}


def test_a_deactivated_user_can_neither_log_in_nor_use_a_token(login, admin_user, carol):
    _, raw = ApiToken.issue(user=carol, name="ci")
    assert _api_status(raw) == 200
    client = login(admin_user)
    url = reverse("person_active", args=[carol.pk])
    assert client.post(url, {"active": "sometimes"}).status_code == 400
    assert client.post(url, {"active": "false"}).status_code == 302
    assert _api_status(raw) == 401
    assert not Client().login(username="carol", password=PASSWORD)
    assert client.post(url, {"active": "true"}).status_code == 302
    assert _api_status(raw) == 200


def test_an_issued_token_is_shown_once_works_and_stops_working_when_revoked(
    login, admin_user, carol
):
    client = login(admin_user)
    response = client.post(reverse("person_token", args=[carol.pk]), {"name": "<b>ci</b>"})
    page = response.content.decode()
    raw = re.search(r'<code id="secret-value">(evh_[^<]+)</code>', page)[1]
    assert "no-store" in response["Cache-Control"]
    assert "&lt;b&gt;ci&lt;/b&gt;" in page and "<b>ci</b>" not in page
    token = ApiToken.objects.get(user=carol)
    assert raw not in token.key_hash and _api_status(raw) == 200
    assert raw not in client.get(reverse("person", args=[carol.pk])).content.decode()

    revoke = reverse("person_token_revoke", args=[carol.pk, token.pk])
    assert client.post(revoke).status_code == 302
    assert _api_status(raw) == 401
    assert client.post(revoke).status_code == 302  # a second revoke is harmless
    elsewhere = reverse("person_token_revoke", args=[admin_user.pk, token.pk])
    assert client.post(elsewhere).status_code == 404


def test_an_empty_token_name_is_a_400_naming_it(login, admin_user, carol):
    response = login(admin_user).post(reverse("person_token", args=[carol.pk]), {"name": ""})
    assert response.status_code == 400 and list(response.context["token_form"].errors) == ["name"]
    assert not ApiToken.objects.exists()


def test_a_new_password_replaces_the_old_one(login, admin_user, carol):
    response = login(admin_user).post(reverse("person_password", args=[carol.pk]))
    password = re.search(r'<code id="secret-value">([^<]+)</code>', response.content.decode())[1]
    assert not Client().login(username="carol", password=PASSWORD)
    assert Client().login(username="carol", password=password)


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_an_admin_adds_a_researcher_and_issues_a_token_in_the_browser(
    page: Page, live_server, admin_user
):
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name=re.compile("log in", re.I)).click()
    page.get_by_role("link", name="People").click()
    expect(page).to_have_url(f"{live_server.url}/people/")

    page.get_by_label("Username").fill("dana")
    page.get_by_label("Email").fill("dana@example.org")
    page.get_by_label("rater").uncheck()
    page.get_by_label("researcher").check()
    page.get_by_role("button", name="Add").click()
    expect(page.locator("#secret h2")).to_have_text("Password")
    expect(page.locator("#roles")).to_have_text("researcher")
    password = page.locator("#secret-value").inner_text()

    page.get_by_label("Name").fill("notebook")
    page.get_by_role("button", name="Issue token").click()
    expect(page.locator("#secret h2")).to_have_text("New API token")
    raw = page.locator("#secret-value").inner_text()
    expect(page.locator("#tokens tbody tr")).to_have_count(1)
    expect(page.locator("#tokens tbody tr td").first).to_have_text("notebook")

    dana = User.objects.get(username="dana")
    assert _roles(dana) == {"researcher"} and Client().login(username="dana", password=password)
    assert _api_status(raw) == 200

    page.get_by_role("link", name="← People").click()
    expect(page.locator('tr[data-user="dana"] .roles')).to_have_text("researcher")
    expect(page.locator('tr[data-user="dana"] .tokens')).to_have_text("1")
