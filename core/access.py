"""Roles and the permission funnel for platform pages. Views never check groups themselves.

Three groups: ``rater`` (grading tasks only), ``researcher`` (campaigns, models, jobs, runs) and
``admin`` (everything, including user management). Superusers count as admins.
"""

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from core.models import ApiToken, Job

RATER, RESEARCHER, ADMIN = "rater", "researcher", "admin"
ROLES = (RATER, RESEARCHER, ADMIN)


def has_role(user, role: str) -> bool:
    if not user.is_authenticated or not user.is_active:
        return False
    if user.is_superuser:
        return True
    names = getattr(user, "group_names", None)  # set by ApiToken.objects.authenticate
    if names is None:
        names = set(user.groups.values_list("name", flat=True))
        user.group_names = names  # one query per request, not one per check
    if role == RESEARCHER:
        return bool(names & {RESEARCHER, ADMIN})
    if role == RATER:
        return bool(names & {RATER})
    return role in names


def is_researcher(user) -> bool:
    return has_role(user, RESEARCHER)


def roles_context(request) -> dict:
    user = request.user
    return {
        "is_researcher": is_researcher(user),
        "is_rater": has_role(user, RATER),
        "is_admin": has_role(user, ADMIN),
    }


def role_required(role: str):
    """View decorator: anonymous users go to the login page, the wrong role gets 403."""

    def decorate(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not has_role(request.user, role):
                raise PermissionDenied(f"this page needs the {role} role")
            return view(request, *args, **kwargs)

        return wrapper

    return decorate


researcher_required = role_required(RESEARCHER)


def api_user(request):
    """The user of a request's ``Authorization: Bearer`` token, else its session user.

    Bearer requests carry no ambient credentials, so they skip CSRF; a session-authenticated
    request to an API view gets the same CSRF check as a form post (as DRF does).
    """
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return ApiToken.objects.authenticate(header.removeprefix("Bearer ").strip())
    if not request.user.is_authenticated:
        return None
    if CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is not None:
        raise PermissionDenied("CSRF verification failed")
    return request.user


def api_role_required(role: str):
    """Like role_required, for JSON endpoints: 401/403 as JSON, the user set on the request."""

    def decorate(view):
        @csrf_exempt  # api_user() runs the CSRF check itself for session-authenticated calls
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            try:
                user = api_user(request)
            except PermissionDenied as exc:
                return JsonResponse({"error": str(exc)}, status=403)
            if user is None:
                return JsonResponse({"error": "authentication required"}, status=401)
            if not has_role(user, role):
                return JsonResponse({"error": f"the {role} role is required"}, status=403)
            request.user = user
            return view(request, *args, **kwargs)

        return wrapper

    return decorate


def access_job(user, job_id: int) -> Job:
    """A job a researcher may see; raises PermissionDenied for everyone else."""
    if not is_researcher(user):
        raise PermissionDenied("jobs are visible to researchers only")
    return Job.objects.select_related("created_by").get(pk=job_id)
