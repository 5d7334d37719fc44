"""Berkeley Function Calling Leaderboard (BFCL v4), single-turn Python categories, prompting
(non-FC) mode, scored by our reimplementation of bfcl-eval's AST checker (suites/bfcl/ast_check.py).

Patil et al. (2025), "The Berkeley Function Calling Leaderboard (BFCL): From Tool Use to Agentic
Evaluation of Large Language Models", ICML. Data and reference checker: bfcl-eval 2026.3.23.
"""

from __future__ import annotations

import copy
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suites.base import (
    GenerateRequest,
    GenerationArgs,
    Request,
    SampleResult,
    Suite,
    SuiteSpec,
    package_file,
    read_jsonl,
    summarize,
    take,
)
from suites.bfcl import ast_check

VERSION_PREFIX = "BFCL_v4"
NON_LIVE_AST = ("simple_python", "multiple", "parallel", "parallel_multiple")
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
RELEVANCE = ("irrelevance", "live_irrelevance", "live_relevance")  # no possible answers
CATEGORIES = (*NON_LIVE_AST, "irrelevance", *LIVE_AST, "live_irrelevance", "live_relevance")

# bfcl-eval's default prompting system prompt (constants/default_prompts.py, the
# "ret_fmt=python&tool_call_tag=False&func_doc_fmt=json&prompt_fmt=plaintext&style=classic"
# configuration), assembled as `formulate_system_prompt` does. Spacing is BFCL's own: the
# plaintext template puts no space between persona and task, and the empty `{param_types}`
# leaves two spaces before "You SHOULD NOT".
PERSONA = "You are an expert in composing functions."
TASK = (
    "You are given a question and a set of possible functions. Based on the question, you will "
    "need to make one or more function/tool calls to achieve the purpose. If none of the "
    "functions can be used, point it out. If the given question lacks the parameters required "
    "by the function, also point it out."
)
OUTPUT_FORMAT = (
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]"
)
TOOL_CALL_FORMAT = (
    "You should only return the function calls in your response.\n\nIf you decide to invoke any "
    f"of the function(s), you MUST put it in the format of {OUTPUT_FORMAT}.  You SHOULD NOT "
    "include any other text in the response."
)
MULTITURN_BEHAVIOR = (
    "At each turn, you should try your best to complete the tasks requested by the user within "
    "the current turn. Continue to output functions to call until you have fulfilled the user's "
    "request to the best of your ability. Once you have no more functions to call, the system "
    "will consider the current turn complete and proceed to the next turn or task."
)
AVAILABLE_TOOLS = "Here is a list of functions in json format that you can invoke.\n{functions}\n"
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."  # added to descriptions


def system_prompt(functions: Sequence[dict[str, Any]]) -> str:
    """BFCL's default prompting system prompt listing `functions` as indented JSON."""
    tools = AVAILABLE_TOOLS.format(functions=json.dumps(list(functions), indent=4))
    return f"{PERSONA}{TASK}\n\n{TOOL_CALL_FORMAT}\n\n{MULTITURN_BEHAVIOR}\n\n{tools}"


def with_python_hint(functions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `functions` with BFCL's language hint appended to each description, as its
    generation step does (`add_language_specific_hint_to_function_doc`) for Python categories."""
    hinted = copy.deepcopy(list(functions))
    for f in hinted:
        f["description"] = f["description"] + PYTHON_HINT
    return hinted


@dataclass(frozen=True)
class BFCLExample:
    id: str  # BFCL's own id, e.g. "simple_python_0", "live_multiple_12-4-0"
    category: str
    messages: tuple[dict[str, str], ...]  # the single turn's messages, as in the data file
    functions: tuple[dict[str, Any], ...]  # JSON schemas as in the data file (no hint)
    answers: tuple[dict[str, Any], ...] | None  # possible answers; None for (ir)relevance


def load_category(data_dir: Path, category: str) -> list[BFCLExample]:
    """One category's examples from `{data_dir}/BFCL_v4_{category}.json` and, for AST
    categories, `{data_dir}/possible_answer/BFCL_v4_{category}.json` (both JSON lines)."""
    rows = list(read_jsonl(data_dir / f"{VERSION_PREFIX}_{category}.json"))
    answers: dict[str, Any] = {}
    if category not in RELEVANCE:
        answer_rows = read_jsonl(data_dir / "possible_answer" / f"{VERSION_PREFIX}_{category}.json")
        answers = {a["id"]: a["ground_truth"] for a in answer_rows}
    out = []
    for r in rows:
        if len(r["question"]) != 1:
            raise ValueError(
                f"{r['id']}: {len(r['question'])} turns; only single-turn is supported"
            )
        gt = answers.get(r["id"]) if answers else None
        if answers and gt is None:
            raise ValueError(f"{r['id']}: no possible answer")
        out.append(
            BFCLExample(
                r["id"],
                category,
                tuple(r["question"][0]),
                tuple(r["function"]),
                tuple(gt) if gt is not None else None,
            )
        )
    return out


class BFCL(Suite[BFCLExample]):
    """BFCL single-turn Python categories in prompting mode: the functions go into the system
    prompt, the model answers `[func(a=1), ...]`, and the AST checker scores the text."""

    name = "bfcl"
    headline = "accuracy"
    category = "category"
    version = "1.1"  # 1.1: answers stop at a loop (stop_on_repetition)

    def __init__(
        self, data_dir: Path | str | None = None, categories: Sequence[str] = CATEGORIES
    ) -> None:
        unknown = set(categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown BFCL categories {sorted(unknown)}; known: {CATEGORIES}")
        self.data_dir = Path(data_dir) if data_dir else package_file("bfcl_eval", "data")
        self.categories = tuple(categories)
        self.spec = SuiteSpec(
            split="BFCL_v4",
            num_fewshot=0,
            fewshot_format="BFCL prompting: default system prompt (python calls, json docs, "
            "plaintext, classic) + the question's messages",
            # BFCL's local runs sample at temperature 0.001; we decode greedily. 1024 new
            # tokens covers the longest parallel answers (8 calls) with room for chatter.
            generation=GenerationArgs(
                max_new_tokens=1024, temperature=0.0, stop=(), stop_on_repetition=True
            ),
            chat=True,
        )

    def examples(self, limit: int | None = None) -> list[BFCLExample]:
        """Examples of the selected categories, category by category in CATEGORIES order."""
        exs = [ex for c in self.categories for ex in load_category(self.data_dir, c)]
        return take(exs, limit)

    def messages(self, ex: BFCLExample) -> tuple[dict[str, str], ...]:
        """BFCL's `system_prompt_pre_processing_chat_model`: the system prompt goes first, or
        in front of the example's own system message, separated by a blank line."""
        prompt = system_prompt(with_python_hint(ex.functions))
        msgs = [dict(m) for m in ex.messages]
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = prompt + "\n\n" + msgs[0]["content"]
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
        return tuple(msgs)

    def requests(self, ex: BFCLExample) -> list[Request]:
        return [GenerateRequest(messages=self.messages(ex))]

    def score(self, ex: BFCLExample, outputs: Sequence[str]) -> SampleResult:
        (text,) = outputs
        answers = list(ex.answers) if ex.answers is not None else None
        result = ast_check.check_output(list(ex.functions), text, answers, ex.category)
        try:
            decoded = json.dumps(ast_check.decode_calls(text), default=repr)
        except ast_check.ParseError:
            decoded = ""
        details: dict[str, Any] = {
            "category": ex.category,
            "output": text,
            "error_type": result.error_type,
            "bfcl_error_type": result.bfcl_type,
            "error": result.error,
        }
        if result.sub_errors:
            details["sub_errors"] = result.sub_errors
        return SampleResult(ex.id, {"accuracy": float(result.valid)}, {"calls": decoded}, details)

    def aggregate(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Accuracy per category (Wilson 95%), error-type counts per category, and BFCL's two
        summaries: `non_live_ast`, the unweighted mean of the four non-live AST categories, and
        `live_ast`, the live AST categories pooled (BFCL weights live categories by size).
        A summary is reported only when all its categories are present."""
        by_cat: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, Counter[str]] = defaultdict(Counter)
        for r in results:
            cat = r.details["category"]
            by_cat[cat].append(r.metrics["accuracy"])
            if r.details["error_type"]:
                errors[cat][r.details["error_type"]] += 1
        out: dict[str, Any] = {
            "n": len(results),
            "per_category": {c: summarize(by_cat[c]) for c in CATEGORIES if c in by_cat},
            "error_types": {c: dict(errors[c].most_common()) for c in CATEGORIES if c in errors},
        }
        if all(c in by_cat for c in NON_LIVE_AST):
            means = [out["per_category"][c]["mean"] for c in NON_LIVE_AST]
            out["non_live_ast"] = {"mean": sum(means) / len(means), "categories": NON_LIVE_AST}
        if all(c in by_cat for c in LIVE_AST):
            out["live_ast"] = summarize([v for c in LIVE_AST for v in by_cat[c]])
        return out
