"""Leaderboard data: benchmark scores joined with human-preference ratings from grading labels.

Human preference is Bradley-Terry over side-by-side labels with bootstrap intervals and rank
by interval (as Chatbot Arena does), but with AFM's preference levels kept: "significantly
better" counts more than "negligibly better" (models.preferences.Level.arena_score).
"""

from collections import defaultdict

import numpy as np
from django.db.models import Prefetch

from evalhub.models import EvalRun, ModelVersion
from grading.models import Label, Response
from suites import REGISTRY
from suites.base import summarize
from suites.stats import Votes, bradley_terry_intervals, preference_outcome


def latest_runs(
    model_ids: list[int] | None = None, complete_only: bool = False
) -> dict[tuple[str, str], EvalRun]:
    """The latest finished run of each (model name, suite), of every model or of these;
    with ``complete_only``, the latest that scored the whole suite."""
    runs = EvalRun.objects.filter(metrics__isnull=False)
    if model_ids is not None:
        runs = runs.filter(model_id__in=model_ids)
    if complete_only:
        runs = runs.filter(complete=True)
    latest = {}
    for run in runs.select_related("model").order_by("created_at", "id"):
        latest[(run.model.name, run.suite)] = run  # later runs overwrite earlier ones
    return latest


def headline_score(run: EvalRun) -> dict:
    """A run's headline metric as the leaderboard shows it: mean, 95% interval, regressions,
    and whether it covers the whole suite (``n`` of ``suite_size`` when it does not)."""
    suite = REGISTRY.get(run.suite)
    value = (run.metrics.get(suite.headline) if suite else None) or {}
    return {
        "run": run.pk,
        "metric": suite.headline if suite else "",
        "mean": value.get("mean"),
        "ci_low": value.get("ci_low"),
        "ci_high": value.get("ci_high"),
        "regressions": run.regressions,
        "complete": run.complete,
        "n": (run.metrics or {}).get("n"),
        "suite_size": run.suite_size,
        # judged suites (safety): which judge produced the rate, and its correction for the
        # judge's measured error where the judge was validated against human labels
        "judge": ((run.metrics or {}).get("judge") or {}).get("name"),
        "corrected": (run.metrics or {}).get(f"{suite.headline}_corrected") if suite else None,
    }


def latest_scores(model_ids: list[int]) -> dict[int, dict[str, dict]]:
    """model id → suite → ``headline_score`` of its latest finished run (partial or not: each
    score says which)."""
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


def vote_counts(votes: Votes | None) -> dict[str, int]:
    """Side-by-side labels each model took part in."""
    if votes is None:
        return {}
    counts = np.bincount(votes.a, minlength=len(votes.models)) + np.bincount(
        votes.b, minlength=len(votes.models)
    )
    return {m: int(n) for m, n in zip(votes.models, counts, strict=True)}


def aspect_scores() -> dict[str, dict[str, list[float]]]:
    """aspect → model → every single-sided grade it got."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _, _, model, scores in Label.objects.single_sided_scores().iterator(chunk_size=5000):
        for aspect, value in (scores or {}).items():
            values[aspect][model or "?"].append(value)
    return values


def aspect_boards(values: dict[str, dict[str, list[float]]]) -> dict[str, list[dict]]:
    """aspect → models by mean grade, best first, each with a 95% bootstrap interval and n."""
    return {
        aspect: sorted(
            ({"model": m, **summarize(v)} for m, v in by_model.items()),
            key=lambda row: -row["mean"],
        )
        for aspect, by_model in sorted(values.items())
    }


def leaderboard(bootstrap_rounds: int = 100, complete_only: bool = True) -> dict:
    """Every policy model with its preference rating, vote count, aspect means and latest
    benchmark scores. ``complete_only`` (the default) takes scores from runs over the whole
    suite only, so a 50-question sample never ranks beside full runs; otherwise the latest run
    of any size, each score marked ``complete`` or not."""
    runs = latest_runs(complete_only=complete_only)
    hidden = [] if not complete_only else _partial_newer_than(runs)
    votes = preference_votes()
    ratings = {}
    if votes is not None and len(votes.models) >= 2:
        bt = bradley_terry_intervals(votes, n_rounds=bootstrap_rounds, seed=0)
        ratings = {row["model"]: row for row in bt.table()}
    counts = vote_counts(votes)
    boards = aspect_boards(aspect_scores())
    aspects = {row["model"]: {} for board in boards.values() for row in board}
    for aspect, board in boards.items():
        for row in board:
            aspects[row["model"]][aspect] = row["mean"]
    names = sorted(
        {name for name, _ in runs}
        | set(ratings)
        | set(aspects)
        | set(ModelVersion.objects.filter(kind="policy").values_list("name", flat=True))
    )
    # Columns for the suites some model has a run of (a suite nobody ran is a column of dashes).
    suites = sorted({suite for _, suite in runs} & set(REGISTRY))
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
                "votes": counts.get(name, 0),
                "aspects": aspects.get(name, {}),
            }
        )
    rows.sort(key=lambda r: -(r["rating"]["rating"] if r["rating"] else float("-inf")))
    return {
        "suites": suites,
        "rows": rows,
        "votes": 0 if votes is None else len(votes.a),
        "aspect_boards": boards,
        "complete_only": complete_only,
        "partial_hidden": hidden,
    }


def _partial_newer_than(complete: dict[tuple[str, str], EvalRun]) -> list[dict]:
    """Partial runs newer than the (model, suite)'s latest complete run: what the
    complete-only board leaves out, so the page can say so."""
    out = []
    for key, run in latest_runs().items():
        if not run.complete and (key not in complete or complete[key].created_at < run.created_at):
            out.append({"model": key[0], "suite": key[1], **headline_score(run)})
    return out


def regression_flags() -> list[dict]:
    flags = []
    for (model, suite), run in latest_runs().items():
        for flag in run.regressions:
            flags.append({"model": model, "suite": suite, "run": run.pk, **flag})
    return flags
