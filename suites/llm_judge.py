"""LLM-as-judge: a language model grades answers, following MT-Bench's judge protocol.

Zheng, L. et al. (2023). *Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena.* NeurIPS
2023 Datasets and Benchmarks. arXiv:2306.05685. The protocol (§3.1, appendix A):
- single-answer grading: the judge explains, then rates the answer 1–10 as "[[rating]]";
- pairwise comparison: the judge explains, then gives "[[A]]", "[[B]]" or "[[C]]" (tie);
  every pair is judged twice with the answers' positions swapped, and a verdict that changes
  with the order counts as a tie (§3.4, "conservative" position-bias handling);
- reference-guided variants for maths and reasoning: the judge sees a reference answer first;
- multi-turn variants: the judge sees the whole conversation and grades the last answer.
The prompts below are our own wording of that protocol (`PROMPTS`, each with a name and a
version recorded with every verdict). Parsing is strict about the verdict format and records
an output it cannot read as unparseable (None), never as a guess.

Agreement, as the paper measures it (§4.2, Table 2): the probability that a judge's verdict
and a human's on the same item agree, pooled over all (judge vote, human vote) pairs, with
ties counted ("with ties", their setup S1) and with every pair involving a tie left out
("without ties", S2); human–human agreement is the same over pairs of distinct humans. The
paper reports GPT-4 vs experts 66% / 85% and expert vs expert 63% / 81% (S1 / S2).

Runs on any `models.backends` Backend (`generate` + `chat_format`). No Django here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from models.backends.base import Backend, GenerationArgs

# MT-Bench judges at temperature 0 with up to 2048 new tokens; explanations rarely need more
# than a few hundred, and a verdict cut off before its "[[...]]" is recorded as unparseable.
JUDGE_ARGS = GenerationArgs(max_new_tokens=512, temperature=0.0)
VOTES = ("A", "B", "tie")  # pairwise verdicts; A and B are the answers as given, not as shown
MT_BENCH_REPORTED = {  # arXiv:2306.05685 Table 2, MT-Bench, setups S1 (ties) and S2 (no ties)
    "gpt-4 vs human": {"with_ties": 0.66, "without_ties": 0.85},
    "human vs human": {"with_ties": 0.63, "without_ties": 0.81},
}


@dataclass(frozen=True)
class JudgePrompt:
    name: str  # recorded with every verdict, e.g. "single-v1"
    mode: str  # "single" (1–10 rating) or "pairwise" ([[A]]/[[B]]/[[C]])
    system: str
    template: str  # str.format fields: question/answer(_a/_b)/reference/conversation(_a/_b)
    reference: bool = False
    multi_turn: bool = False


_IMPARTIAL = (
    "You are an impartial judge. Evaluate the quality of the AI assistant's answer to the "
    "user question below: consider how helpful, relevant, accurate, deep, creative and "
    "detailed it is. Begin with a short explanation and be as objective as possible. "
)
_RATE = (
    "After your explanation, rate the answer on a scale of 1 to 10 written exactly in this "
    'format: "[[rating]]", for example: "Rating: [[5]]".'
)
_REF_SINGLE = (
    "You are an impartial judge. Evaluate the quality of the AI assistant's answer to the "
    "user question below. A reference answer is given: compare the assistant's answer with "
    "it, and find and correct any mistakes. Begin with a short explanation and be as "
    "objective as possible. "
)
_PAIR = (
    "You are an impartial judge. Compare the answers of two AI assistants to the user "
    "question below and decide which one answers it better: the one that follows the user's "
    "instructions and answers the question more helpfully, relevantly, accurately, deeply, "
    "creatively and in more useful detail. Begin with a short comparison and explanation. "
    "Do not let the order in which the answers appear, their length or the assistants' names "
    "influence you; be as objective as possible. "
)
_REF_PAIR = (
    "You are an impartial judge. Compare the answers of two AI assistants to the user "
    "question below and decide which one answers it better. A reference answer is given: "
    "compare both answers with it and find any mistakes. Begin with a short explanation. "
    "Do not let the order in which the answers appear or their length influence you; be as "
    "objective as possible. "
)
_VERDICT = (
    'After your explanation, give your final verdict exactly in this format: "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
_MULTI = "Focus on the assistant's answer to the user's last question. "
_MULTI_PAIR = "Focus on the two assistants' answers to the user's last question. "

PROMPTS: dict[str, JudgePrompt] = {
    p.name: p
    for p in (
        JudgePrompt(
            "single-v1", "single", _IMPARTIAL + _RATE,
            "[Question]\n{question}\n\n[The Start of the Assistant's Answer]\n{answer}\n"
            "[The End of the Assistant's Answer]",
        ),
        JudgePrompt(
            "single-ref-v1", "single", _REF_SINGLE + _RATE,
            "[Question]\n{question}\n\n[The Start of the Reference Answer]\n{reference}\n"
            "[The End of the Reference Answer]\n\n[The Start of the Assistant's Answer]\n"
            "{answer}\n[The End of the Assistant's Answer]",
            reference=True,
        ),
        JudgePrompt(
            "single-multi-v1", "single", _IMPARTIAL + _MULTI + _RATE,
            "<|The Start of the Conversation|>\n{conversation}\n<|The End of the Conversation|>",
            multi_turn=True,
        ),
        JudgePrompt(
            "single-ref-multi-v1", "single", _REF_SINGLE + _MULTI + _RATE,
            "<|The Start of the Reference Answer|>\n{reference}\n<|The End of the Reference "
            "Answer|>\n\n<|The Start of the Conversation|>\n{conversation}\n"
            "<|The End of the Conversation|>",
            reference=True, multi_turn=True,
        ),
        JudgePrompt(
            "pair-v1", "pairwise", _PAIR + _VERDICT,
            "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
            "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n"
            "{answer_b}\n[The End of Assistant B's Answer]",
        ),
        JudgePrompt(
            "pair-ref-v1", "pairwise", _REF_PAIR + _VERDICT,
            "[User Question]\n{question}\n\n[The Start of the Reference Answer]\n{reference}\n"
            "[The End of the Reference Answer]\n\n[The Start of Assistant A's Answer]\n"
            "{answer_a}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's "
            "Answer]\n{answer_b}\n[The End of Assistant B's Answer]",
            reference=True,
        ),
        JudgePrompt(
            "pair-multi-v1", "pairwise", _PAIR + _MULTI_PAIR + _VERDICT,
            "<|The Start of Assistant A's Conversation with the User|>\n{conversation_a}\n"
            "<|The End of Assistant A's Conversation with the User|>\n\n<|The Start of "
            "Assistant B's Conversation with the User|>\n{conversation_b}\n<|The End of "
            "Assistant B's Conversation with the User|>",
            multi_turn=True,
        ),
        JudgePrompt(
            "pair-ref-multi-v1", "pairwise", _REF_PAIR + _MULTI_PAIR + _VERDICT,
            "<|The Start of the Reference Answer|>\n{reference}\n<|The End of the Reference "
            "Answer|>\n\n<|The Start of Assistant A's Conversation with the User|>\n"
            "{conversation_a}\n<|The End of Assistant A's Conversation with the User|>\n\n"
            "<|The Start of Assistant B's Conversation with the User|>\n{conversation_b}\n"
            "<|The End of Assistant B's Conversation with the User|>",
            reference=True, multi_turn=True,
        ),
    )
}  # fmt: skip


def pick_prompt(mode: str, *, reference: bool, multi_turn: bool) -> JudgePrompt:
    """The one prompt for a mode ("single" or "pairwise") and its two variant flags."""
    for p in PROMPTS.values():
        if (p.mode, p.reference, p.multi_turn) == (mode, reference, multi_turn):
            return p
    raise ValueError(f"no judge prompt for mode {mode!r}")


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """What the judge sees for one item: the user's turns and, per answer, the assistant's
    turns (one answer for single grading, two for pairwise). One turn each is a plain
    question; several make a multi-turn conversation whose last answer is judged."""

    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]  # answers[k][t]: answer k's reply to questions[t]
    reference: str | None = None

    def __post_init__(self) -> None:
        if not self.questions or not 1 <= len(self.answers) <= 2:
            raise ValueError("a case needs at least one question and one or two answers")
        if any(len(a) != len(self.questions) for a in self.answers):
            raise ValueError("every answer needs one reply per question")

    @classmethod
    def single(cls, question: str, answer: str, reference: str | None = None) -> Case:
        return cls((question,), ((answer,),), reference or None)

    @classmethod
    def pair(cls, question: str, a: str, b: str, reference: str | None = None) -> Case:
        return cls((question,), ((a,), (b,)), reference or None)

    def swapped(self) -> Case:
        return Case(self.questions, self.answers[::-1], self.reference)


def _conversation(questions: Sequence[str], replies: Sequence[str], who: str) -> str:
    return "\n\n".join(
        f"### User:\n{q}\n\n### {who}:\n{r}" for q, r in zip(questions, replies, strict=True)
    )


def judge_messages(case: Case) -> tuple[JudgePrompt, list[dict]]:
    """The judge prompt for a case and the chat messages to send (system + one user turn)."""
    mode = "single" if len(case.answers) == 1 else "pairwise"
    multi = len(case.questions) > 1
    prompt = pick_prompt(mode, reference=case.reference is not None, multi_turn=multi)
    fields: dict[str, str] = {"question": case.questions[-1], "reference": case.reference or ""}
    if mode == "single":
        fields["answer"] = case.answers[0][-1]
        fields["conversation"] = _conversation(case.questions, case.answers[0], "Assistant")
    else:
        for k, side in enumerate("ab"):
            fields[f"answer_{side}"] = case.answers[k][-1]
            fields[f"conversation_{side}"] = _conversation(
                case.questions, case.answers[k], f"Assistant {side.upper()}"
            )
    user = prompt.template.format(**fields)  # values are inserted, never re-parsed
    return prompt, [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- parsing
# The instructions' own examples, which a weak judge may echo before (or instead of) its
# verdict; removed before looking for one.
_ECHOES = (
    '"[[rating]]"',
    '"Rating: [[5]]"',
    '"[[A]]" if assistant A is better',
    '"[[B]]" if assistant B is better',
    '"[[C]]" for a tie',
)
_DOUBLE_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_SINGLE_RATING = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")  # MT-Bench's fallback: "[7]"
_WORD_RATING = re.compile(r"\brating\s*(?:is|of|:)?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\b)?", re.I)
_PAIR_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def _strip_echoes(text: str) -> str:
    for echo in _ECHOES:
        text = text.replace(echo, " ")
    return text


def parse_rating(text: str) -> float | None:
    """The 1–10 rating in a judge's output, or None when there is none or it is ambiguous.

    "[[7]]" first, then MT-Bench's fallback "[7]", then "Rating: 7"; within the first form
    that occurs, every occurrence must give the same number (a judge that writes "[[3]] …
    [[8]]" has not decided) and it must lie in 1–10.
    """
    text = _strip_echoes(text)
    for pattern in (_DOUBLE_RATING, _SINGLE_RATING, _WORD_RATING):
        found = {float(m) for m in pattern.findall(text)}
        if found:
            value = found.pop() if len(found) == 1 else None
            return value if value is not None and 1 <= value <= 10 else None
    return None


def parse_pair(text: str) -> str | None:
    """ "A", "B" or "tie" ("[[C]]") from a judge's output; None when it gives no verdict or
    several different ones."""
    found = set(_PAIR_VERDICT.findall(_strip_echoes(text)))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def combine_swapped(first: str | None, second: str | None) -> tuple[str | None, bool | None]:
    """(verdict, consistent) from the verdict in the given order and the verdict with the
    answers swapped (already mapped back: "A" means the first answer as given).

    Both agree → that verdict; they differ → "tie", inconsistent (MT-Bench §3.4: a win
    counts only when it survives the swap). An unparseable side → (None, None): recorded as
    unparseable, not as a tie.
    """
    if first is None or second is None:
        return None, None
    return (first, True) if first == second else ("tie", False)


def unswap(vote: str | None) -> str | None:
    """A verdict on the swapped case, in the original order."""
    return {"A": "B", "B": "A"}.get(vote, vote) if vote is not None else None


# ---------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class Rating:
    rating: float | None  # 1–10; None when unparseable
    prompt: str  # judge prompt name
    output: str  # the judge's raw output


@dataclass(frozen=True)
class PairVerdict:
    winner: str | None  # "A", "B", "tie"; None when either order was unparseable
    consistent: bool | None  # the two orders agreed (None when unparseable or unswapped)
    first: str | None  # verdict in the given order
    second: str | None  # verdict with the answers swapped, mapped back to the given order
    prompt: str
    outputs: tuple[str, ...]  # raw output per order (one without swap)


class LLMJudge:
    """A judge made of a backend: `rate` single answers 1–10 and `compare` pairs (with the
    position swap by default). `name` identifies the judge model, `version` the prompts."""

    version = "1"  # bump when PROMPTS or the parsing rules change

    def __init__(self, backend: Backend, name: str, args: GenerationArgs = JUDGE_ARGS) -> None:
        self.backend = backend
        self.name = name
        self.args = args

    def _run(self, cases: Sequence[Case]) -> tuple[list[str], list[str]]:
        built = [judge_messages(c) for c in cases]
        texts = [self.backend.chat_format(messages) for _, messages in built]
        return [p.name for p, _ in built], self.backend.generate(texts, self.args)

    def rate(self, cases: Sequence[Case]) -> list[Rating]:
        if any(len(c.answers) != 1 for c in cases):
            raise ValueError("rate() takes single-answer cases")
        names, outputs = self._run(cases)
        return [Rating(parse_rating(o), n, o) for n, o in zip(names, outputs, strict=True)]

    def compare(self, cases: Sequence[Case], swap: bool = True) -> list[PairVerdict]:
        if any(len(c.answers) != 2 for c in cases):
            raise ValueError("compare() takes two-answer cases")
        names, outputs = self._run(list(cases) + ([c.swapped() for c in cases] if swap else []))
        n, verdicts = len(cases), []
        for i in range(n):
            first = parse_pair(outputs[i])
            if not swap:
                verdicts.append(PairVerdict(first, None, first, None, names[i], (outputs[i],)))
                continue
            second = unswap(parse_pair(outputs[n + i]))
            winner, consistent = combine_swapped(first, second)
            pair = (outputs[i], outputs[n + i])
            verdicts.append(PairVerdict(winner, consistent, first, second, names[i], pair))
        return verdicts


# -------------------------------------------------------------------------- agreement
Votes = Mapping[Hashable, Sequence[Hashable | None]]  # item -> the votes cast on it


def _cross_pairs(judge: Votes, humans: Votes) -> list[tuple]:
    """Every (judge vote, human vote) pair on the same item; None votes left out."""
    return [
        (j, h)
        for item, js in judge.items()
        for j in js
        if j is not None
        for h in humans.get(item, ())
        if h is not None
    ]


def _within_pairs(humans: Votes) -> list[tuple]:
    """Every pair of distinct votes on the same item (r votes hold r(r - 1)/2 pairs)."""
    return [
        pair
        for votes in humans.values()
        for pair in combinations([v for v in votes if v is not None], 2)
    ]


def _rate(pairs: Sequence[tuple], ties: Sequence[Hashable]) -> dict:
    with_ties = [a == b for a, b in pairs]
    without = [a == b for a, b in pairs if a not in ties and b not in ties]
    nan = math.nan
    return {
        "with_ties": sum(with_ties) / len(with_ties) if with_ties else nan,
        "n_with_ties": len(with_ties),
        "without_ties": sum(without) / len(without) if without else nan,
        "n_without_ties": len(without),
    }


def judge_human_agreement(judge: Votes, humans: Votes, ties: Sequence[Hashable] = ("tie",)):
    """MT-Bench agreement of a judge with humans over every (judge vote, human vote) pair on
    the same item: with ties, and without any pair that holds a tie. None votes
    (unparseable) are left out. Returns with_ties, n_with_ties, without_ties,
    n_without_ties (nan rates when there is no pair)."""
    return _rate(_cross_pairs(judge, humans), ties)


def human_human_agreement(humans: Votes, ties: Sequence[Hashable] = ("tie",)) -> dict:
    """The same figures over pairs of distinct human votes on the same item (the paper's
    expert-vs-expert row)."""
    return _rate(_within_pairs(humans), ties)


def rating_to_five(rating: float) -> int:
    """A 1–10 rating on the 1–5 scale of human single-sided grades: 1–2 → 1, …, 9–10 → 5."""
    return min(5, max(1, math.ceil(rating / 2)))


def judge_grade_agreement(judge: Votes, humans: Votes) -> dict:
    """Agreement of numeric grades on one scale (1–5), judge vs humans, pooled over pairs as
    above: exact agreement, agreement within one point, mean absolute difference, n."""
    return _graded(_cross_pairs(judge, humans))


def human_grade_agreement(humans: Votes) -> dict:
    """`judge_grade_agreement`'s figures over pairs of distinct humans on the same item."""
    return _graded(_within_pairs(humans))


def _graded(pairs: Sequence[tuple]) -> dict:
    n = len(pairs)
    if not n:
        return {"exact": math.nan, "within_one": math.nan, "mean_abs_diff": math.nan, "n": 0}
    gaps = [abs(float(a) - float(b)) for a, b in pairs]
    return {
        "exact": sum(g == 0 for g in gaps) / n,
        "within_one": sum(g <= 1 for g in gaps) / n,
        "mean_abs_diff": sum(gaps) / n,
        "n": n,
    }
