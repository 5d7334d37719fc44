"""Eval runs: run a suite on a registered model as a resumable job, keep every sample, compare
runs, and flag nightly regressions. The scoring and statistics live in ``suites/``; what differs
between suites (nightly sample, judges, drilldown filters) is an attribute of the suite class.
The Celery side (the job, the shard fan-out) is in ``evalhub/tasks.py``, which imports this
module; this module never imports it."""

import platform
import time

from django.db import transaction
from django.utils import timezone

from core.jobs import JobError, job_submit
from core.models import Job, JobStep
from evalhub.models import EvalRun, EvalSample, ModelVersion
from evalhub.registry import backend_for
from grading.quality import single_sided_grades
from models.backends import BackendError
from models.provenance import package_versions, source_commit
from suites import REGISTRY
from suites.base import GenerateRequest, SampleResult, stratified_sample
from suites.runner import run_suite
from suites.stats import paired_bootstrap_diff

PACKAGES = ("torch", "transformers", "numpy", "scipy", "django", "celery")
TOKEN_REPORT_SECONDS = 2.0  # most one token-progress write a job makes in this long


def eval_submit(
    *,
    model: ModelVersion,
    suite: str,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    user=None,
    nightly: bool = False,
    shards: int = 1,
    judge: str = "",
) -> EvalRun:
    """A queued run; ``judge`` (judged suites only) is kept in its settings, checked here."""
    if suite not in REGISTRY:
        raise JobError(f"unknown suite {suite!r}; known: {', '.join(sorted(REGISTRY))}")
    opts = {"limit": limit, "batch_size": batch_size, "seed": seed, "shards": shards}
    if judge:
        from evalhub.safety_calibration import judge_choices

        if not REGISTRY[suite].judged or judge not in dict(judge_choices()):
            raise JobError(f"judge {judge[:120]!r} is not a judge of suite {suite}")
        opts["judge"] = judge
    with transaction.atomic():
        run = EvalRun.objects.create(model=model, suite=suite, nightly=nightly, settings=opts)
        run.job = job_submit(kind="evaluate", params={"run_id": run.pk}, user=user)
        run.save(update_fields=["job"])
    return run


def evaluate_run(run: EvalRun, job: Job | None = None, on_batch=None, shard=None):
    """Score the run's missing samples, store each batch as it finishes, then aggregate.

    ``shard`` = (k, n) scores the k-th of n slices only; the last shard to finish aggregates
    and completes the job (``finish_shard``). The fan-out is ``evalhub.tasks.evaluate``.
    """
    suite = build_suite(run)
    try:
        backend = backend_for(run.model)
    except BackendError as exc:
        raise JobError(f"model {run.model.name} cannot be loaded: {exc}") from exc
    done = set(run.samples.values_list("example_id", flat=True))
    chosen = run_sample(run, suite)
    asked = {ex.id: _asked(suite.requests(ex)[0]) for ex in chosen if ex.id not in done}

    def store(new: list[SampleResult], n_done: int, total: int) -> None:
        for r in new:
            r.details.setdefault("prompt", asked.get(r.id, ""))  # kept for the drilldown
        EvalSample.objects.bulk_create(
            [_sample(run, suite, r) for r in new], ignore_conflicts=True
        )  # a redelivered batch is a no-op
        if job is not None:
            scored = n_done + len(done)
            job.report(scored / max(len(chosen), 1), f"{scored} of {len(chosen)} samples scored")
        if on_batch is not None:
            on_batch(len(new), n_done, total)

    last_beat = [0.0]

    def tokens(made: int) -> None:  # long generations: show tokens while a batch runs
        if job is None or time.monotonic() - last_beat[0] < TOKEN_REPORT_SECONDS:
            return
        last_beat[0] = time.monotonic()
        scored = run.samples.count()
        job.report(
            message=f"{scored} of {len(chosen)} samples scored; "
            f"{made} tokens generated for the batch in progress"
        )

    opts = run.settings
    result = run_suite(
        suite,
        backend,
        limit=opts.get("limit"),
        progress=store,
        done_ids=done,
        batch_size=int(opts.get("batch_size", 8)),
        shard=shard,
        seed=int(opts.get("seed", 0)),
        tokens=tokens,
    )
    if shard is not None:
        return finish_shard(run, job, shard, result.meta, backend)
    return _aggregate(run, suite, result.meta, backend)


def run_sample(run: EvalRun, suite) -> list:
    """The examples the run scores (``Suite.sample`` with its limit and seed); records how many
    of how many on the run, so its page shows a total before the first sample is scored."""
    pool = suite.examples()
    chosen = stratified_sample(
        pool, run.settings.get("limit"), int(run.settings.get("seed", 0)), suite.category_of
    )
    if (run.planned, run.suite_size) != (len(chosen), len(pool)):
        run.planned, run.suite_size = len(chosen), len(pool)
        run.save(update_fields=["planned", "suite_size"])
    return chosen


def run_progress(run: EvalRun) -> dict:
    """What the run page shows while it works: samples scored of its total, the job's status
    and, once its job runs and has scored something, a rate and an ETA. ``active`` says the
    page should keep polling. The rate counts samples over the job's latest start, so after a
    resume it is an overestimate until the resumed samples are few beside the new ones."""
    job = run.job
    done = run.samples.count()
    total = run.total
    out = {
        "status": job.status if job else ("finished" if run.metrics is not None else "no job"),
        "active": bool(job and job.is_active),
        "done": done,
        "total": total,
        "percent": min(100, round(100 * done / total)) if total else 0,
        "per_minute": None,
        "eta_seconds": None,
    }
    if job and job.status == Job.RUNNING and job.started_at and done:
        elapsed = max((timezone.now() - job.started_at).total_seconds(), 1e-3)
        out["per_minute"] = 60 * done / elapsed
        if total:
            out["eta_seconds"] = max(total - done, 0) * elapsed / done
    return out


def _aggregate(run: EvalRun, suite, meta: dict, backend) -> dict:
    stored = [
        SampleResult(s.example_id, s.metrics, s.extracted, s.details) for s in run.samples.all()
    ]
    run.metrics = suite.aggregate(stored)
    run.complete = run.suite_size is not None and len(stored) >= run.suite_size
    if suite.judged:
        run.metrics["judge_vs_human"] = judge_agreement_with_humans(run, suite)
    run.manifest = manifest(run, meta, backend)
    run.regressions = regressions(run, suite.headline, lower_is_better=suite.lower_is_better)
    run.save(update_fields=["metrics", "complete", "manifest", "regressions"])
    return {
        "run_id": run.pk,
        "n": len(stored),
        "suite_size": run.suite_size,
        "complete": run.complete,
        "headline": suite.headline,
        "score": run.metrics.get(suite.headline, {}).get("mean"),
        "regressions": run.regressions,
    }


def finish_shard(run: EvalRun, job: Job, shard: tuple[int, int], meta: dict, backend):
    """Record a finished shard; the last one aggregates the run and completes the job."""
    with transaction.atomic():
        Job.objects.select_for_update().get(pk=job.pk)  # one shard at a time past this line
        JobStep.objects.get_or_create(
            job=job, key=f"shard-{shard[0]}", defaults={"attempt": job.attempts}
        )
        if JobStep.objects.filter(job=job, key__startswith="shard-").count() < shard[1]:
            return None
        result = _aggregate(run, build_suite(run), {**meta, "shards": shard[1]}, backend)
        job.succeed(result)
        return result


def judge_agreement_with_humans(run: EvalRun, suite) -> dict:
    """How often the run's judge agrees with human single-sided harmlessness grades on the same
    (prompt, response) — responses that were also sent to a grading campaign. n = 0 when none
    were."""
    from suites.safety.judges import HumanJudge, judge_agreement

    grades = {
        key: aspects["harmlessness"]
        for key, aspects in single_sided_grades().items()
        if "harmlessness" in aspects
    }
    if not grades:
        return {"agreement": None, "cohen_kappa": None, "n": 0}
    human = HumanJudge(grades)
    prompts = {ex.id: ex.prompt for ex in suite.examples()}
    ours, theirs = [], []
    for sample in run.samples.all():
        key = (prompts.get(sample.example_id), sample.details.get("response"))
        if key in human.grades:
            ours.append(suite.judge.judge(*key))
            theirs.append(human.judge(*key))
    return (
        judge_agreement(ours, theirs) if ours else {"agreement": None, "cohen_kappa": None, "n": 0}
    )


def build_suite(run: EvalRun):
    """The run's suite; judged suites (``Suite.judged``) take the judge ``settings.judge``
    names (``evalhub.safety_calibration.judge_for``: the rules, the SmolLM2 probe, the
    built-in or a registered learned judge, or "reward:<model name>" judging harm with a reward
    model, harmful below ``settings.judge_threshold``), by default the suite's entry in
    ``DEFAULT_JUDGES`` (safety: the probe, on the registered bundled model) or its own."""
    from evalhub.safety_calibration import DEFAULT_JUDGES, judge_for

    judge_spec = run.settings.get("judge") or DEFAULT_JUDGES.get(run.suite, "")
    if not judge_spec:
        return REGISTRY[run.suite]()
    if not REGISTRY[run.suite].judged:
        raise JobError(f"unsupported judge {judge_spec!r} for suite {run.suite}")
    judge = judge_for(judge_spec, float(run.settings.get("judge_threshold", 0.0)))
    return REGISTRY[run.suite](judge=judge)


def _asked(request) -> str | list:
    """What the model was asked, as stored with a sample: the prompt text, the chat messages,
    or the log-likelihood context."""
    if isinstance(request, GenerateRequest):
        return request.prompt if request.prompt is not None else [dict(m) for m in request.messages]
    return request.context


def _sample(run: EvalRun, suite, r: SampleResult) -> EvalSample:
    value = r.metrics.get(suite.headline)
    category = str(r.details.get(suite.category, "")) if suite.category else ""
    passed = None if value is None else (value == 0 if suite.lower_is_better else value > 0)
    return EvalSample(
        run=run,
        example_id=r.id,
        metrics=r.metrics,
        extracted=r.extracted,
        details=r.details,
        passed=passed,
        category=category[:100],
    )


def manifest(run: EvalRun, meta: dict, backend) -> dict:
    """Everything that changes the numbers, so the run can be reproduced."""
    return {
        **meta,
        "settings": run.settings,
        "model": run.model.name,
        "backend_info": backend.info(),
        "packages": package_versions(PACKAGES),
        "python": platform.python_version(),
        "source_commit": source_commit(),
    }


def compare_runs(a: EvalRun, b: EvalRun, metric: str) -> dict:
    """Paired comparison on the examples both runs scored: b minus a with a bootstrap CI."""
    if a.suite != b.suite:
        raise ValueError("only runs of the same suite can be compared")
    left = dict(a.samples.values_list("example_id", "metrics"))
    right = dict(b.samples.values_list("example_id", "metrics"))
    common = sorted(
        k for k in left.keys() & right.keys() if metric in left[k] and metric in right[k]
    )
    if not common:
        return {"n": 0}
    diff = paired_bootstrap_diff(
        [left[k][metric] for k in common], [right[k][metric] for k in common], seed=0
    )
    changed = [k for k in common if left[k][metric] != right[k][metric]]
    return {
        "n": diff.n,
        "diff": diff.diff,
        "ci_low": diff.ci_low,
        "ci_high": diff.ci_high,
        "p_value": diff.p_value,
        "changed": changed,
    }


def regressions(run: EvalRun, metric: str, lower_is_better: bool = False) -> list[dict]:
    """A flag when the paired interval of (this − previous run) lies wholly on the bad side of
    zero: below it for scores, above it for failure rates such as safety violations."""
    previous = (
        EvalRun.objects.filter(
            model=run.model, suite=run.suite, metrics__isnull=False, created_at__lt=run.created_at
        )
        .exclude(pk=run.pk)
        .order_by("-created_at")
        .first()
    )
    if previous is None:
        return []
    result = compare_runs(previous, run, metric)
    worse = result["n"] and (result["ci_low"] > 0 if lower_is_better else result["ci_high"] < 0)
    if worse:
        return [
            {
                "metric": metric,
                "previous_run": previous.pk,
                "diff": result["diff"],
                "ci_low": result["ci_low"],
                "ci_high": result["ci_high"],
                "n": result["n"],
            }
        ]
    return []


def nightly_submit() -> list[int]:
    """Evaluate every tracked model on every suite with a ``nightly_limit``, that many
    examples each."""
    runs = []
    for model in ModelVersion.objects.filter(tracked=True, kind=ModelVersion.POLICY):
        for name, suite in REGISTRY.items():
            if suite.nightly_limit:
                runs.append(
                    eval_submit(model=model, suite=name, limit=suite.nightly_limit, nightly=True).pk
                )
    return runs
