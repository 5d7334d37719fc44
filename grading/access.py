"""The one permission funnel for grading: every view gets its objects through these functions.

Raters see only open campaigns they are enrolled in (or open to every rater) and only their own
assignments; anything else is a 404, so ids of other raters' tasks reveal nothing.
"""

from django.core.exceptions import PermissionDenied
from django.db import connection
from django.db.models import Count, Exists, OuterRef, Q
from django.http import Http404

from core import rows
from core.access import RATER, has_role, is_researcher
from grading.models import Assignment, Campaign, Item


def campaigns_for_rater(user):
    if not has_role(user, RATER):
        return Campaign.objects.none()
    enrolled = Campaign.raters.through.objects.filter(campaign_id=OuterRef("pk"))
    return (
        Campaign.objects.filter(status=Campaign.OPEN)
        .annotate(restricted=Exists(enrolled))
        .filter(Q(restricted=False) | Q(raters=user))
        .distinct()
        .order_by("name")
    )


# The rules of campaigns_for_rater for one campaign, and a rater's own assignment with its item
# and campaign, as plain queries: they run on every "next task" and every submit, where the ORM
# spends more time compiling them than the database spends answering (core/rows.py).
_RATER_CAMPAIGN_SQL = f"""
SELECT {rows.columns(Campaign, "c")} FROM grading_campaign c
WHERE c.id = %(campaign)s AND c.status = 'open'
  AND (NOT EXISTS (SELECT 1 FROM grading_campaign_raters r WHERE r.campaign_id = c.id)
       OR EXISTS (SELECT 1 FROM grading_campaign_raters r
                  WHERE r.campaign_id = c.id AND r.user_id = %(user)s))
"""
_RATER_ASSIGNMENT_SQL = f"""
SELECT {rows.columns(Assignment, "a")}, {rows.columns(Item, "i")}, {rows.columns(Campaign, "c")}
FROM grading_assignment a
JOIN grading_item i ON i.id = a.item_id JOIN grading_campaign c ON c.id = a.campaign_id
WHERE a.id = %(assignment)s AND a.rater_id = %(user)s
"""


def access_campaign_for_rater(user, campaign_id: int) -> Campaign:
    if not has_role(user, RATER):
        raise Http404("no such campaign")
    with connection.cursor() as cursor:
        cursor.execute(_RATER_CAMPAIGN_SQL, {"campaign": campaign_id, "user": user.pk})
        row = cursor.fetchone()
    if row is None:
        raise Http404("no such campaign")
    return rows.instance(Campaign, iter(row))


def access_assignment_for_rater(user, assignment_id: int) -> Assignment:
    """The rater's own assignment, its item and campaign loaded (like select_related)."""
    if not has_role(user, RATER):
        raise Http404("no such task")
    with connection.cursor() as cursor:
        cursor.execute(_RATER_ASSIGNMENT_SQL, {"assignment": assignment_id, "user": user.pk})
        row = cursor.fetchone()
    if row is None:
        raise Http404("no such task")
    values = iter(row)
    assignment = rows.instance(Assignment, values)
    assignment.item, assignment.campaign = (
        rows.instance(Item, values),
        rows.instance(Campaign, values),
    )
    return assignment


def access_campaign_for_researcher(user, campaign_id: int) -> Campaign:
    if not is_researcher(user):
        raise PermissionDenied("campaigns are managed by researchers")
    campaign = Campaign.objects.filter(pk=campaign_id).first()
    if campaign is None:
        raise Http404("no such campaign")
    return campaign


def campaigns_for_researcher(user):
    if not is_researcher(user):
        raise PermissionDenied("campaigns are managed by researchers")
    return Campaign.objects.annotate(n_items=Count("items", distinct=True))
