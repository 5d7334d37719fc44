"""Grading's Celery tasks: thin wrappers; exports are built in ``grading/exports.py``."""

from pathlib import Path

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from core.jobs import JobError, job_task
from core.models import Job
from core.params import Param, Params, Rows
from grading.exports import FORMATS, SUFFIXES, export_file
from grading.models import Campaign
from grading.services import leases_expire

EXPORT = Params(
    (
        Param(
            "campaign_id",
            int,
            "the campaign whose labels are exported",
            required=True,
            choices=Rows(Campaign.objects.all()),
            choices_doc="the id of a grading campaign",
        ),
        Param("format", str, "file format", default="jsonl", choices=tuple(FORMATS)),
        Param("include_ties", bool, "keep tied pairs (JSONL preference rows)", default=False),
    )
)


@job_task(kind="grading.export", params=EXPORT, soft_time_limit=3600)
def export_labels(job: Job) -> dict:
    """Export a campaign's labels as JSONL (TRL / OpenRLHF preference schema), CSV, Parquet or
    JSONL in TRL's conversational format."""
    campaign = Campaign.objects.filter(pk=job.params.get("campaign_id")).first()
    fmt = job.params.get("format", "jsonl")
    if campaign is None:
        raise JobError("the campaign to export no longer exists")
    if fmt not in FORMATS:
        raise JobError(f"unknown export format {fmt!r}")
    out = Path(settings.MEDIA_ROOT) / "exports"
    out.mkdir(parents=True, exist_ok=True)
    suffix = SUFFIXES.get(fmt, fmt)
    path = out / f"campaign{campaign.pk}-{timezone.now():%Y%m%dT%H%M%S}-job{job.pk}.{suffix}"
    include_ties = bool(job.params.get("include_ties", False))
    n = export_file(
        campaign,
        fmt,
        path,
        progress=lambda done, total: job.report(
            0.9 * done / max(total, 1), f"{done}/{total} labels"
        ),
        include_ties=include_ties,
    )
    return {
        "file": path.name,
        "rows": n,
        "format": fmt,
        "bytes": path.stat().st_size,
        "include_ties": include_ties,
    }


@shared_task(name="grading.leases_expire", ignore_result=True)
def expire_leases() -> int:
    """Periodic: return expired leases to the pool even when no rater is claiming."""
    return leases_expire()
