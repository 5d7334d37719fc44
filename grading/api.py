"""JSON API for raters' tools and load tests: the same funnel and services as the pages.

Authenticated by ``Authorization: Bearer <token>`` (or a session with CSRF). Responses carry
texts only — never model names or response ids — exactly like the rater's page: a task has the
conversation's earlier turns (``context``, empty for a single turn), the graded ``prompt`` and the
responses by on-screen slot.
"""

from django.http import Http404, JsonResponse
from django.views.decorators.http import require_POST

from core.access import RATER, api_role_required
from core.payload import PayloadError, request_json
from grading import access
from grading.services import (
    GradingError,
    LeaseLost,
    assignment_claim,
    assignment_skip,
    assignment_submit,
)


def _error(exc: Exception) -> JsonResponse:
    if isinstance(exc, Http404):
        return JsonResponse({"error": "no such task or campaign"}, status=404)
    if isinstance(exc, PayloadError):
        return JsonResponse({"error": str(exc)}, status=exc.status)
    return JsonResponse({"error": str(exc)}, status=409 if isinstance(exc, LeaseLost) else 400)


@require_POST
@api_role_required(RATER)
def next_task(request, campaign_id: int):
    try:
        request_json(request)  # no fields, but a body that is sent must be valid
        campaign = access.access_campaign_for_rater(request.user, campaign_id)
        assignment = assignment_claim(rater=request.user, campaign=campaign)
    except (GradingError, PayloadError, Http404) as exc:
        return _error(exc)
    if assignment is None:
        return JsonResponse({"task": None})
    item = assignment.item
    texts = {r.position: r.text for r in item.responses.all()}
    task = {
        "id": assignment.pk,
        "context": item.context,
        "prompt": item.prompt,
        "kind": campaign.kind,
        "expires_at": assignment.expires_at.isoformat(),
        **campaign.task_kind.api_task(texts, assignment.left_position, campaign.aspect_keys),
    }
    return JsonResponse({"task": task})


@require_POST
@api_role_required(RATER)
def submit(request, assignment_id: int):
    try:
        assignment = access.access_assignment_for_rater(request.user, assignment_id)
        label = assignment_submit(assignment=assignment, data=request_json(request))
    except (GradingError, PayloadError, Http404) as exc:
        return _error(exc)
    return JsonResponse({"label": label.pk, "late": label.late})


@require_POST
@api_role_required(RATER)
def skip(request, assignment_id: int):
    try:
        assignment = access.access_assignment_for_rater(request.user, assignment_id)
        assignment_skip(assignment=assignment, reason=request_json(request).get("reason"))
    except (GradingError, PayloadError, Http404) as exc:
        return _error(exc)
    return JsonResponse({"skipped": assignment.pk})
