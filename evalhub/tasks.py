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
from core.params import Param, Params, Rows, Rule, one_of
from evalhub.models import EvalRun, ModelVersion
from evalhub.promptsets import Registered
from grading.models import SIDE_BY_SIDE, SINGLE_SIDED, Campaign
from suites import REGISTRY

# Parameters shared by several kinds. The defaults are documentation: the job's own code
# applies them (evalhub/posttrain.py TRAIN_DEFAULTS, compression.py DEFAULTS, ...).
NAME_PATTERN = r"(?!\.)[A-Za-z0-9._-]{1,100}"  # one path component (it names a directory)
BUILTIN = ModelVersion.objects.filter(backend="builtin")
MODEL_ID = Param(
    "model_id",
    int,
    "the model to start from",
    required=True,
    choices=Rows(BUILTIN.filter(kind=ModelVersion.POLICY)),
    choices_doc="the id of a registered policy model with the builtin backend",
)
NAME = Param("name", str, "registry name of the result (default: derived)", pattern=NAME_PATTERN)
SUITES = Param(
    "suites",
    list,
    "suites queued on the result ([] for none)",
    default=["ifeval", "gsm8k", "mmlu"],
    item=str,
    choices=lambda: REGISTRY,
    max_len=50,
)
EVAL_LIMIT = Param(
    "eval_limit", int, "examples per queued suite (default: the suite's nightly sample)", min=1
)
DEVICE = Param("device", str, "torch device (default: CUDA when available)", max_len=20)
CHECKPOINT_EVERY = Param(
    "checkpoint_every", int, "steps between resume checkpoints", default=50, min=1
)
CAMPAIGN_IDS = Param(
    "campaign_ids",
    list,
    "side-by-side campaigns whose labels are the data",
    item=int,
    choices=Rows(Campaign.objects.all()),
    choices_doc="ids of grading campaigns",
    max_len=1000,
)
JSONL = Param("jsonl", str, "or a JSONL file on the server", max_len=1000)
PROMPT_SET = Param(
    "source",
    str,
    "or a prompt set: AlpacaEval's instructions with GPT-4's answers",
    choices=("alpaca-eval",),
)
PROMPT_LIMIT = Param("limit", int, "rows of the prompt set", default=256, min=1)
REWARD_MODEL = Rows(ModelVersion.objects.filter(kind=ModelVersion.REWARD))
# Models that generate text: policies and adapters (not reward models or safety judges).
GENERATORS = ModelVersion.objects.filter(kind__in=(ModelVersion.POLICY, ModelVersion.ADAPTER))
TRAINING = Params(
    (
        Param("lr", float, "learning rate (default: the algorithm's)", min=1e-10, max=0.5),
        Param("epochs", int, "passes over the data", default=1, min=1, max=1000),
        Param("batch_size", int, "examples per step", default=8, min=1, max=4096),
        Param("accumulation", int, "micro-batches per optimizer step", default=1, min=1),
        Param("max_steps", int, "stop after this many steps (default: the epochs')", min=1),
        Param("seed", int, "seed of shuffling and initialisation", default=0, min=0),
        Param("lora_rank", int, "LoRA rank (0: full fine-tune)", default=0, min=0, max=1024),
        Param("lora_alpha", float, "LoRA alpha (default: twice the rank)", min=1e-6),
        Param("beta", float, "DPO/IPO strength", default=0.1, min=1e-6, max=100),
        Param("level_aware", bool, "DPO/IPO: soft targets by preference level", default=True),
        Param("max_len", int, "tokens per example", default=1024, min=8, max=1_000_000),
        MODEL_ID,
        NAME,
        SUITES,
        EVAL_LIMIT,
        CHECKPOINT_EVERY,
        DEVICE,
    )
)


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


def _sources():
    from evalhub.generation import SOURCES

    return SOURCES


GENERATED_CAMPAIGN = Params(
    (
        Param(
            "kind",
            str,
            "grading kind (default: side by side for two models or more)",
            choices=(SIDE_BY_SIDE, SINGLE_SIDED),
        ),
        Param("name", str, "campaign name (default: Generated by job N)", max_len=200),
        Param("overlap", int, "ratings per item", default=3, min=1, max=20),
        Param("guidelines", str, "shown to raters", default="", max_len=20_000),
        Param(
            "turn",
            int,
            "grade this turn of each conversation (default: side by side the whole "
            "conversation, single-sided every turn as its own item)",
            min=1,
            max=20,
        ),
    )
)
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
        Param("source", str, "or a built-in prompt set", choices=_sources),
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


REWARD_TRAIN = Params(
    (
        CAMPAIGN_IDS,
        Param("jsonl", str, "or a preference JSONL file on the server", max_len=1000),
        Param(
            "held_out", float, "share of prompts held out for metrics", default=0.2, min=0, max=0.9
        ),
        Param("seed", int, "seed of the split and training", default=0, min=0),
        Param(
            "backbone_model",
            int,
            "a decoder backbone (default: MiniLM)",
            choices=Rows(BUILTIN),
            choices_doc="the id of a registered builtin model",
        ),
        Param(
            "backbone_params",
            dict,
            "decoder backbone options",
            fields=Params(
                (
                    Param("trainable_layers", int, "top layers trained", default=2, min=0),
                    Param("max_prompt_tokens", int, "prompt cut", default=1024, min=1),
                    Param("max_response_tokens", int, "response cut", default=1024, min=1),
                )
            ),
        ),
        Param("loss", str, "pairwise loss", default="soft", choices=("soft", "hard", "margin")),
        Param("epochs", int, "passes over the data", default=3, min=1, max=1000),
        Param("lr", float, "learning rate (default: by backbone)", min=1e-10, max=0.5),
        Param("batch_size", int, "pairs per step", default=32, min=1, max=4096),
        Param("aspect_weight", float, "weight of the aspect heads' loss", default=0.1, min=0),
        NAME,
    ),
    (one_of("campaign_ids", "jsonl"),),
)


@job_task(kind="reward.train", params=REWARD_TRAIN, queue="models", soft_time_limit=8 * 3600)
def train_reward(job: Job) -> dict:
    """Train a reward model from grading labels (or a preference JSONL) and register it."""
    from evalhub.rewards import train_reward_job

    return train_reward_job(job)


POSTTRAIN_SFT = TRAINING.extend(
    CAMPAIGN_IDS,
    JSONL,
    PROMPT_SET,
    PROMPT_LIMIT,
    rules=(one_of("campaign_ids", "jsonl", "source"),),
)


@job_task(kind="posttrain.sft", params=POSTTRAIN_SFT, queue="models", soft_time_limit=24 * 3600)
def posttrain_sft(job: Job) -> dict:
    """Supervised fine-tuning on demonstrations; registers the result and queues the suites."""
    from evalhub.posttrain import run_posttrain

    return run_posttrain(job, "sft")


POSTTRAIN_DPO = TRAINING.extend(
    CAMPAIGN_IDS,
    Param("jsonl", str, "or a preference JSONL file on the server", max_len=1000),
    Param("loss", str, "DPO or IPO", default="dpo", choices=("dpo", "ipo")),
    rules=(one_of("campaign_ids", "jsonl"),),
)


@job_task(kind="posttrain.dpo", params=POSTTRAIN_DPO, queue="models", soft_time_limit=24 * 3600)
def posttrain_dpo(job: Job) -> dict:
    """Level-aware DPO (``params.loss``: "dpo" or "ipo") from preference labels."""
    from evalhub.posttrain import run_posttrain

    loss = job.params.get("loss", "dpo")
    if loss not in ("dpo", "ipo"):
        raise JobError(f"parameter 'loss' must be 'dpo' or 'ipo', not {loss!r}")
    return run_posttrain(job, loss)


ITEC_ROUND = TRAINING.without("model_id").extend(
    Param(
        "committee",
        list,
        "the models that sample",
        required=True,
        item=int,
        choices=Rows(ModelVersion.objects.filter(kind=ModelVersion.POLICY)),
        choices_doc="ids of registered policy models",
        max_len=32,
    ),
    Param(
        "student",
        int,
        "the model fine-tuned on the best answers (default: the first member)",
        choices=Rows(BUILTIN.filter(kind=ModelVersion.POLICY)),
        choices_doc="the id of a registered policy model with the builtin backend",
    ),
    Param("prompts", list, "the prompts", item=str, max_len=10_000),
    Param("source", str, "or a prompt set", choices=_sources),
    Param("limit", int, "rows of the prompt set (default: all)", min=1),
    Param("n_samples", int, "answers per member and prompt", default=4, min=1, max=64),
    Param("temperature", float, "sampling temperature", default=0.8, min=0.01, max=2),
    Param("max_new_tokens", int, "answer length cap", default=256, min=1, max=32_768),
    Param(
        "reward_model",
        int,
        "the reranker",
        choices=REWARD_MODEL,
        choices_doc="the id of a registered reward model",
    ),
    Param(
        "retrain_from",
        list,
        "or retrain the reranker from all labels of these campaigns",
        item=int,
        choices=Rows(Campaign.objects.all()),
        choices_doc="ids of grading campaigns",
        max_len=1000,
    ),
    Param("reward_name", str, "the retrained reranker's name", pattern=NAME_PATTERN),
    Param(
        "reward_params",
        dict,
        "the retrained reranker's training (as reward.train)",
        fields=REWARD_TRAIN.without("campaign_ids", "jsonl", "name"),
    ),
    Param("round", int, "round number, shown on the iTeC page", min=1),
    Param(
        "campaign",
        dict,
        "publish the committee's samples as a side-by-side campaign",
        fields=GENERATED_CAMPAIGN.without("kind", "turn"),  # always side by side, one turn
    ),
    rules=(one_of("prompts", "source"), one_of("reward_model", "retrain_from")),
)


@job_task(kind="itec.round", params=ITEC_ROUND, queue="models", soft_time_limit=24 * 3600)
def itec_round(job: Job) -> dict:
    """One iTeC round: committee sampling, reward reranking, SFT on the best, a campaign."""
    from evalhub.itec import run_round

    return run_round(job)


def _rl_algorithms():
    from models.posttrain.rl import ALGORITHMS

    return ALGORITHMS


POSTTRAIN_RL = TRAINING.extend(
    Param("algorithm", str, "MDLOO or a baseline", default="mdloo", choices=_rl_algorithms),
    Param("k", int, "samples per prompt", default=4, min=2, max=64),
    Param("prompts_per_step", int, "prompts per iteration", default=8, min=1, max=4096),
    Param("iterations", int, "outer iterations", default=50, min=1, max=1_000_000),
    Param("inner_steps", int, "updates per iteration", default=4, min=1, max=64),
    Param("max_new_tokens", int, "response length cap", default=256, min=1, max=32_768),
    Param("temperature", float, "sampling temperature", default=1.0, min=0.01, max=2),
    Param("md_t", float, "MDLOO temperature", default=1.0, min=1e-6),
    Param("beta", float, "KL strength", default=0.05, min=0, max=100),
    Param("lr", float, "learning rate (default: 1e-6 full, 2e-5 LoRA)", min=1e-10, max=0.5),
    Param("limit", int, "AlpacaEval instructions to constrain", default=256, min=1),
    Param("ifeval_weight", float, "weight of IFEval's checkers", default=1.0, min=0),
    Param("all_or_nothing", bool, "checkers reward only all constraints met", default=False),
    Param(
        "reward_model",
        int,
        "a reward model added to the checkers",
        choices=REWARD_MODEL,
        choices_doc="the id of a registered reward model",
    ),
    Param("reward_weight", float, "weight of the reward model", default=1.0),
    Param("checkpoint_every", int, "steps between resume checkpoints", default=10, min=1),
    rules=(
        Rule(
            "must be above 0 unless a reward_model is given (no reward otherwise)",
            "ifeval_weight",
            lambda p: p.get("ifeval_weight", 1.0) > 0 or bool(p.get("reward_model")),
        ),
    ),
)


@job_task(kind="posttrain.rl", params=POSTTRAIN_RL, queue="models", soft_time_limit=48 * 3600)
def posttrain_rl(job: Job) -> dict:
    """Online RL (MDLOO; RLOO with clipping and REINFORCE as baselines) with verifier and
    reward-model rewards; registers the result and queues the suites."""
    from evalhub.posttrain import run_rl

    return run_rl(job)


COMPRESS = Params(
    (
        MODEL_ID,
        Param("bits", int, "bits of the block projections", default=4, choices=(2, 4)),
        Param(
            "embedding_bits",
            int,
            "bits of the embedding and tied head (null: keep fp32)",
            default=4,
            choices=(2, 4, 8),
            nullable=True,
        ),
        Param(
            "layer_bits",
            dict,
            "projection name → bits, overriding bits",
            item=int,
            choices=(2, 4),
            max_len=1000,
        ),
        Param(
            "target_bpw",
            float,
            "AFM's mixed 2/4-bit at this budget (overrides bits)",
            min=2.0,
            max=4.5,
        ),
        Param("calib_seqs", int, "calibration sequences", default=16, min=1, max=10_000),
        Param("eval_seqs", int, "held-out sequences measured", default=8, min=1, max=10_000),
        Param("max_len", int, "tokens per sequence", default=384, min=8, max=1_000_000),
        NAME,
        SUITES,
        EVAL_LIMIT,
    )
)


@job_task(kind="compress", params=COMPRESS, queue="models", soft_time_limit=12 * 3600)
def compress(job: Job) -> dict:
    """Palettize a registered model, measure it against its parent, register it."""
    from evalhub.compression import run_compress

    return run_compress(job)


ADAPTER_RANK = Param("rank", int, "LoRA rank", default=16, choices=(8, 16, 32, 64))
ADAPTER_RECOVERY = Params(
    (
        Param(
            "model_id",
            int,
            "the compressed model (its parent is the teacher)",
            required=True,
            choices=Rows(BUILTIN.filter(relation=ModelVersion.COMPRESSED)),
            choices_doc="the id of a registered compressed builtin model",
        ),
        ADAPTER_RANK,
        Param("steps", int, "training steps", default=50, min=1, max=1_000_000),
        Param("lr", float, "learning rate", default=1e-4, min=1e-10, max=0.5),
        Param("batch_size", int, "sequences per step", default=4, min=1, max=4096),
        Param("train_seqs", int, "training sequences", default=64, min=1, max=10_000),
        Param("eval_seqs", int, "held-out sequences measured", default=8, min=1, max=10_000),
        Param("max_len", int, "tokens per sequence", default=384, min=8, max=1_000_000),
        Param("seed", int, "seed of initialisation and order", default=0, min=0),
        DEVICE,
        NAME,
        SUITES,
        EVAL_LIMIT,
    )
)


@job_task(
    kind="adapter.recovery", params=ADAPTER_RECOVERY, queue="models", soft_time_limit=12 * 3600
)
def adapter_recovery(job: Job) -> dict:
    """A LoRA adapter that recovers a compressed model's accuracy, by distillation."""
    from evalhub.compression import run_recovery

    return run_recovery(job)


ADAPTER_TRAIN = (
    TRAINING.without("lora_rank", "lora_alpha")
    .with_defaults(batch_size=4, max_len=512)
    .extend(
        Param(
            "model_id",
            int,
            "an adapter to start from, or a policy for a fresh adapter",
            required=True,
            choices=Rows(GENERATORS.filter(backend="builtin")),
            choices_doc="the id of a registered builtin policy or adapter",
        ),
        ADAPTER_RANK,
        CAMPAIGN_IDS,
        JSONL,
        PROMPT_SET,
        PROMPT_LIMIT,
        rules=(one_of("campaign_ids", "jsonl", "source"),),
    )
)


@job_task(kind="adapter.train", params=ADAPTER_TRAIN, queue="models", soft_time_limit=24 * 3600)
def adapter_train(job: Job) -> dict:
    """A task adapter by SFT, from a recovery (or other) adapter or fresh on a policy."""
    from evalhub.compression import run_task_adapter

    return run_task_adapter(job)


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


SAFETY_JUDGE_TRAIN = Params(
    (
        Param(
            "campaign_ids",
            list,
            "single-sided campaigns whose harmlessness grades and unsafe flags label harm",
            required=True,
            item=int,
            choices=Rows(Campaign.objects.filter(kind=SINGLE_SIDED)),
            choices_doc="ids of single-sided grading campaigns",
            max_len=1000,
        ),
        Param("public", bool, "add PyRIT's public train split (objective + harm)", default=True),
        Param("validate", bool, "measure it on PyRIT's held-out test split", default=True),
        Param("l2", float, "ridge of the harm head (the built-in's, by CV)", default=1.0, min=1e-6),
        NAME,
    )
)


@job_task(kind="safety.judge.train", params=SAFETY_JUDGE_TRAIN, queue="models")
def safety_judge_train(job: Job) -> dict:
    """Train the learned safety judge's harm head on campaign labels and register it as a judge
    (lineage: campaigns and labels hash); a safety run chooses it as `learned:<name>`."""
    from evalhub.safety_calibration import train_judge_job

    return train_judge_job(job)
