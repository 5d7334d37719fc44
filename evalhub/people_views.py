"""The People page (admins only): add raters and researchers, set roles, deactivate accounts,
reset passwords, issue and revoke API tokens. A new password or token is shown once, in the
response to the POST that made it."""

from django import forms
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.db.models import F
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from core.access import ADMIN, ROLES, role_required
from core.models import ApiToken
from evalhub.people import (
    PeopleError,
    people_list,
    roles_of,
    token_revoke,
    user_create,
    user_reset_password,
    user_set_active,
    user_set_roles,
)

admin_required = role_required(ADMIN)
ROLE_CHOICES = [(role, role) for role in ROLES]


class AddUserForm(forms.Form):
    username = forms.CharField(max_length=150, help_text="letters, digits and @ . + - _")
    email = forms.EmailField(required=False)
    roles = forms.MultipleChoiceField(choices=ROLE_CHOICES, widget=forms.CheckboxSelectMultiple)

    def clean_username(self) -> str:
        username = self.cleaned_data["username"]
        User = get_user_model()
        User.username_validator(username)
        if User.objects.filter(username__iexact=username).exists():
            raise forms.ValidationError(f"a user named {username!r} already exists")
        return username


class RolesForm(forms.Form):
    roles = forms.MultipleChoiceField(
        choices=ROLE_CHOICES, required=False, widget=forms.CheckboxSelectMultiple
    )


class ActiveForm(forms.Form):
    active = forms.TypedChoiceField(
        choices=[("true", "active"), ("false", "deactivated")], coerce=lambda v: v == "true"
    )


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, initial="cli", help_text="what the token is for")


@admin_required
def people(request, form: AddUserForm | None = None, status: int = 200):
    users = [(user, roles_of(user)) for user in people_list()]
    context = {"users": users, "form": form or AddUserForm(initial={"roles": ["rater"]})}
    return render(request, "evalhub/people.html", context, status=status)


@require_POST
@admin_required
def person_add(request):
    form = AddUserForm(request.POST)
    if not form.is_valid():
        return people(request, form=form, status=400)
    user, password = user_create(**form.cleaned_data)
    return person(request, user.pk, secret=("password", password))


@never_cache  # it may carry a new password or token: no copy kept in any cache
@admin_required
def person(request, user_id: int, *, secret=None, forms_=None, status: int = 200):
    user = get_object_or_404(get_user_model(), pk=user_id)
    bound = forms_ or {}
    context = {
        "person": user,
        "roles": roles_of(user),
        "roles_form": bound.get("roles") or RolesForm(initial={"roles": roles_of(user)}),
        "token_form": bound.get("token") or TokenForm(),
        "active_error": bound.get("active"),
        "tokens": ApiToken.objects.filter(user=user).order_by(
            F("revoked_at").asc(nulls_first=True), "-created_at"
        ),
        "secret": secret,
    }
    return render(request, "evalhub/person.html", context, status=status)


@require_POST
@admin_required
def person_roles(request, user_id: int):
    user = get_object_or_404(get_user_model(), pk=user_id)
    form = RolesForm(request.POST)
    if form.is_valid():
        try:
            user_set_roles(user=user, roles=form.cleaned_data["roles"], by=request.user)
            messages.success(request, f"Roles of {user.username}: saved.")
            return redirect("person", user_id=user.pk)
        except PeopleError as exc:
            form.add_error(exc.field, str(exc))
    return person(request, user.pk, forms_={"roles": form}, status=400)


@require_POST
@admin_required
def person_active(request, user_id: int):
    user = get_object_or_404(get_user_model(), pk=user_id)
    form = ActiveForm(request.POST)
    if form.is_valid():
        try:
            user_set_active(user=user, active=form.cleaned_data["active"], by=request.user)
            return redirect("person", user_id=user.pk)
        except PeopleError as exc:
            form.add_error(exc.field, str(exc))
    errors = "; ".join(f"{field}: {' '.join(e)}" for field, e in form.errors.items())
    return person(request, user.pk, forms_={"active": errors}, status=400)


@require_POST
@admin_required
def person_password(request, user_id: int):
    user = get_object_or_404(get_user_model(), pk=user_id)
    return person(request, user.pk, secret=("password", user_reset_password(user=user)))


@require_POST
@admin_required
def person_token(request, user_id: int):
    user = get_object_or_404(get_user_model(), pk=user_id)
    form = TokenForm(request.POST)
    if not form.is_valid():
        return person(request, user.pk, forms_={"token": form}, status=400)
    _, raw = ApiToken.issue(user=user, name=form.cleaned_data["name"])
    return person(request, user.pk, secret=("token", raw))


@require_POST
@admin_required
def person_token_revoke(request, user_id: int, token_id: int):
    token = get_object_or_404(ApiToken, pk=token_id, user_id=user_id)
    if not token_revoke(user=token.user, token_id=token.pk):
        messages.info(request, f"Token {token.name} was already revoked.")
    return redirect("person", user_id=user_id)
