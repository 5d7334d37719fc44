"""Campaign and rater figures for the dashboard: loads rows, calls grading.agreement, shapes
the result for templates. No maths here beyond counting."""

from collections import defaultdict
from pathlib import Path

from django.conf import settings
from django.db.models import Count, Q

from grading import agreement
from grading.models import Assignment, Campaign, Item, Label, Response


def rater_progress(user, campaigns) -> list[dict]:
    done = dict(
        Label.objects.filter(rater=user, campaign__in=campaigns)
        .values_list("campaign")
        .annotate(n=Count("id"))
    )
    return [
        {"campaign": c, "done": done.get(c.pk, 0), "quota": c.quota_per_rater} for c in campaigns
    ]


def rater_progress_one(user, campaign: Campaign) -> dict:
    return rater_progress(user, [campaign])[0]


def campaign_report(campaign: Campaign) -> dict:
    regular = Q(is_gold=False)
    totals = Item.objects.filter(campaign=campaign).aggregate(
        n=Count("id", filter=regular),
        gold=Count("id", filter=~regular),
        complete=Count("id", filter=regular & Q(labelled__gte=campaign.overlap)),
    )
    labels = list(
        Label.objects.filter(campaign=campaign).values(
            "item_id",
            "rater_id",
            "rater__username",
            "preferred__position",
            "level",
            "scores",
            "seconds",
            "picked_left",
            "gold_correct",
            "item__is_gold",
        )
    )
    names = {row["rater_id"]: row["rater__username"] for row in labels}
    records = [
        agreement.LabelRecord(
            rater_id=r["rater_id"],
            seconds=r["seconds"],
            picked_left=r["picked_left"],
            gold_correct=r["gold_correct"],
        )
        for r in labels
    ]
    regular = [r for r in labels if not r["item__is_gold"]]
    figures, majority = campaign.task_kind.agreement_figures(campaign, regular)
    stats = agreement.rater_stats(records, majority=majority)
    thresholds, thresholds_problem = campaign_thresholds(campaign)
    flags = agreement.flag_raters(stats, thresholds)
    raters = [
        {"id": rid, "name": names[rid], "stats": s, "flags": flags.get(rid, [])}
        for rid, s in sorted(stats.items(), key=lambda kv: names[kv[0]])
    ]
    return {
        "items": totals["n"],
        "complete": totals["complete"],
        "labels": len(labels),
        "gold_items": totals["gold"],
        "live_leases": Assignment.objects.filter(campaign=campaign).live().count(),
        "skips": Assignment.objects.filter(campaign=campaign, status=Assignment.SKIPPED).count(),
        "raters": raters,
        "thresholds_problem": thresholds_problem,
        **figures,
    }


def campaign_thresholds(campaign: Campaign) -> tuple[agreement.Thresholds, str]:
    """The campaign's thresholds, or the defaults and why, when the stored value is invalid
    (saved before the form checked it): the dashboard shows the problem instead of failing."""
    try:
        return agreement.Thresholds.from_mapping(campaign.thresholds), ""
    except ValueError as exc:
        return agreement.Thresholds(), f"{exc}; the defaults are used until it is fixed"


def model_names_shown_to_raters(campaign: Campaign) -> list[str]:
    """Model names of the campaign's responses that its name or guidelines (both shown to
    raters) mention, ignoring case; names shorter than three characters are left out."""
    shown = f"{campaign.name}\n{campaign.guidelines}".casefold()
    names = (
        Response.objects.filter(item__campaign=campaign)
        .exclude(model_name="")
        .values_list("model_name", flat=True)
        .distinct()
    )
    return sorted(name for name in names if len(name) >= 3 and name.casefold() in shown)


FILTERS = ("rater", "level", "gold", "unsafe", "late")


def filtered_labels(campaign: Campaign, params) -> tuple:
    labels = (
        Label.objects.filter(campaign=campaign)
        .select_related("rater", "item", "preferred")
        .order_by("-created_at", "-id")
    )
    # NUL cannot be compared with PostgreSQL text; no stored value holds one.
    filters = {name: params.get(name, "").replace("\x00", "")[:200] for name in FILTERS}
    if filters["rater"]:
        labels = labels.filter(rater__username=filters["rater"])
    if filters["level"]:
        labels = labels.filter(level=filters["level"])
    for name in ("gold", "unsafe", "late"):
        if filters[name] in ("yes", "no"):
            field = "item__is_gold" if name == "gold" else name
            labels = labels.filter(**{field: filters[name] == "yes"})
    return labels, filters


def single_sided_grades() -> dict[tuple[str, str], dict[str, int]]:
    """Each graded (prompt, response text): its mean single-sided grade per aspect, rounded to
    the 1–5 scale, over every campaign that graded it."""
    sums: dict[tuple, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for prompt, text, _, scores in Label.objects.single_sided_scores().iterator(chunk_size=2000):
        for aspect, value in (scores or {}).items():
            sums[(prompt, text)][aspect].append(int(value))
    return {
        key: {a: round(sum(v) / len(v)) for a, v in aspects.items()}
        for key, aspects in sums.items()
    }


def export_path(job) -> Path:
    """Where an export job's file lives; only names under MEDIA_ROOT/exports are accepted."""
    root = (Path(settings.MEDIA_ROOT) / "exports").resolve()
    path = (root / Path(job.result["file"]).name).resolve()
    if path.parent != root:
        raise ValueError("export path escapes the exports directory")
    return path
