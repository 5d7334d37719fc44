"""iTeC rounds: the iterative teaching committee of AFM's post-training (Gunter et al. 2024,
arXiv:2407.21075, §5.3). A committee of model versions (the latest from SFT, DPO, RL and the
best of earlier rounds) samples N answers per prompt each; the latest reward model reranks
every candidate; the student is fine-tuned on the best one per prompt (rejection sampling);
and the committee's samples can become a new side-by-side grading campaign, whose labels
retrain the reward model at the start of the next round.

A round is one resumable job (``itec.round``): the sampled and scored batches are job steps, so
a restarted worker samples only what is missing; the training is the post-training jobs' own
(``evalhub.posttrain.train_and_register``). The rounds page lists rounds with their members,
rewards, suite scores and campaign progress.
"""

import random
from dataclasses import replace

from django.db.models import Count

from core.jobs import JobError, run_steps
from core.models import Job
from evalhub.generation import BATCH, campaign_from_rows, prompts_from
from evalhub.models import ModelVersion
from evalhub.posttrain import (
    policy_param,
    suites_param,
    train_and_register,
    training_params,
)
from evalhub.registry import backend_for
from grading.models import SIDE_BY_SIDE, Campaign, Label
from models.backends import BackendError, GenerationArgs

KIND = "itec.round"


def run_round(job: Job) -> dict:
    """The body of an ``itec.round`` job."""
    p = job.params
    committee = _committee(p)
    student = policy_param({"student": p.get("student", committee[0].pk)}, "student")
    hp, suites = training_params(p), suites_param(p)
    prompts = prompts_from(p)
    args = GenerationArgs(
        max_new_tokens=int(p.get("max_new_tokens", 256)),
        temperature=float(p.get("temperature", 0.8)),
        seed=int(p.get("seed", 0)),
    )
    if args.temperature <= 0:
        raise JobError("the committee must sample: set a temperature above 0")
    n = int(p.get("n_samples", 4))
    if not 1 <= n <= 64:
        raise JobError("'n_samples' must be between 1 and 64")
    reward_model = _reward_model(job)
    scorer = _scorer(reward_model)

    def sample(key: str) -> list[list[dict]]:
        member_pk, start = map(int, key.split(":"))
        member = next(m for m in committee if m.pk == member_pk)
        try:
            backend = backend_for(member)
        except BackendError as exc:
            raise JobError(f"committee member {member.name} cannot be loaded: {exc}") from exc
        batch = prompts[start : start + BATCH]
        formatted = [backend.chat_format([{"role": "user", "content": q}]) for q in batch]
        draws = [backend.generate(formatted, replace(args, seed=args.seed + k)) for k in range(n)]
        texts = [[draws[k][i] for k in range(n)] for i in range(len(batch))]
        flat_prompts = [q for q, options in zip(batch, texts, strict=True) for _ in options]
        scores = scorer.score(flat_prompts, [t for options in texts for t in options])
        it = iter(scores)
        return [[{"text": t, "reward": round(next(it), 6)} for t in options] for options in texts]

    keys = [f"{m.pk}:{s}" for m in committee for s in range(0, len(prompts), BATCH)]
    outputs = run_steps(job, keys, sample, label="committee batch")
    # candidates[i]: (member, text, reward) for every sample of prompt i, members in order
    candidates: list[list[tuple[ModelVersion, str, float]]] = [[] for _ in prompts]
    for m in committee:
        for start in range(0, len(prompts), BATCH):
            for i, options in enumerate(outputs[f"{m.pk}:{start}"]):
                candidates[start + i] += [(m, o["text"], o["reward"]) for o in options]
    best = [max(c, key=lambda x: x[2]) for c in candidates]
    stats = _committee_stats(committee, candidates, best)
    job.set_data(itec=stats)
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": b[1]}]
        for q, b in zip(prompts, best, strict=True)
    ]
    campaign = _campaign(job, prompts, candidates)
    source = {
        "committee": [m.name for m in committee],
        "reward_model": reward_model.name,
        "reward_model_id": reward_model.pk,
        "prompts": len(prompts),
        "n_samples": n,
        "generation_args": args.to_dict(),
        "round": p.get("round"),
    }
    result = train_and_register(
        job, student, "sft", conversations, source, hp, suites, label="itec"
    )
    return {
        **result,
        "round": p.get("round"),
        "committee": [m.name for m in committee],
        "reward_model": reward_model.name,
        "campaign_id": campaign.pk if campaign else None,
        **stats,
    }


def _committee(p: dict) -> list[ModelVersion]:
    ids = p.get("committee")
    if not isinstance(ids, list) or not ids:
        raise JobError("'committee' must list the ids of registered policy models")
    found = {m.pk: m for m in ModelVersion.objects.filter(pk__in=ids, kind=ModelVersion.POLICY)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise JobError(f"'committee': no registered policy models with ids {missing}")
    return [found[i] for i in dict.fromkeys(ids)]


def _reward_model(job: Job) -> ModelVersion:
    """The reranker: a registered reward model, or one trained now from all the labels of
    ``retrain_from`` (campaign ids: every earlier round's campaign), which then joins the
    registry like any reward model."""
    p = job.params
    if p.get("retrain_from"):
        from evalhub.rewards import train_reward_job

        name = p.get("reward_name") or f"reward-itec-job{job.pk}"
        existing = ModelVersion.objects.filter(name=name, kind=ModelVersion.REWARD).first()
        if existing is None:  # a redelivered round does not retrain
            params = {"campaign_ids": p["retrain_from"], "name": name}
            params.update(p.get("reward_params", {}))
            train_reward_job(job, params)
            existing = ModelVersion.objects.get(name=name)
        return existing
    version = ModelVersion.objects.filter(
        pk=p.get("reward_model"), kind=ModelVersion.REWARD
    ).first()
    if version is None:
        raise JobError("'reward_model' must be a registered reward model (or give retrain_from)")
    return version


def _scorer(version: ModelVersion):
    from evalhub.rewards import reward_model_for

    return reward_model_for(version)


def _committee_stats(committee, candidates, best) -> dict:
    """Mean reward of each member's samples and of its best, and how often each member
    supplied the chosen answer: which members still teach."""
    members = {}
    for m in committee:
        rewards = [r for c in candidates for (who, _, r) in c if who.pk == m.pk]
        bests = [max(r for (who, _, r) in c if who.pk == m.pk) for c in candidates]
        members[m.name] = {
            "mean_reward": round(sum(rewards) / len(rewards), 4),
            "mean_best_reward": round(sum(bests) / len(bests), 4),
            "chosen_share": round(sum(b[0].pk == m.pk for b in best) / len(best), 4),
        }
    return {
        "members": members,
        "mean_chosen_reward": round(sum(b[2] for b in best) / len(best), 4),
    }


def _campaign(job: Job, prompts: list[str], candidates) -> Campaign | None:
    """The committee's samples as a side-by-side campaign: per prompt, the best sample of the
    two members whose best scored highest (one member: its best against a random other
    sample), so raters judge the answers the committee would teach."""
    spec = job.params.get("campaign")
    if not spec:
        return None
    rng = random.Random(job.pk)
    rows = []
    for prompt, options in zip(prompts, candidates, strict=True):
        by_member: dict[int, tuple[ModelVersion, str, float]] = {}
        for cand in sorted(options, key=lambda x: -x[2]):
            by_member.setdefault(cand[0].pk, cand)
        tops = list(by_member.values())
        if len(tops) >= 2:
            a, b = tops[0], tops[1]
        else:
            others = [c for c in options if c is not tops[0]] or [tops[0]]
            a, b = tops[0], rng.choice(others)
        if rng.random() < 0.5:  # which side is the reranker's favourite must not be a tell
            a, b = b, a
        rows.append(
            {
                "prompt": prompt,
                "response_a": a[1],
                "response_b": b[1],
                "model_a": a[0].name,
                "model_b": b[0].name,
                "metadata": {"job": job.pk, "reward_a": a[2], "reward_b": b[2]},
            }
        )
    spec = {"name": f"iTeC round {job.params.get('round') or job.pk}", **spec}
    return campaign_from_rows(job, spec, SIDE_BY_SIDE, rows)


def rounds() -> list[dict]:
    """Every iTeC round, newest first, with what its page shows: members, reward model, the
    result's suite scores and the campaign's labelling progress."""
    from evalhub.leaderboard import latest_scores

    jobs = list(Job.objects.filter(kind=KIND).order_by("-created_at")[:100])
    model_ids = [j.result.get("model_id") for j in jobs if isinstance(j.result, dict)]
    campaign_ids = [j.result.get("campaign_id") for j in jobs if isinstance(j.result, dict)]
    scores = latest_scores([i for i in model_ids if i])
    campaigns = {
        c.pk: c
        for c in Campaign.objects.filter(pk__in=campaign_ids).annotate(n_items=Count("items"))
    }
    labels = dict(
        Label.objects.filter(campaign_id__in=campaign_ids)
        .values_list("campaign_id")
        .annotate(n=Count("id"))
        .values_list("campaign_id", "n")
    )
    out = []
    for job in jobs:
        result = job.result if isinstance(job.result, dict) else {}
        campaign = campaigns.get(result.get("campaign_id"))
        needed = campaign.n_items * campaign.overlap if campaign else 0
        out.append(
            {
                "job": job,
                "round": job.params.get("round"),
                "result": result,
                "scores": scores.get(result.get("model_id"), {}),
                "campaign": campaign,
                "labels": labels.get(campaign.pk, 0) if campaign else 0,
                "labels_needed": needed,
            }
        )
    return out


def next_round_number() -> int:
    return Job.objects.filter(kind=KIND).count() + 1
