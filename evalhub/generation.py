"""Generation jobs: responses for a prompt set from one or more registered models, turned into
a grading campaign. Resumable: every finished batch is a JobStep, so a restarted worker only
generates what is missing."""

import itertools
import json
from dataclasses import replace

from django.db import transaction

from core.jobs import JobError, run_steps
from core.models import Job
from evalhub.models import ModelVersion
from evalhub.registry import backend_for
from grading.models import SIDE_BY_SIDE, Campaign
from grading.services import campaign_import
from models.backends import BackendError, GenerationArgs
from suites.prompts import alpaca_eval_singles, arena_hard_pairs

BATCH = 8
SOURCES = {
    "arena-hard": lambda limit: [r["prompt"] for r in arena_hard_pairs(limit)],
    "alpaca-eval": lambda limit: [r["prompt"] for r in alpaca_eval_singles(limit)],
}


def prompts_from(params: dict) -> list[str]:
    if "prompts" in params:
        prompts = params["prompts"]
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise JobError("'prompts' must be a non-empty list of strings")
        return prompts
    source = params.get("source")
    if source not in SOURCES:
        raise JobError(f"give 'prompts' or a 'source' among {sorted(SOURCES)}")
    return SOURCES[source](params.get("limit"))


def pair_plan(n_prompts: int, n_models: int) -> list[tuple[int, int, int]]:
    """(prompt, model a, model b) for side-by-side items: every prompt gets one pair, and the
    pairs of models take turns so each pair of models meets about equally often."""
    pairs = list(itertools.combinations(range(n_models), 2))
    return [(p, *pairs[p % len(pairs)]) for p in range(n_prompts)]


def run_generation(job: Job) -> dict:
    params = job.params
    models = list(ModelVersion.objects.filter(pk__in=params.get("models", [])))
    if not models or len(models) != len(set(params["models"])):
        raise JobError("'models' must list registered model ids")
    models.sort(key=lambda m: params["models"].index(m.pk))
    prompts = prompts_from(params)
    args = GenerationArgs(
        max_new_tokens=int(params.get("max_new_tokens", 256)),
        temperature=float(params.get("temperature", 0.0)),
        seed=int(params.get("seed", 0)),
    )
    reranker, n_samples = _reranker(params), int(params.get("n_samples", 4))
    keys = [f"{m.pk}:{start}" for m in models for start in range(0, len(prompts), BATCH)]
    by_pk = {m.pk: m for m in models}

    def generate_batch(key: str) -> list[str]:
        model_pk, start = map(int, key.split(":"))
        try:
            backend = backend_for(by_pk[model_pk])
        except BackendError as exc:
            raise JobError(f"model {by_pk[model_pk].name} cannot be loaded: {exc}") from exc
        batch = prompts[start : start + BATCH]
        formatted = [backend.chat_format([{"role": "user", "content": p}]) for p in batch]
        if reranker is None:
            return backend.generate(formatted, args)
        # Best-of-N: N sampled answers per prompt, the reward model keeps the best one.
        candidates = [
            backend.generate(formatted, replace(args, seed=args.seed + k)) for k in range(n_samples)
        ]
        return [
            options[reranker.rerank(prompt, options)]
            for prompt, options in zip(batch, zip(*candidates, strict=True), strict=True)
        ]

    outputs = run_steps(job, keys, generate_batch, label="batch")
    answers = {
        m.pk: [
            text for start in range(0, len(prompts), BATCH) for text in outputs[f"{m.pk}:{start}"]
        ]
        for m in models
    }
    campaign = _make_campaign(job, models, prompts, answers)
    return {
        "campaign_id": campaign.pk if campaign else None,
        "prompts": len(prompts),
        "models": [m.name for m in models],
        "generation_args": args.to_dict(),
    }


def _reranker(params: dict):
    if not params.get("reranker"):
        return None
    from evalhub.rewards import reward_model_for

    version = ModelVersion.objects.filter(pk=params["reranker"], kind=ModelVersion.REWARD).first()
    if version is None:
        raise JobError("'reranker' must be the id of a registered reward model")
    if float(params.get("temperature", 0.0)) <= 0:
        raise JobError("best-of-N reranking needs sampling: set a temperature above 0")
    return reward_model_for(version)


def _make_campaign(job: Job, models, prompts, answers):
    spec = job.params.get("campaign")
    if not spec:
        return None
    kind = spec.get("kind", SIDE_BY_SIDE if len(models) > 1 else "single_sided")
    if kind == SIDE_BY_SIDE and len(models) < 2:
        raise JobError("a side-by-side campaign needs at least two models")
    if kind == SIDE_BY_SIDE:
        rows = [
            {
                "prompt": prompts[p],
                "response_a": answers[models[a].pk][p],
                "response_b": answers[models[b].pk][p],
                "model_a": models[a].name,
                "model_b": models[b].name,
                "metadata": {"job": job.pk},
            }
            for p, a, b in pair_plan(len(prompts), len(models))
        ]
    else:
        rows = [
            {
                "prompt": prompt,
                "response": answers[m.pk][p],
                "model": m.name,
                "metadata": {"job": job.pk},
            }
            for m in models
            for p, prompt in enumerate(prompts)
        ]
    return campaign_from_rows(job, spec, kind, rows)


def campaign_from_rows(job: Job, spec: dict, kind: str, rows: list[dict]) -> Campaign:
    """A grading campaign made by a job from upload-format rows (``spec``: name, overlap,
    guidelines); a redelivered job finds the campaign it already made instead of a second."""
    name = spec.get("name") or f"Generated by job {job.pk}"
    with transaction.atomic():
        existing = Campaign.objects.filter(name=name).first()
        if existing is not None:
            return existing
        campaign = Campaign.objects.create(
            name=name,
            kind=kind,
            created_by=job.created_by,
            overlap=int(spec.get("overlap", 3)),
            guidelines=spec.get("guidelines", ""),
        )
        data = "\n".join(json.dumps(r) for r in rows).encode()
        campaign_import(campaign=campaign, data=data, filename="generated.jsonl")
    return campaign
