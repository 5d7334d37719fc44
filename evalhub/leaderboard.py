"""Leaderboard data: benchmark scores joined with human-preference ratings from grading labels.

Human preference is Bradley-Terry over side-by-side labels with bootstrap intervals and rank
by interval (as Chatbot Arena does), but with AFM's preference levels kept: "significantly
better" counts more than "negligibly better" (models.preferences.Level.arena_score).
"""

from collections import defaultdict

from django.db.models import Prefetch

from evalhub.models import EvalRun, ModelVersion
from grading.models import Label, Response
from suites import REGISTRY
from suites.stats import Votes, bradley_terry_intervals, preference_outcome


def latest_runs(model_ids: list[int] | None = None) -> dict[tuple[str, str], EvalRun]:
    """The latest finished run of each (model name, suite), of every model or of these."""
    runs = EvalRun.objects.filter(metrics__isnull=False)
    if model_ids is not None:
        runs = runs.filter(model_id__in=model_ids)
    latest = {}
    for run in runs.select_related("model").order_by("created_at", "id"):
        latest[(run.model.name, run.suite)] = run  # later runs overwrite earlier ones
    return latest


def headline_score(run: EvalRun) -> dict:
    """A run's headline metric as the leaderboard shows it: mean, 95% interval, regressions."""
    suite = REGISTRY.get(run.suite)
    value = (run.metrics.get(suite.headline) if suite else None) or {}
    return {
        "run": run.pk,
        "mean": value.get("mean"),
        "ci_low": value.get("ci_low"),
        "ci_high": value.get("ci_high"),
        "regressions": run.regressions,
    }


def latest_scores(model_ids: list[int]) -> dict[int, dict[str, dict]]:
    """model id → suite → ``headline_score`` of its latest finished run."""
    scores: dict[int, dict[str, dict]] = defaultdict(dict)
    for (_, suite), run in latest_runs(model_ids).items():
        scores[run.model_id][suite] = headline_score(run)
    return dict(scores)


def preference_votes() -> Votes | None:
    labels = (
        Label.objects.filter(campaign__kind="side_by_side")
        .select_related("preferred")
        .prefetch_related(
            Prefetch(
                "item__responses",
                queryset=Response.objects.only("item_id", "position", "model_name"),
            )
        )
    )
    a, b, outcome = [], [], []
    for label in labels.iterator(chunk_size=2000):
        names = {r.position: r.model_name for r in label.item.responses.all()}
        if not names.get(0) or not names.get(1) or names[0] == names[1]:
            continue
        preferred = None if label.preferred is None else "ab"[label.preferred.position]
        a.append(names[0])
        b.append(names[1])
        outcome.append(preference_outcome(label.level, preferred))
    return Votes.from_records(a, b, outcome) if a else None


def aspect_means() -> dict[str, dict[str, float]]:
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _, _, model, scores in Label.objects.single_sided_scores().iterator(chunk_size=5000):
        for aspect, value in (scores or {}).items():
            sums[model or "?"][aspect].append(value)
    return {m: {k: sum(v) / len(v) for k, v in aspects.items()} for m, aspects in sums.items()}


def leaderboard(bootstrap_rounds: int = 100) -> dict:
    runs = latest_runs()
    votes = preference_votes()
    ratings = {}
    if votes is not None and len(votes.models) >= 2:
        bt = bradley_terry_intervals(votes, n_rounds=bootstrap_rounds, seed=0)
        ratings = {row["model"]: row for row in bt.table()}
    aspects = aspect_means()
    names = sorted(
        {name for name, _ in runs}
        | set(ratings)
        | set(aspects)
        | set(ModelVersion.objects.filter(kind="policy").values_list("name", flat=True))
    )
    suites = sorted(REGISTRY)
    rows = []
    for name in names:
        scores = {}
        for suite in suites:
            run = runs.get((name, suite))
            if run is not None:
                scores[suite] = headline_score(run)
        rows.append(
            {
                "model": name,
                "scores": scores,
                "rating": ratings.get(name),
                "aspects": aspects.get(name, {}),
            }
        )
    rows.sort(key=lambda r: -(r["rating"]["rating"] if r["rating"] else float("-inf")))
    return {"suites": suites, "rows": rows, "votes": 0 if votes is None else len(votes.a)}


def regression_flags() -> list[dict]:
    flags = []
    for (model, suite), run in latest_runs().items():
        for flag in run.regressions:
            flags.append({"model": model, "suite": suite, "run": run.pk, **flag})
    return flags
