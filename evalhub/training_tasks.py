"""The training jobs: reward models, post-training (SFT, DPO/IPO, online RL, iTeC rounds),
compression and adapters, and learned safety judges. Registered when ``evalhub.tasks`` (what
Celery discovers) imports this module; thin wrappers like the tasks there."""

from core.jobs import JobError, job_task
from core.models import Job
from core.params import Param, Params, Rows, Rule, one_of
from evalhub.job_params import (
    BUILTIN,
    CAMPAIGN_IDS,
    DEVICE,
    EVAL_LIMIT,
    GENERATED_CAMPAIGN,
    GENERATORS,
    JSONL,
    MODEL_ID,
    NAME,
    NAME_PATTERN,
    PROMPT_LIMIT,
    PROMPT_SET,
    REWARD_MODEL,
    SUITES,
    TRAINING,
    prompt_sources,
)
from evalhub.models import ModelVersion
from grading.models import SINGLE_SIDED, Campaign

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
    Param("source", str, "or a prompt set", choices=prompt_sources),
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
        Param("lr", float, "learning rate", default=1e-3, min=1e-10, max=0.5),
        Param("batch_size", int, "sequences per step", default=4, min=1, max=4096),
        Param("train_seqs", int, "training sequences", default=64, min=1, max=10_000),
        Param("eval_seqs", int, "held-out sequences measured", default=8, min=1, max=10_000),
        Param(
            "init",
            str,
            "adapter start: 'error' (each layer's compression error, best rank-r fit) or "
            "'zero' (B = 0)",
            default="error",
            choices=("error", "zero"),
        ),
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
