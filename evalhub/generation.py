"""Generation jobs: responses for a prompt set from one or more registered models, turned into
a grading campaign. Resumable: every finished batch is a JobStep, so a restarted worker only
generates what is missing."""

import itertools
import json
from dataclasses import replace

from django.db import transaction

from core.jobs import JobError, run_steps
from core.models import Job, JobStep
from evalhub.models import ModelVersion, PromptSet
from evalhub.promptsets import (
    BUILTIN,
    PromptSetError,
    content_hash,
    normalise,
    prompt_set_builtin,
    prompt_set_lookup,
)
from evalhub.registry import backend_for
from grading.models import SIDE_BY_SIDE, Campaign
from grading.services import campaign_import
from models.backends import BackendError, GenerationArgs

BATCH = 8
SOURCES = BUILTIN  # built-in prompt sets a job may name as "source"


def records_from(params: dict) -> tuple[PromptSet | None, list[dict]]:
    """The prompt set a job answers and its records (the first ``limit``): a registered
    ``prompt_set`` (id, name or name@version), a built-in ``source``, or inline ``prompts``."""
    prompt_set = None
    if "prompt_set" in params:
        prompt_set = prompt_set_lookup(params["prompt_set"])
        if prompt_set is None:
            raise JobError(f"'prompt_set': no registered prompt set {params['prompt_set']!r}")
    elif "prompts" in params:
        prompts = params["prompts"]
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise JobError("'prompts' must be a non-empty list of strings")
        records = [normalise({"prompt": p}, default_id=str(i)) for i, p in enumerate(prompts, 1)]
        return None, records[: params.get("limit")]
    elif params.get("source") in SOURCES:
        try:
            prompt_set = prompt_set_builtin(params["source"])
        except (PromptSetError, FileNotFoundError) as exc:
            raise JobError(f"'source': {exc}") from exc
    else:
        raise JobError(f"give 'prompt_set', 'prompts' or a 'source' among {sorted(SOURCES)}")
    return prompt_set, prompt_set.records[: params.get("limit")]


def prompts_from(params: dict) -> list[str]:
    """The first user turn of each record of the job's prompt set (single-turn callers)."""
    return [r["turns"][0] for r in records_from(params)[1]]


def set_reference(prompt_set: PromptSet | None, records: list[dict], limit) -> dict:
    """What a job and its campaign record about the prompts they used."""
    used = content_hash(records)
    ref = prompt_set.reference if prompt_set else {"id": None, "name": None, "version": None}
    return {"hash": used, **ref, "records_hash": used, "limit": limit, "records": len(records)}


def pair_plan(n_prompts: int, n_models: int) -> list[tuple[int, int, int]]:
    """(prompt, model a, model b) for side-by-side items: every prompt gets one pair, and the
    pairs of models take turns so each pair of models meets about equally often."""
    return [(p, *_pair_for(p, n_models)) for p in range(n_prompts)]


def run_generation(job: Job) -> dict:
    params = job.params
    models = list(ModelVersion.objects.filter(pk__in=params.get("models", [])))
    if not models or len(models) != len(set(params["models"])):
        raise JobError("'models' must list registered model ids")
    models.sort(key=lambda m: params["models"].index(m.pk))
    prompt_set, records = records_from(params)
    max_turns = int(params.get("turns") or max(len(r["turns"]) for r in records))
    conversations = [r["turns"][:max_turns] for r in records]
    args = GenerationArgs(
        max_new_tokens=int(params.get("max_new_tokens", 256)),
        temperature=float(params.get("temperature", 0.0)),
        seed=int(params.get("seed", 0)),
    )
    reranker, n_samples = _reranker(params), int(params.get("n_samples", 4))
    plan = turn_plan(conversations)
    keys = [
        step_key(m.pk, turn, start)
        for turn, active in enumerate(plan)
        for m in models
        for start in range(0, len(active), BATCH)
    ]
    by_pk = {m.pk: m for m in models}
    answers = Answers(job, plan)

    def generate_batch(key: str) -> list[str]:
        model_pk, turn, start = parse_key(key)
        try:
            backend = backend_for(by_pk[model_pk])
        except BackendError as exc:
            raise JobError(f"model {by_pk[model_pk].name} cannot be loaded: {exc}") from exc
        batch = plan[turn][start : start + BATCH]
        chats = [chat(records[i], answers.earlier(model_pk, i, turn), turn) for i in batch]
        formatted = [backend.chat_format(messages) for messages in chats]
        if reranker is None:
            return backend.generate(formatted, args)
        # Best-of-N: N sampled answers per prompt, the reward model keeps the best one.
        candidates = [
            backend.generate(formatted, replace(args, seed=args.seed + k)) for k in range(n_samples)
        ]
        return [
            options[reranker.rerank(messages, options)]  # read in its conversation
            for messages, options in zip(chats, zip(*candidates, strict=True), strict=True)
        ]

    outputs = run_steps(job, keys, generate_batch, label="batch")
    answers.fill(outputs)
    texts = {m.pk: answers.conversations(m.pk) for m in models}  # [conversation][turn]
    used = set_reference(prompt_set, records, params.get("limit"))
    campaign = _make_campaign(job, models, records, texts, used)
    return {
        "campaign_id": campaign.pk if campaign else None,
        "prompts": len(records),
        "turns": len(plan),
        "models": [m.name for m in models],
        "prompt_set": used,
        "generation_args": args.to_dict(),
    }


def turn_plan(conversations: list[list[str]]) -> list[list[int]]:
    """For each turn, the conversations that have it (turn 1: all of them)."""
    longest = max(len(c) for c in conversations)
    return [[i for i, c in enumerate(conversations) if len(c) > t] for t in range(longest)]


def step_key(model_pk: int, turn: int, start: int) -> str:
    # Turn 1 keeps the single-turn jobs' key, so their ledgers stay valid.
    return f"{model_pk}:{start}" if turn == 0 else f"{model_pk}:t{turn + 1}:{start}"


def parse_key(key: str) -> tuple[int, int, int]:
    parts = key.split(":")
    if len(parts) == 2:
        return int(parts[0]), 0, int(parts[1])
    return int(parts[0]), int(parts[1].removeprefix("t")) - 1, int(parts[2])


class Answers:
    """Each model's answers by conversation and turn, read from the job's ledger: turn t's
    batches all finish before turn t + 1 starts, so an earlier turn's answers are always there,
    whichever attempt wrote them."""

    def __init__(self, job: Job, plan: list[list[int]]):
        self.job, self.plan = job, plan
        self.by_turn: dict[tuple[int, int], dict[int, str]] = {}

    def _turn(self, model_pk: int, turn: int, outputs: dict | None = None) -> dict[int, str]:
        if (model_pk, turn) not in self.by_turn:
            active = self.plan[turn]
            keys = [step_key(model_pk, turn, s) for s in range(0, len(active), BATCH)]
            if outputs is None:
                outputs = dict(
                    JobStep.objects.filter(job=self.job, key__in=keys).values_list("key", "output")
                )
            texts = [t for k in keys for t in outputs[k]]
            self.by_turn[model_pk, turn] = dict(zip(active, texts, strict=True))
        return self.by_turn[model_pk, turn]

    def earlier(self, model_pk: int, conversation: int, turn: int) -> list[str]:
        """The model's own answers to the conversation's turns before ``turn``."""
        return [self._turn(model_pk, t)[conversation] for t in range(turn)]

    def fill(self, outputs: dict) -> None:
        for model_pk in {parse_key(k)[0] for k in outputs}:
            for turn in range(len(self.plan)):
                self._turn(model_pk, turn, outputs)

    def conversations(self, model_pk: int) -> list[list[str]]:
        n = len(self.plan[0])
        turns = [self._turn(model_pk, t) for t in range(len(self.plan))]
        return [[by[i] for by in turns if i in by] for i in range(n)]


def chat(record: dict, earlier: list[str], turn: int) -> list[dict]:
    """Chat messages asking for ``turn`` (0-based) of a record, with the model's ``earlier``
    answers in place: MT-Bench's protocol."""
    messages = [{"role": "system", "content": record["system"]}] if record["system"] else []
    for question, answer in zip(record["turns"][:turn], earlier, strict=True):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages + [{"role": "user", "content": record["turns"][turn]}]


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


def _make_campaign(job: Job, models, records, texts, used: dict):
    """The grading campaign ``job.params["campaign"]`` asks for: one ``turn`` (1-based) of each
    conversation that has it; without one, side by side grades the whole conversation and
    single-sided grades every turn as its own item."""
    spec = job.params.get("campaign")
    if not spec:
        return None
    kind = spec.get("kind", SIDE_BY_SIDE if len(models) > 1 else "single_sided")
    if kind == SIDE_BY_SIDE and len(models) < 2:
        raise JobError("a side-by-side campaign needs at least two models")
    turn = spec.get("turn")
    longest = max(len(t) for t in texts[models[0].pk])
    if turn is not None and not (isinstance(turn, int) and 1 <= turn <= longest):
        raise JobError(f"'campaign.turn' must be a turn from 1 to {longest}")
    base = {"job": job.pk, "prompt_set": used["name"], "prompt_set_version": used["version"],
            "prompt_set_hash": used["hash"]}  # fmt: skip
    rows = []
    for i, record in enumerate(records):
        n = len(texts[models[0].pk][i])
        meta = {**base, "record": record["id"], "category": record["category"]}
        if turn is None and kind == SIDE_BY_SIDE:
            whole = {**meta, "reference": record["reference"]} if record["reference"] else meta
            rows += _conversation_rows(models, record, texts, i, whole)
            continue
        for t in [turn - 1] if turn is not None else range(n):
            if t < n:
                at = {**meta, "turn": t + 1, **_reference(record, t)}
                rows += _turn_rows(kind, models, record, texts, i, t, at)
    return campaign_from_rows(job, spec, kind, rows)


def _turn_rows(kind, models, record, texts, i, t, meta) -> list[dict]:
    """Items grading turn ``t`` (0-based) of conversation ``i``. Single-sided: the model's own
    earlier turns are the item's context. Side by side after turn 1 the two models' earlier
    answers differ, so each side shows its own before the graded answer."""
    if kind != SIDE_BY_SIDE:
        return [
            {
                **_asked(chat(record, texts[m.pk][i][:t], t)),
                "response": texts[m.pk][i][t],
                "model": m.name,
                "metadata": meta,
            }  # fmt: skip
            for m in models
        ]
    asked = _asked(chat(record, [], 0)) if t == 0 else {"prompt": record["turns"][t]}
    a, b = _pair_for(i, len(models))
    return [
        {
            **asked,
            "response_a": _with_history(record, texts[models[a].pk][i], t),
            "response_b": _with_history(record, texts[models[b].pk][i], t),
            "model_a": models[a].name,
            "model_b": models[b].name,
            "metadata": meta,
        }
    ]


def _conversation_rows(models, record, texts, i, meta) -> list[dict]:
    """A side-by-side item on a whole conversation: the first user turn is the prompt and each
    side is its model's answer followed by the rest of its conversation."""
    a, b = _pair_for(i, len(models))
    turns = len(texts[models[0].pk][i])
    return [
        {
            **_asked(chat(record, [], 0)),
            "response_a": _whole(record, texts[models[a].pk][i]),
            "response_b": _whole(record, texts[models[b].pk][i]),
            "model_a": models[a].name,
            "model_b": models[b].name,
            "metadata": {**meta, "turn": "all" if turns > 1 else 1},
        }
    ]


def _reference(record: dict, t: int) -> dict:
    """Turn ``t``'s reference answer as item metadata (what the LLM judge reads), if any."""
    refs = record["reference"]
    return {"reference": refs[t]} if t < len(refs) and refs[t] is not None else {}


def _pair_for(index: int, n_models: int) -> tuple[int, int]:
    pairs = list(itertools.combinations(range(n_models), 2))
    return pairs[index % len(pairs)]


def _asked(messages: list[dict]) -> dict:
    """Upload-row fields for the messages before a response: a plain ``prompt`` when there is
    only the user's message, else the conversation (``messages``)."""
    return {"prompt": messages[0]["content"]} if len(messages) == 1 else {"messages": messages}


def _with_history(record: dict, answers: list[str], t: int) -> str:
    if t == 0:
        return answers[0]
    earlier = "\n\n".join(
        f"> **User (turn {k + 1}):** {_quoted(record['turns'][k])}\n>\n"
        f"> **Assistant:** {_quoted(answers[k])}"
        for k in range(t)
    )
    return f"*Earlier in this conversation:*\n\n{earlier}\n\n---\n\n{answers[t]}"


def _whole(record: dict, answers: list[str]) -> str:
    later = "".join(
        f"\n\n---\n\n**User (turn {k + 1}):** {record['turns'][k]}\n\n**Assistant:** {answers[k]}"
        for k in range(1, len(answers))
    )
    return answers[0] + later


def _quoted(text: str) -> str:
    return text.replace("\n", "\n> ")


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
