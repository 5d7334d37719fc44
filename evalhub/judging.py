"""LLM-as-judge on grading campaigns: the ``judge`` job and the agreement report.

The job judges a campaign's regular (non-gold) items with a registered model (an
OpenAI-compatible endpoint is registered as an ``openai_http`` model): side-by-side items
pairwise with the position swap, single-sided items 1–10 (``suites.llm_judge``). Verdicts are
``JudgeVerdict`` rows; batches are resume steps, so a restarted worker judges only the rest.

The report puts each judge's agreement with the human labels of the same items beside the
raters' agreement with each other (MT-Bench's with/without-ties figures for pairwise; exact,
within-one and mean gap on the 1–5 scale for single-sided, the judge's 1–10 halved). This
module loads rows and stores results; the prompts, parsing and maths live in
``suites/llm_judge.py``. Judge output is shown on researcher pages only.
"""

import math
from collections import defaultdict

from core.jobs import JobError, run_steps
from core.models import Job
from evalhub.models import JudgeVerdict, ModelVersion
from evalhub.registry import backend_for
from grading.models import Campaign, Item, Label
from models.backends import BackendError, GenerationArgs
from suites import llm_judge
from suites.llm_judge import Case, LLMJudge

BATCH = 8  # items per generate call (pairwise: twice as many prompts, for the swap)
DEFAULTS = {"max_new_tokens": llm_judge.JUDGE_ARGS.max_new_tokens, "swap": True}


def is_pairwise(campaign: Campaign) -> bool:
    """Items with two responses are judged pairwise, with one rated 1–10."""
    return campaign.task_kind.responses == 2


def case_for(item: Item, texts: list[str]) -> Case:
    """The judge's view of an item: its conversation (earlier user turns and answers from
    ``context``), the graded prompt, the response text(s) in uploaded order, and a reference
    answer from ``metadata["reference"]`` (text, or a list with one per user turn)."""
    turns = [m for m in item.context if m.get("role") in ("user", "assistant")]
    questions = [m["content"] for m in turns if m["role"] == "user"]
    earlier = [m["content"] for m in turns if m["role"] == "assistant"]
    if len(earlier) != len(questions):  # not a clean user/assistant alternation: grade alone
        questions, earlier = [], []
    questions.append(item.prompt)
    reference = item.metadata.get("reference") if isinstance(item.metadata, dict) else None
    if isinstance(reference, list):
        index = len(questions) - 1
        reference = reference[index] if index < len(reference) else None
    answers = tuple((*earlier, t) for t in texts)
    return Case(tuple(questions), answers, str(reference) if reference else None)


def run_judge(job: Job) -> dict:
    params = {**DEFAULTS, **job.params}
    campaign = Campaign.objects.filter(pk=params["campaign_id"]).first()
    model = ModelVersion.objects.filter(pk=params["model_id"]).first()
    if campaign is None or model is None:
        raise JobError("the campaign or the judge model no longer exists")
    items = list(
        Item.objects.filter(campaign=campaign, is_gold=False)
        .prefetch_related("responses")
        .order_by("id")[: params.get("limit")]
    )
    args = GenerationArgs(max_new_tokens=int(params["max_new_tokens"]), temperature=0.0)
    pairwise = is_pairwise(campaign)
    judge: list[LLMJudge] = []  # loaded on the first batch this attempt runs

    def batch(key: str) -> list[dict]:
        if not judge:
            try:
                judge.append(LLMJudge(backend_for(model), model.name, args))
            except BackendError as exc:
                raise JobError(f"judge model {model.name} cannot be loaded: {exc}") from exc
        chunk = items[int(key) : int(key) + BATCH]
        cases = [case_for(i, [r.text for r in i.responses.all()]) for i in chunk]
        if pairwise:
            found = judge[0].compare(cases, swap=bool(params["swap"]))
            return [_pair_row(i, v) for i, v in zip(chunk, found, strict=True)]
        found = judge[0].rate(cases)
        return [_single_row(i, v) for i, v in zip(chunk, found, strict=True)]

    done = run_steps(job, [str(s) for s in range(0, len(items), BATCH)], batch, label="items")
    rows = [JudgeVerdict(job=job, **row) for out in done.values() for row in out]
    JudgeVerdict.objects.bulk_create(rows, ignore_conflicts=True)  # a redelivery adds none
    report = judge_summary(job)
    return {
        "campaign_id": campaign.pk,
        "judge": model.name,
        "judge_version": LLMJudge.version,
        "generation_args": args.to_dict(),
        **{k: _finite(report[k]) for k in ("n", "unparseable", "agreement", "human")},
    }


def _finite(value):
    """NaN (no pairs to agree on) as None: PostgreSQL's JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _pair_row(item: Item, v: llm_judge.PairVerdict) -> dict:
    return {
        "item_id": item.pk,
        "mode": JudgeVerdict.PAIRWISE,
        "prompt": v.prompt,
        "winner": v.winner or "",
        "consistent": v.consistent,
        "outputs": list(v.outputs),
    }


def _single_row(item: Item, v: llm_judge.Rating) -> dict:
    return {
        "item_id": item.pk,
        "mode": JudgeVerdict.SINGLE,
        "prompt": v.prompt,
        "rating": v.rating,
        "outputs": [v.output],
    }


# ----------------------------------------------------------------------------- report
def human_votes(campaign: Campaign) -> dict[int, list]:
    """Item id → the raters' votes on regular items: "A"/"B"/"tie" by uploaded position
    (side by side), or each label's overall grade, the rounded mean of its aspect scores
    (single-sided, 1–5)."""
    labels = Label.objects.filter(campaign=campaign, item__is_gold=False)
    votes: dict[int, list] = defaultdict(list)
    if is_pairwise(campaign):
        for item_id, position in labels.values_list("item_id", "preferred__position"):
            votes[item_id].append({0: "A", 1: "B"}.get(position, "tie"))
        return votes
    for item_id, scores in labels.values_list("item_id", "scores"):
        values = [float(v) for v in (scores or {}).values()]
        if values:
            votes[item_id].append(int(sum(values) / len(values) + 0.5))  # half up
    return votes


def judge_votes(job: Job) -> dict[int, list]:
    """Item id → [the judge's vote] on the scale of ``human_votes`` (None: unparseable)."""
    votes = {}
    for v in JudgeVerdict.objects.filter(job=job).only("item_id", "mode", "winner", "rating"):
        if v.mode == JudgeVerdict.PAIRWISE:
            votes[v.item_id] = [v.winner or None]
        else:
            votes[v.item_id] = [None if v.rating is None else llm_judge.rating_to_five(v.rating)]
    return votes


def human_agreement(campaign: Campaign, humans: dict | None = None) -> dict:
    """The raters' agreement with each other on the campaign's regular items."""
    humans = human_votes(campaign) if humans is None else humans
    if is_pairwise(campaign):
        return llm_judge.human_human_agreement(humans)
    return llm_judge.human_grade_agreement(humans)


def judge_summary(job: Job, humans: dict | None = None) -> dict:
    """One judge job's figures: verdicts, unparseable ones, inconsistent (swap) ones, its
    agreement with the human labels of the same items and the humans' with each other."""
    campaign = Campaign.objects.get(pk=job.params["campaign_id"])
    humans = human_votes(campaign) if humans is None else humans
    verdicts = judge_votes(job)
    if is_pairwise(campaign):
        agreement = llm_judge.judge_human_agreement(verdicts, humans)
    else:
        agreement = llm_judge.judge_grade_agreement(verdicts, humans)
    inconsistent = JudgeVerdict.objects.filter(job=job, consistent=False).count()
    return {
        "job": job,
        "n": len(verdicts),
        "unparseable": sum(v == [None] for v in verdicts.values()),
        "inconsistent": inconsistent,
        "items_with_humans": sum(1 for i in verdicts if humans.get(i)),
        "agreement": agreement,
        "human": human_agreement(campaign, humans),
    }


def judge_jobs(campaign: Campaign):
    return Job.objects.filter(kind="judge", params__campaign_id=campaign.pk).order_by("-id")


def campaign_judge_report(campaign: Campaign) -> dict:
    """Every judge job of the campaign with its figures (finished ones), the raters' own
    agreement, and MT-Bench's published figures for scale."""
    humans = human_votes(campaign)
    jobs = list(judge_jobs(campaign).select_related("created_by")[:20])
    return {
        "human": human_agreement(campaign, humans),
        "judges": [
            judge_summary(j, humans) if j.status == Job.SUCCEEDED else {"job": j} for j in jobs
        ],
        "mt_bench": llm_judge.MT_BENCH_REPORTED,
        "pairwise": is_pairwise(campaign),
    }
