"""The researcher home page: what is running, how campaigns are doing, what the latest runs
scored and which regressed. Read-only; each panel is one query (no per-row queries)."""

from django.db.models import Count, F, Q, Sum

from core.models import Job
from evalhub.models import EvalRun
from grading.models import Campaign

PANEL_ROWS = 8


def active_jobs() -> list[Job]:
    return list(Job.objects.active().select_related("created_by")[:PANEL_ROWS])


def campaign_progress() -> list[dict]:
    """Open campaigns, newest first, with labels done of labels wanted (items × overlap) and
    items that have all their labels; gold items are left out of both."""
    regular = Q(items__is_gold=False)
    campaigns = (
        Campaign.objects.filter(status=Campaign.OPEN)
        .annotate(
            n_items=Count("items", filter=regular),
            n_complete=Count("items", filter=regular & Q(items__labelled__gte=F("overlap"))),
            n_labels=Sum("items__labelled", filter=regular),
        )
        .order_by("-created_at")[:PANEL_ROWS]
    )
    out = []
    for c in campaigns:
        wanted = c.n_items * c.overlap
        done = min(c.n_labels or 0, wanted)
        out.append(
            {
                "campaign": c,
                "items": c.n_items,
                "complete": c.n_complete,
                "labels": done,
                "wanted": wanted,
                "percent": round(100 * done / wanted) if wanted else 0,
            }
        )
    return out


def latest_runs() -> list[EvalRun]:
    return list(EvalRun.objects.select_related("model", "job").defer("manifest")[:PANEL_ROWS])


def recent_regressions() -> list[EvalRun]:
    """Newest runs that were flagged against the run before them."""
    flagged = EvalRun.objects.exclude(regressions=[]).filter(metrics__isnull=False)
    return list(flagged.select_related("model").defer("manifest")[:PANEL_ROWS])


def dashboard() -> dict:
    return {
        "jobs": active_jobs(),
        "campaigns": campaign_progress(),
        "runs": latest_runs(),
        "regressions": recent_regressions(),
    }
