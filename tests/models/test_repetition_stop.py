"""Stopping answers that fall into a loop (``GenerationArgs.stop_on_repetition``), and token
progress of long generations, on the real SmolLM2 through the runner."""

from dataclasses import dataclass

import pytest

from models.backends import GenerationArgs, load_backend
from models.backends.base import degenerate
from suites.base import GenerateRequest, SampleResult, Suite, SuiteSpec
from suites.runner import run_suite

LOOPING = "1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"  # SmolLM2 continues it " 1 1 1 ..."


@pytest.mark.parametrize(
    "text, looped",
    [
        ("I'm sorry. " * 30, True),
        ("x" * 300, True),
        ("Step 1: add.\nStep 2: carry.\n" * 12, True),
        ("intro " + "The same line of text, over and over again.\n" * 10, True),
        ("Repeat: what is AI? Answer: what is AI? AI is the study of machines.", False),
        ("word " * 20, False),  # 100 characters: too short to call a loop
        (" ".join(f"item {i}," for i in range(80)), False),  # similar lines, not repeats
        ("The quick brown fox jumps over the lazy dog. " * 3, False),
    ],
)
def test_degenerate_finds_loops_and_leaves_prose(text, looped):
    assert degenerate(text) is looped


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_backend("builtin", str(smollm2_checkpoint), draft=None)


def test_a_looping_answer_stops_early_and_others_are_unchanged(smol):
    on = GenerationArgs(max_new_tokens=300, stop_on_repetition=True)
    off = GenerationArgs(max_new_tokens=300)
    prompts = [LOOPING, smol.chat_format([{"role": "user", "content": "Say hi in one word."}])]
    stopped, full = smol.generate(prompts, on), smol.generate(prompts, off)
    assert degenerate(full[0]) and degenerate(stopped[0])
    assert len(smol.tokenizer.encode(stopped[0])) < 300 <= len(smol.tokenizer.encode(full[0])) + 1
    assert full[0].startswith(stopped[0])  # the same tokens, cut where the loop was seen
    assert stopped[1] == full[1]  # an answer without a loop is untouched


@dataclass(frozen=True)
class Ex:
    id: str


class Loops(Suite):
    """Two prompts, one that loops; scores nothing."""

    name, version, headline = "loops", "1", "n"

    def __init__(self, stop: bool):
        self.spec = SuiteSpec(
            split="test",
            num_fewshot=0,
            fewshot_format="none",
            generation=GenerationArgs(max_new_tokens=300, stop_on_repetition=stop),
        )

    def examples(self, limit=None):
        return [Ex("loop"), Ex("plain")][:limit]

    def requests(self, ex):
        prompt = LOOPING if ex.id == "loop" else "The capital of France is"
        return [GenerateRequest(prompt=prompt)]

    def score(self, ex, outputs):
        return SampleResult(ex.id, {"n": 1.0}, {}, {"text": outputs[0]})

    def aggregate(self, results):
        return {"n": {"mean": float(len(results)), "n": len(results)}}


def test_the_runner_reports_tokens_and_marks_looped_answers(smol):
    heard: list[int] = []
    run = run_suite(Loops(stop=True), smol, batch_size=2, tokens=heard.append)
    assert heard and heard == sorted(heard) and heard[-1] % 64 == 0
    by_id = {s.id: s for s in run.samples}
    assert by_id["loop"].details["stopped"] == "repetition"
    assert "stopped" not in by_id["plain"].details
    assert run.meta["stopped_repeating"] == 1
    assert run.meta["spec"]["generation"]["stop_on_repetition"] is True
    unmarked = run_suite(Loops(stop=False), smol, batch_size=2)
    assert unmarked.meta["stopped_repeating"] == 0
