"""The preference vocabulary: one definition of the side-by-side levels and of a graded pair,
imported by grading (label choices, the rater's keys), the leaderboard's Bradley-Terry votes,
reward models and post-training. Plain Python: no torch, no Django, so web processes can
import it cheaply.

Features, with references:

- six levels, strongest first: four strengths of "the chosen response is better" and two ties,
  as AFM's human grading collects them (Apple, "Apple Intelligence Foundation Language
  Models", arXiv:2407.21075, §5.3) and Llama 2's annotators do (arXiv:2307.09288, §3.2.1);
- per level, the quantities each consumer needs (see ``Level``): the soft-label target of the
  reward model (AFM §5.3), Llama 2's margin (Table 28, "margin small") and the vote score of
  the leaderboard's Bradley-Terry fit;
- ``Preference``, one graded pair, with the conversation before its prompt (``context``);
  ``load_preferences_jsonl`` for the TRL / OpenRLHF JSONL that the grading export writes, flat
  or in TRL's conversational format; ``split_by_prompt``; ``labels_hash``, the lineage hash of
  a label set.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from models.chat import Message, checked_messages, conversation, response_text, split_conversation


@dataclass(frozen=True)
class Level:
    """One preference level. ``soft_target`` and ``arena_score`` are both "how much of a win
    the chosen side gets", but for different fits, hence two numbers:

    - ``soft_target`` is the target of σ(r_chosen − r_rejected) for one pair in a reward model.
      It stays below 1 because a model that can tell every training pair apart would push the
      reward gap of a target-1 pair to infinity; calibration (ECE) is measured against it.
    - ``arena_score`` is one vote's score in the model-level Bradley-Terry fit behind the
      leaderboard (``suites.stats.preference_outcome``). The strongest level is a full win so
      that votes on that level alone give Chatbot Arena's win/tie/loss ratings (Chiang et al.
      2024, arXiv:2403.04132) on its Elo scale; the fit's ridge keeps ratings finite.
    """

    name: str  # stored value: grading.models.Label.level, the export's "level"
    label: str  # human wording, also the Django choice label (changing it needs a migration)
    is_tie: bool
    # P(chosen beats rejected) for the soft-label BT loss. AFM describes the loss but not its
    # targets: these are EvalHub defaults, recorded with every trained reward model.
    soft_target: float
    # Llama 2 "margin small" (arXiv:2307.09288, Table 28); None for ties: no margin loss at all.
    margin: float | None
    # Score for the preferred side of one vote: a linear ladder from a tie (0.5) to a clear
    # win (1.0). EvalHub's choice, not a published standard (Arena-Hard instead counts a
    # strong preference as 3 votes, which suites.stats.Votes' weights express).
    arena_score: float


PREFERENCE_LEVELS: tuple[Level, ...] = (  # strongest first
    Level("significantly_better", "significantly better", False, 0.95, 1.0, 1.0),
    Level("better", "better", False, 0.85, 2 / 3, 0.875),
    Level("slightly_better", "slightly better", False, 0.7, 1 / 3, 0.75),
    Level("negligibly_better", "negligibly better", False, 0.6, 0.0, 0.625),
    Level("tie_both_good", "tie both good", True, 0.5, None, 0.5),
    Level("tie_both_bad", "tie both bad", True, 0.5, None, 0.5),
)
_BY_NAME = {lv.name: lv for lv in PREFERENCE_LEVELS}

LEVELS: tuple[str, ...] = tuple(_BY_NAME)  # names, strongest first
STRENGTHS: tuple[str, ...] = tuple(lv.name for lv in PREFERENCE_LEVELS if not lv.is_tie)
TIES: tuple[str, ...] = tuple(lv.name for lv in PREFERENCE_LEVELS if lv.is_tie)
DEFAULT_SOFT_TARGETS: dict[str, float] = {lv.name: lv.soft_target for lv in PREFERENCE_LEVELS}
DEFAULT_MARGINS: dict[str, float] = {
    lv.name: lv.margin for lv in PREFERENCE_LEVELS if lv.margin is not None
}


def level(name: str) -> Level:
    """The level called ``name``; ValueError naming the known levels otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown preference level {name!r}; known: {LEVELS}") from None


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Preference:
    """One graded comparison. For ties, ``chosen``/``rejected`` are just first/second.
    ``prompt`` is the user turn the responses answer; ``context`` the messages before it (a
    system message, earlier turns), empty for a single-turn prompt."""

    prompt: str
    chosen: str
    rejected: str
    level: str
    chosen_aspects: dict[str, int] = field(default_factory=dict)  # aspect -> grade 1..5
    rejected_aspects: dict[str, int] = field(default_factory=dict)
    context: list[Message] = field(default_factory=list)  # {role, content} before the prompt

    def __post_init__(self) -> None:
        level(self.level)
        if self.context:
            checked_messages(self.context, "context")
        for grades in (self.chosen_aspects, self.rejected_aspects):
            for key, grade in grades.items():
                if not isinstance(grade, int) or isinstance(grade, bool) or not 1 <= grade <= 5:
                    raise ValueError(f"aspect {key!r}: grade {grade!r} is not an integer 1..5")

    @property
    def tie(self) -> bool:
        return self.level in TIES

    @property
    def messages(self) -> list[Message]:
        """The conversation the responses answer: the context, then the prompt as a user turn
        (what reward models and DPO format with ``models.chat.chat_prompt``)."""
        return conversation(self.context, self.prompt)


def _row_preference(row: dict) -> Preference:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"missing {missing} (a single-sided export is not a preference file)")
    tie = bool(row.get("tie", False))
    # Plain TRL / OpenRLHF files carry no level: an ungraded preference counts as "better".
    name = row.get("level") or ("tie_both_good" if tie else "better")
    if tie != (name in TIES):
        raise ValueError(f"tie={tie} contradicts level {name!r}")
    aspects = row.get("aspects") or {}
    if not isinstance(aspects, dict) or not set(aspects) <= {"chosen", "rejected"}:
        raise ValueError("aspects must be {} or {'chosen': {...}, 'rejected': {...}}")
    # TRL's conversational format: the prompt a message list ending with the user turn, each
    # response an assistant message list. The flat export gives the earlier turns as context.
    context, prompt = split_conversation(row["prompt"])
    if row.get("context"):
        if context:
            raise ValueError("give the conversation in 'prompt' or in 'context', not both")
        context = checked_messages(row["context"], "context")
    chosen, rejected = (response_text(row[k], k) for k in ("chosen", "rejected"))
    return Preference(
        prompt,
        chosen,
        rejected,
        name,
        aspects.get("chosen", {}),
        aspects.get("rejected", {}),
        context,
    )


def load_preferences_jsonl(path: str | os.PathLike) -> list[Preference]:
    """Read the TRL / OpenRLHF preference JSONL that ``grading.tasks.export_labels`` writes
    (prompt, chosen, rejected, level, tie, aspects, context; other keys are ignored), flat or
    in TRL's conversational format (``prompt`` a message list ending with the user turn,
    ``chosen``/``rejected`` assistant message lists). A malformed row raises ValueError
    starting with ``path:line:``."""
    prefs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prefs.append(_row_preference(json.loads(line)))
            except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: {e}") from e
    return prefs


def split_by_prompt(
    prefs: Sequence[Preference], held_out: float = 0.2, seed: int = 0
) -> tuple[list[Preference], list[Preference]]:
    """(train, held_out) with every prompt (with its context: one conversation) on one side
    only, so held-out accuracy measures generalisation to new prompts rather than memorised
    ones."""
    if not 0 < held_out < 1:
        raise ValueError("held_out must be a fraction in (0, 1)")
    prompts = sorted({_prompt_key(p) for p in prefs})
    random.Random(seed).shuffle(prompts)
    n = min(max(1, round(held_out * len(prompts))), len(prompts) - 1) if len(prompts) > 1 else 0
    test = set(prompts[:n])
    return (
        [p for p in prefs if _prompt_key(p) not in test],
        [p for p in prefs if _prompt_key(p) in test],
    )


def _prompt_key(p: Preference) -> str:
    # A single-turn prompt is its own key, so splits made before contexts existed stay put.
    return json.dumps(p.messages, ensure_ascii=False) if p.context else p.prompt


def labels_hash(prefs: Sequence[Preference]) -> str:
    """sha256 over the labels, order-independent: the same label set always hashes the same.
    An empty context is left out, so single-turn labels hash as they did before contexts."""
    rows = sorted(json.dumps(_hashed(p), sort_keys=True, ensure_ascii=False) for p in prefs)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _hashed(p: Preference) -> dict:
    row = asdict(p)
    if not row["context"]:
        del row["context"]
    return row
