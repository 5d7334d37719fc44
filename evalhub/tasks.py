"""Platform jobs: the demo job, broker housekeeping, the stalled-job sweep, and the model jobs
(generation, imports, eval runs and their shards, reward training, post-training). Thin
wrappers: the work is in the modules they import, none of which imports this one back."""

import math
import time
import traceback

from celery import shared_task
from django.conf import settings
from django.db import transaction

from core.jobs import DEFERRED, JobError, job_task, run_steps, sweep_stalled
from core.models import Job, JobCancelled


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi) by trial division: deliberately CPU-bound work for the demo job."""
    return sum(1 for n in range(max(lo, 2), hi) if all(n % d for d in range(2, math.isqrt(n) + 1)))


@job_task(kind="demo")
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


@job_task(kind="generate", queue="models", soft_time_limit=6 * 3600)
def generate(job: Job) -> dict:
    """Responses for a prompt set × models, optionally turned into a grading campaign."""
    from evalhub.generation import run_generation

    return run_generation(job)


@job_task(kind="models.import", queue="models", soft_time_limit=3600)
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


@job_task(kind="evaluate", queue="models", soft_time_limit=8 * 3600)
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


@job_task(kind="reward.train", queue="models", soft_time_limit=8 * 3600)
def train_reward(job: Job) -> dict:
    """Train a reward model from grading labels (or a preference JSONL) and register it."""
    from evalhub.rewards import train_reward_job

    return train_reward_job(job)


@job_task(kind="posttrain.sft", queue="models", soft_time_limit=24 * 3600)
def posttrain_sft(job: Job) -> dict:
    """Supervised fine-tuning on demonstrations; registers the result and queues the suites."""
    from evalhub.posttrain import run_posttrain

    return run_posttrain(job, "sft")


@job_task(kind="posttrain.dpo", queue="models", soft_time_limit=24 * 3600)
def posttrain_dpo(job: Job) -> dict:
    """Level-aware DPO (``params.loss``: "dpo" or "ipo") from preference labels."""
    from evalhub.posttrain import run_posttrain

    loss = job.params.get("loss", "dpo")
    if loss not in ("dpo", "ipo"):
        raise JobError(f"parameter 'loss' must be 'dpo' or 'ipo', not {loss!r}")
    return run_posttrain(job, loss)


@job_task(kind="itec.round", queue="models", soft_time_limit=24 * 3600)
def itec_round(job: Job) -> dict:
    """One iTeC round: committee sampling, reward reranking, SFT on the best, a campaign."""
    from evalhub.itec import run_round

    return run_round(job)


@job_task(kind="posttrain.rl", queue="models", soft_time_limit=48 * 3600)
def posttrain_rl(job: Job) -> dict:
    """Online RL (MDLOO; RLOO with clipping and REINFORCE as baselines) with verifier and
    reward-model rewards; registers the result and queues the suites."""
    from evalhub.posttrain import run_rl

    return run_rl(job)


@job_task(kind="compress", queue="models", soft_time_limit=12 * 3600)
def compress(job: Job) -> dict:
    """Palettize a registered model, measure it against its parent, register it."""
    from evalhub.compression import run_compress

    return run_compress(job)


@job_task(kind="adapter.recovery", queue="models", soft_time_limit=12 * 3600)
def adapter_recovery(job: Job) -> dict:
    """A LoRA adapter that recovers a compressed model's accuracy, by distillation."""
    from evalhub.compression import run_recovery

    return run_recovery(job)


@job_task(kind="adapter.train", queue="models", soft_time_limit=24 * 3600)
def adapter_train(job: Job) -> dict:
    """A task adapter by SFT, from a recovery (or other) adapter or fresh on a policy."""
    from evalhub.compression import run_task_adapter

    return run_task_adapter(job)
