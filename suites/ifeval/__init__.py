"""IFEval (Zhou et al. 2023): 541 prompts with verifiable instructions, zero-shot.

Reports the four numbers of the paper and lm-eval's `ifeval` task: prompt-level (all of a
prompt's instructions followed) and instruction-level accuracy, each strict and loose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suites.base import (
    DetailFilter,
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
from suites.ifeval.checks import CHECKS, follows, follows_loose

DATA = ("eval_framework", "tasks/ifeval/data/input_data.jsonl")  # Google's input_data.jsonl


@dataclass(frozen=True)
class IFEvalExample:
    id: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]  # one per instruction; None values already dropped


def row_to_example(row: dict[str, Any]) -> IFEvalExample:
    """A row of input_data.jsonl (or google/IFEval), rejecting unknown instruction ids early."""
    unknown = set(row["instruction_id_list"]) - CHECKS.keys()
    if unknown:
        raise ValueError(f"IFEval row {row['key']}: unknown instructions {sorted(unknown)}")
    # lm-eval drops falsy values before building a checker (the HF copy pads kwargs with None).
    kwargs = tuple({k: v for k, v in kw.items() if v} for kw in row["kwargs"])
    return IFEvalExample(str(row["key"]), row["prompt"], tuple(row["instruction_id_list"]), kwargs)


class IFEval(Suite[IFEvalExample]):
    """Zero-shot; each prompt is sent as one user turn through the backend's chat template
    unless `chat=False` (lm-eval's default sends the raw prompt)."""

    name = "ifeval"
    headline = "prompt_level_strict_acc"
    version = "1.1"  # 1.1: answers stop at a loop (stop_on_repetition); lm-eval runs to 1280
    nightly_limit = 50  # generated answers, as GSM8K
    detail_filter = DetailFilter("instructions", "Instruction", "punctuation:no_comma")

    def __init__(self, data_path: Path | str | None = None, chat: bool = True) -> None:
        self.data_path = Path(data_path) if data_path else package_file(*DATA)
        self.spec = SuiteSpec(
            split="train",  # the only split Google published
            num_fewshot=0,
            fewshot_format="zero-shot, prompt as the only user turn",
            # ifeval.yaml: greedy, no stop strings, max_gen_toks 1280; an answer that falls
            # into a loop stops there (no instruction asks for 4+ repeats of a block).
            generation=GenerationArgs(
                max_new_tokens=1280, stop=(), temperature=0.0, stop_on_repetition=True
            ),
            chat=chat,
        )

    def examples(self, limit: int | None = None) -> list[IFEvalExample]:
        return take((row_to_example(r) for r in read_jsonl(self.data_path)), limit)

    def requests(self, ex: IFEvalExample) -> list[Request]:
        if self.spec.chat:
            return [GenerateRequest(messages=({"role": "user", "content": ex.prompt},))]
        return [GenerateRequest(prompt=ex.prompt)]

    def score(self, ex: IFEvalExample, outputs: Sequence[str]) -> SampleResult:
        (response,) = outputs
        strict, loose = [], []
        for instruction, kw in zip(ex.instruction_ids, ex.kwargs, strict=True):
            strict.append(follows(instruction, response, kw))
            loose.append(follows_loose(instruction, response, kw))
        metrics = {
            "prompt_level_strict_acc": float(all(strict)),
            "prompt_level_loose_acc": float(all(loose)),
        }
        details = {
            "response": response,
            "instructions": list(ex.instruction_ids),
            "strict": strict,
            "loose": loose,
        }
        return SampleResult(ex.id, metrics, {}, details)

    def aggregate(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Prompt-level means, instruction-level means over all instructions of all prompts
        (lm-eval's agg_inst_level_acc), and strict accuracy per instruction id."""
        out: dict[str, Any] = {"n": len(results)}
        for level in ("strict", "loose"):
            out[f"prompt_level_{level}_acc"] = summarize(
                [r.metrics[f"prompt_level_{level}_acc"] for r in results]
            )
            out[f"inst_level_{level}_acc"] = summarize(
                [float(x) for r in results for x in r.details[level]]
            )
        per_id: dict[str, list[float]] = {}
        for r in results:
            for instruction, ok in zip(r.details["instructions"], r.details["strict"], strict=True):
                per_id.setdefault(instruction, []).append(float(ok))
        out["per_instruction_strict"] = {i: summarize(v) for i, v in sorted(per_id.items())}
        return out
