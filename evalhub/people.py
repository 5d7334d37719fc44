"""People: accounts, their roles (the groups of ``core.access``) and their API tokens, as the
admins' People page changes them. Secrets (a new password, a new token) are returned once and
never stored in the clear."""

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models import Count, Prefetch, Q
from django.utils import timezone

from core.access import ADMIN, ROLES
from core.models import ApiToken


class PeopleError(ValueError):
    """A change the page refuses (an admin locking themselves out); ``field`` names the input."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def people_list():
    """Every user with their groups and their count of live tokens, in three queries."""
    return (
        get_user_model()
        .objects.annotate(tokens=Count("apitoken", filter=Q(apitoken__revoked_at__isnull=True)))
        .prefetch_related(Prefetch("groups", queryset=Group.objects.only("name")))
        .order_by("username")
    )


def roles_of(user) -> list[str]:
    """The user's role names in ``ROLES`` order (groups prefetched or not)."""
    names = {group.name for group in user.groups.all()}
    return [role for role in ROLES if role in names]


def user_create(*, username: str, email: str, roles: list[str]) -> tuple[object, str]:
    """A new active user in ``roles`` with a random password, returned once."""
    password = secrets.token_urlsafe(12)
    with transaction.atomic():
        user = get_user_model().objects.create_user(
            username=username, email=email, password=password
        )
        user.groups.set(_groups(roles))
    return user, password


def user_set_roles(*, user, roles: list[str], by) -> None:
    """Replace the user's roles; an admin may not take the admin role from themselves."""
    if user.pk == by.pk and ADMIN in roles_of(user) and ADMIN not in roles:
        raise PeopleError("you cannot remove your own admin role", field="roles")
    with transaction.atomic():
        user.groups.set(_groups(roles))


def user_set_active(*, user, active: bool, by) -> None:
    """Deactivate (no login, no token works) or reactivate; never one's own account."""
    if user.pk == by.pk and not active:
        raise PeopleError("you cannot deactivate your own account", field="active")
    user.is_active = active
    user.save(update_fields=["is_active"])


def user_reset_password(*, user) -> str:
    """Set a new random password and return it once."""
    password = secrets.token_urlsafe(12)
    user.set_password(password)
    user.save(update_fields=["password"])
    return password


def token_revoke(*, user, token_id: int) -> bool:
    """Revoke one of the user's live tokens; False if there is no such live token."""
    live = ApiToken.objects.filter(pk=token_id, user=user, revoked_at__isnull=True)
    return bool(live.update(revoked_at=timezone.now()))


def _groups(roles: list[str]) -> list[Group]:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise PeopleError(f"unknown role {unknown[0]!r}", field="roles")
    return [Group.objects.get_or_create(name=role)[0] for role in roles]
