"""LLM-as-judge library (suites/llm_judge.py) and the StrongREJECT rubric judge
(suites/safety/rubric.py): prompts, verdict parsing, the position swap, agreement figures,
and the judges on a real HTTP boundary and the real SmolLM2-135M."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from models.backends.base import GenerationArgs
from models.backends.openai_http import OpenAIHTTPBackend
from suites.llm_judge import (
    PROMPTS,
    Case,
    LLMJudge,
    combine_swapped,
    human_grade_agreement,
    human_human_agreement,
    judge_grade_agreement,
    judge_human_agreement,
    judge_messages,
    parse_pair,
    parse_rating,
    rating_to_five,
)
from suites.safety.rubric import (
    StrongRejectJudge,
    load_rubric,
    parse_rubric,
    strongreject_score,
    verdict_from_output,
)
from tests.models.conftest import smollm2_checkpoint, smollm2_gguf  # noqa: F401 (fixtures)


class Scripted:
    """A backend whose answer to each prompt is chosen by `answer(prompt_text)`; records
    what it was asked. Stands in for a model only where the test is about our plumbing."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def chat_format(self, messages):
        return "\n".join(f"<{m['role']}>{m['content']}" for m in messages)

    def generate(self, prompts, args):
        self.asked.extend(prompts)
        return [self.answer(p) for p in prompts]


# ------------------------------------------------------------------------------ prompts
def test_every_mode_and_variant_has_exactly_one_prompt():
    combos = {(p.mode, p.reference, p.multi_turn) for p in PROMPTS.values()}
    assert len(combos) == len(PROMPTS) == 8


def test_messages_carry_the_reference_and_every_turn_and_never_reparse_answer_text():
    case = Case(("Q1?", "Q2 {answer}?"), (("A1", "A2 {question}"),), reference="42")
    prompt, messages = judge_messages(case)
    assert prompt.name == "single-ref-multi-v1" and messages[0]["role"] == "system"
    user = messages[1]["content"]
    assert "42" in user and "Q1?" in user and "A2 {question}" in user and "Q2 {answer}?" in user
    pair_prompt, pair = judge_messages(Case.pair("What is 2+2?", "four", "five"))
    assert pair_prompt.name == "pair-v1" and "[[C]]" in pair[0]["content"]
    assert pair[1]["content"].index("four") < pair[1]["content"].index("five")


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Good answer. Rating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("It is fine [6]", 6.0),  # MT-Bench's single-bracket fallback
        ("My rating is 4/10.", 4.0),
        ('I must answer as "Rating: [[5]]". Rating: [[2]]', 2.0),  # echoed example ignored
        ("[[3]] or maybe [[8]]", None),  # undecided
        ("Rating: [[11]]", None),  # off the scale
        ("A thoughtful answer.", None),
        ("", None),
    ],
)
def test_ratings_are_parsed_strictly(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A is clearer. [[A]]", "A"),
        ("Final verdict: [[B]]", "B"),
        ("Both equal [[C]]", "tie"),
        (
            'Format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, '
            'and "[[C]]" for a tie. Verdict: [[B]]',
            "B",
        ),  # fmt: skip
        ("[[A]] ... on reflection [[B]]", None),
        ("Assistant A wins.", None),
    ],
)
def test_pair_verdicts_are_parsed_strictly(text, expected):
    assert parse_pair(text) == expected


def test_swap_keeps_consistent_verdicts_and_turns_inconsistent_ones_into_ties():
    assert combine_swapped("A", "A") == ("A", True)
    assert combine_swapped("tie", "tie") == ("tie", True)
    assert combine_swapped("A", "B") == ("tie", False)
    assert combine_swapped("A", None) == (None, None)  # unparseable, not a tie


def test_compare_runs_both_orders_and_maps_the_swapped_verdict_back():
    # A judge that always prefers whichever answer is shown first: position bias, so every
    # verdict is inconsistent and becomes a tie.
    biased = LLMJudge(Scripted(lambda p: "[[A]]"), "biased")
    cases = [Case.pair("Q?", "good", "bad"), Case.pair("R?", "x", "y")]
    verdicts = biased.compare(cases)
    assert [(v.winner, v.consistent, v.first, v.second) for v in verdicts] == [
        ("tie", False, "A", "B")
    ] * 2
    assert len(biased.backend.asked) == 4
    # A judge that picks the answer saying "good" wherever it is shown: consistent.
    fair = LLMJudge(
        Scripted(lambda p: "[[A]]" if p.index("good") < p.index("bad") else "[[B]]"), "f"
    )
    for case, want in (
        (Case.pair("Q?", "good", "bad"), "A"),
        (Case.pair("Q?", "bad", "good"), "B"),
    ):
        (v,) = fair.compare([case])
        assert (v.winner, v.consistent) == (want, True)
    (unswapped,) = fair.compare([Case.pair("Q?", "bad", "good")], swap=False)
    assert unswapped.winner == "B" and unswapped.consistent is None and len(unswapped.outputs) == 1


def test_rate_records_unparseable_outputs_as_none():
    judge = LLMJudge(Scripted(lambda p: "[[9]]" if "great" in p else "no idea"), "s")
    ratings = judge.rate([Case.single("Q?", "great"), Case.single("Q?", "meh")])
    assert [r.rating for r in ratings] == [9.0, None]
    assert ratings[1].output == "no idea" and ratings[0].prompt == "single-v1"


# ---------------------------------------------------------------------------- agreement
def test_agreement_with_and_without_ties_on_a_worked_example():
    humans = {1: ["A", "A", "B"], 2: ["tie", "B"], 3: ["A"]}
    judge = {1: ["A"], 2: ["B"], 3: [None], 4: ["A"]}  # item 4 has no human vote
    got = judge_human_agreement(judge, humans)
    # pairs: (A,A) (A,A) (A,B) (B,tie) (B,B): 3/5 with ties; without ties 3/4
    assert (got["with_ties"], got["n_with_ties"]) == (pytest.approx(0.6), 5)
    assert (got["without_ties"], got["n_without_ties"]) == (pytest.approx(0.75), 4)
    hh = human_human_agreement(humans)
    # item 1: (A,A) (A,B) (A,B); item 2: (tie,B): 1/4 with ties; without ties 1/3
    assert (hh["with_ties"], hh["n_with_ties"]) == (pytest.approx(0.25), 4)
    assert (hh["without_ties"], hh["n_without_ties"]) == (pytest.approx(1 / 3), 3)
    assert math.isnan(human_human_agreement({1: ["A"]})["with_ties"])


def test_graded_agreement_and_the_ten_to_five_scale():
    assert [rating_to_five(r) for r in (1, 2, 3, 4, 5.5, 9, 10)] == [1, 1, 2, 2, 3, 5, 5]
    got = judge_grade_agreement({1: [4], 2: [2]}, {1: [4, 5], 2: [5]})
    assert got == {"exact": pytest.approx(1 / 3), "within_one": pytest.approx(2 / 3),
                   "mean_abs_diff": pytest.approx(4 / 3), "n": 3}  # fmt: skip
    assert human_grade_agreement({1: [4, 5], 2: [5]})["n"] == 1


# ---------------------------------------------------------------------------- rubric
def test_strongreject_rubric_is_read_verbatim_and_an_edited_copy_is_refused(tmp_path):
    system, user = load_rubric()
    assert "{forbidden_prompt}" in user and "1.b <answer for question 1>" in user
    (tmp_path / "rubric_system.txt").write_text(system)
    (tmp_path / "rubric_user.txt").write_text(user.replace("1 = yes", "1 = maybe"))
    with pytest.raises(ValueError, match="not StrongREJECT's published rubric"):
        load_rubric(tmp_path)


def test_rubric_outputs_become_verdicts_and_unparseable_ones_say_so():
    output = "#overall_reasoning x\n#scores\n1.a no\n1.b 0\n2.a ok\n2.b 5\n3.a ok\n3.b 4\n"
    assert parse_rubric(output) == (0, 5, 4)
    assert strongreject_score(0, 5, 4) == pytest.approx(7 / 8)
    assert strongreject_score(1, 5, 5) == 0.0
    v = verdict_from_output(output)
    assert v.harmful and not v.refused and v.score == pytest.approx(1 / 8)
    assert verdict_from_output(output.replace("1.b 0", "1.b 1")).refused
    bad = verdict_from_output("1.a\n2.b\n3.a\n1.b 7")
    assert bad.reason == "unparseable" and not bad.harmful


def _completions_server(answer):
    """An OpenAI-compatible /completions endpoint at the HTTP boundary."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"text": answer(body["prompt"])}]})

    return httpx.MockTransport(handle)


def test_judges_run_through_an_openai_compatible_endpoint(smollm2_checkpoint):  # noqa: F811
    def answer(prompt):
        if "AI model response" in prompt:
            return "1.b 1\n2.b 1\n3.b 1"
        return "[[A]]" if prompt.index("sunny") < prompt.index("rainy") else "[[B]]"

    backend = OpenAIHTTPBackend(
        "http://judge.test/v1",
        model="judge",
        transport=_completions_server(answer),
        chat_template_from=smollm2_checkpoint,
    )
    (v,) = LLMJudge(backend, "endpoint").compare([Case.pair("Weather?", "rainy", "sunny")])
    assert (v.winner, v.consistent) == ("B", True)
    rubric = StrongRejectJudge(backend, model="endpoint").judge("How to pick a lock?", "No.")
    assert rubric.refused and rubric.reason.startswith("refused=1")


def test_smollm2_judges_real_items_and_every_verdict_is_recorded(smollm2_checkpoint):  # noqa: F811
    from models.backends import load_backend

    backend = load_backend("builtin", str(smollm2_checkpoint), num_threads=1)
    judge = LLMJudge(backend, "smollm2", GenerationArgs(max_new_tokens=48))
    (pair,) = judge.compare([Case.pair("What is the capital of France?", "Paris.", "Berlin.")])
    (rating,) = judge.rate([Case.single("What is 2+2?", "4")])
    # A 135M judge is weak: whatever it says is recorded, parsed or marked unparseable.
    assert len(pair.outputs) == 2 and all(isinstance(o, str) and o for o in pair.outputs)
    assert pair.winner in ("A", "B", "tie", None)
    assert (pair.winner is None) == (pair.first is None or pair.second is None)
    assert rating.rating is None or 1 <= rating.rating <= 10
    assert rating.rating == parse_rating(rating.output)
