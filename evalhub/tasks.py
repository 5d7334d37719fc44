"""Platform jobs: the demo job, broker housekeeping, the stalled-job sweep, and the model jobs
that are not training (generation, imports, eval runs and their shards, LLM judging; the
training kinds are in ``evalhub/training_tasks.py``, imported at the end). Thin wrappers: the
work is in the modules they import, none of which imports this one back."""

import math
import time
import traceback

from celery import shared_task
from django.conf import settings
from django.db import transaction

from core.jobs import DEFERRED, JobError, job_task, run_steps, sweep_stalled
from core.models import Job, JobCancelled
from core.params import Param, Params, Rows, Rule, one_of
from evalhub.job_params import (
    GENERATED_CAMPAIGN,
    GENERATORS,
    NAME_PATTERN,
    REWARD_MODEL,
    prompt_sources,
)
from evalhub.models import EvalRun, ModelVersion
from evalhub.promptsets import Registered
from grading.models import SIDE_BY_SIDE, Campaign


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi) by trial division: deliberately CPU-bound work for the demo job."""
    return sum(1 for n in range(max(lo, 2), hi) if all(n % d for d in range(2, math.isqrt(n) + 1)))


DEMO = Params(
    (
        Param("steps", int, "chunks to count", default=20, min=1, max=10_000),
        Param("chunk", int, "numbers per chunk", default=5000, min=1, max=1_000_000),
        Param("delay", float, "seconds to sleep per chunk", default=0.5, min=0, max=60),
    )
)


@job_task(kind="demo", params=DEMO)
def demo(job: Job) -> dict:
    """Count primes below ``steps * chunk`` one chunk per step, pausing ``delay`` s per step."""
    steps = int(job.params.get("steps", 20))
    chunk = int(job.params.get("chunk", 5000))
    delay = float(job.params.get("delay", 0.5))

    def step(key: str) -> int:
        time.sleep(delay)
        i = int(key)
        return count_primes(i * chunk, (i + 1) * chunk)

    counts = run_steps(job, [str(i) for i in range(steps)], step, label="chunk")
    return {"primes": sum(counts.values()), "below": steps * chunk}


@shared_task(name="evalhub.broker_cleanup", ignore_result=True)
def broker_cleanup() -> int:
    """Delete consumed messages from the embedded SQL broker (kombu marks them invisible only)."""
    url = settings.CELERY_BROKER_URL
    if not url.startswith("sqla+"):
        return 0
    import sqlalchemy as sa

    engine = sa.create_engine(url.removeprefix("sqla+"))
    with engine.begin() as conn:
        if not sa.inspect(conn).has_table("kombu_message"):
            return 0
        return conn.execute(sa.text("DELETE FROM kombu_message WHERE visible = 0")).rowcount


@shared_task(name="evalhub.jobs_sweep", ignore_result=True)
def jobs_sweep() -> dict[str, list[int]]:
    """Periodic: re-queue or fail running jobs whose worker stopped beating."""
    return sweep_stalled()


GENERATE = Params(
    (
        Param(
            "models",
            list,
            "the models that answer, each once",
            required=True,
            item=int,
            choices=Rows(GENERATORS),
            choices_doc="ids of registered policy or adapter models",
            max_len=32,
        ),
        Param("prompts", list, "the prompts", item=str, max_len=10_000),
        Param("source", str, "or a built-in prompt set", choices=prompt_sources),
        Param(
            "prompt_set",
            str,
            "or a registered prompt set (/prompt-sets/)",
            choices=Registered(),
            choices_doc="the name (newest version) or NAME@VERSION of a registered prompt set",
            max_len=120,
        ),
        Param("limit", int, "rows of the prompt set (default: all)", min=1),
        Param("turns", int, "answer at most this many turns of each conversation", min=1, max=20),
        Param("max_new_tokens", int, "answer length cap", default=256, min=1, max=32_768),
        Param("temperature", float, "sampling temperature (0: greedy)", default=0.0, min=0, max=2),
        Param("seed", int, "sampling seed", default=0, min=0),
        Param(
            "reranker",
            int,
            "best-of-N: a reward model keeps the best of n_samples answers",
            choices=REWARD_MODEL,
            choices_doc="the id of a registered reward model",
        ),
        Param("n_samples", int, "best-of-N: answers per prompt", default=4, min=1, max=64),
        Param(
            "campaign", dict, "make a grading campaign of the answers", fields=GENERATED_CAMPAIGN
        ),
    ),
    (
        one_of("prompts", "source", "prompt_set"),
        Rule(
            "is one data source: give only one of prompts, source and prompt_set",
            "prompt_set",
            lambda p: sum(k in p for k in ("prompts", "source", "prompt_set")) <= 1,
        ),
        Rule(
            "must list at least one model, each once",
            "models",
            lambda p: bool(p["models"]) and len(set(p["models"])) == len(p["models"]),
        ),
        Rule(
            "must be above 0 with a reranker (best-of-N needs sampling)",
            "temperature",
            lambda p: not p.get("reranker") or p.get("temperature", 0.0) > 0,
        ),
        Rule(
            "kind side_by_side needs two models or more",
            "campaign",
            lambda p: (
                (p.get("campaign") or {}).get("kind") != SIDE_BY_SIDE or len(p["models"]) >= 2
            ),
        ),
    ),
)


@job_task(kind="generate", params=GENERATE, queue="models", soft_time_limit=6 * 3600)
def generate(job: Job) -> dict:
    """Responses for a prompt set × models, optionally turned into a grading campaign."""
    from evalhub.generation import run_generation

    return run_generation(job)


IMPORT = Params(
    (
        Param(
            "src",
            str,
            "a GGUF file or Hugging Face directory on the server",
            required=True,
            max_len=1000,
        ),
        Param("name", str, "registry name of the model", required=True, pattern=NAME_PATTERN),
        Param("description", str, "shown in the registry", default="", max_len=10_000),
    ),
    (
        Rule(
            "is already the name of a registered model",
            "name",
            lambda p: not ModelVersion.objects.filter(name=p["name"]).exists(),
        ),
    ),
)


@job_task(kind="models.import", params=IMPORT, queue="models", soft_time_limit=3600)
def import_model(job: Job) -> dict:
    """Import a GGUF file or Hugging Face directory and register it."""
    from evalhub.registry import model_import

    job.report(0.05, f"importing {job.params['src']}")
    model = model_import(
        src=job.params["src"],
        name=job.params["name"],
        user=job.created_by,
        description=job.params.get("description", ""),
    )
    return {"model_id": model.pk, "name": model.name, "n_params": model.n_params}


EVALUATE = Params(
    (
        Param(
            "run_id",
            int,
            "the eval run to score (made by eval_submit with its suite and settings)",
            required=True,
            choices=Rows(EvalRun.objects.all()),
            choices_doc="the id of an eval run",
        ),
    )
)


@job_task(kind="evaluate", params=EVALUATE, queue="models", soft_time_limit=8 * 3600)
def evaluate(job: Job) -> dict:
    """Run one EvalRun (model × suite × settings); resumes from its stored samples.

    With ``settings.shards`` = n > 1 the run is split instead: n ``eval_shard`` tasks go to the
    queue (any worker on any machine takes them) and the last to finish completes the job. A
    chord without a result backend: the fan-in is a count of shard steps in the job's own
    ledger, so it survives worker crashes and works on the embedded broker too."""
    from evalhub.evaluation import evaluate_run
    from evalhub.models import EvalRun

    run = EvalRun.objects.select_related("model").filter(pk=job.params.get("run_id")).first()
    if run is None:
        raise JobError("the eval run no longer exists")
    n = int(run.settings.get("shards") or 1)
    if n == 1:
        return evaluate_run(run, job)
    for k in range(n):
        transaction.on_commit(
            lambda k=k: eval_shard.apply_async(args=[run.pk, k, n], queue="models")
        )
    job.report(0.0, f"split into {n} shards")
    return DEFERRED


@shared_task(
    name="evalhub.eval_shard",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=8 * 3600,
    time_limit=8 * 3600 + 120,
    ignore_result=True,
)
def eval_shard(run_id: int, k: int, n: int) -> None:
    """One shard of a split eval run; idempotent (stored samples are skipped)."""
    from evalhub.evaluation import evaluate_run
    from evalhub.models import EvalRun

    run = EvalRun.objects.select_related("model", "job").filter(pk=run_id).first()
    if run is None or run.job is None or run.job.status != Job.RUNNING:
        return
    try:
        evaluate_run(run, run.job, shard=(k, n))
    except JobCancelled:
        return
    except Exception as exc:
        run.job.fail(f"shard {k}/{n}: {type(exc).__name__}: {exc}", traceback.format_exc())
        raise


@shared_task(name="evalhub.nightly", ignore_result=True)
def nightly() -> list[int]:
    """Periodic: evaluate tracked models on every suite; regressions are flagged per run."""
    from evalhub.evaluation import nightly_submit

    return nightly_submit()


JUDGE = Params(
    (
        Param(
            "campaign_id",
            int,
            "the grading campaign whose items are judged",
            required=True,
            choices=Rows(Campaign.objects.all()),
            choices_doc="the id of a grading campaign",
        ),
        Param(
            "model_id",
            int,
            "the judge: any registered model (an OpenAI-compatible endpoint is an openai_http one)",
            required=True,
            choices=Rows(GENERATORS),
            choices_doc="the id of a registered policy or adapter model",
        ),
        Param("limit", int, "judge the first N regular items (default: all)", min=1),
        Param("max_new_tokens", int, "judge output cap", default=512, min=8, max=4096),
        Param("swap", bool, "pairwise: judge both orders (MT-Bench)", default=True),
    )
)


@job_task(kind="judge", params=JUDGE, queue="models", soft_time_limit=12 * 3600)
def judge(job: Job) -> dict:
    """An LLM judge grades a campaign's items (pairwise with swap, or 1-10) beside the raters."""
    from evalhub.judging import run_judge

    return run_judge(job)


# The training kinds register themselves on import (Celery discovers this module only).
import evalhub.training_tasks  # noqa: E402, F401
