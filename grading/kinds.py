"""Grading task kinds, one object each: what differs between side-by-side and single-sided
campaigns lives here, and the rest of grading asks ``campaign.task_kind`` instead of branching.

Each kind has its upload schema (fields, CSV columns, responses, gold answers), how a
submission becomes label fields, what the rater's page and the API get, its export rows and its
agreement figures. Conversations are not a kind: any item may carry earlier turns
(``Item.context``), shown, exported and validated the same way for both kinds.

Plain Python (no Django), so uploads and exports can use it; label fields read the assignment's
attributes only.
"""

import random
from dataclasses import dataclass

from core import payload
from grading import agreement
from grading.uploads import MAX_NAME, MAX_TEXT, shown
from models.preferences import STRENGTHS, TIES

SIDE_BY_SIDE, SINGLE_SIDED = "side_by_side", "single_sided"
SIDES = ("left", "right")
MAX_COMMENT = 5000  # characters in a single-sided label's comment


class GradingError(Exception):
    """A request that cannot be honoured; the message is safe to show to the user."""


@dataclass(frozen=True)
class Choice:
    """A side-by-side choice as the rater's page sends it: a side (or tie) and a level,
    "left_slightly_better" or "tie_both_good"."""

    side: str | None  # "left" / "right", None for a tie
    level: str  # a name from models.preferences.LEVELS

    @property
    def value(self) -> str:
        return self.level if self.side is None else f"{self.side}_{self.level}"

    @classmethod
    def parse(cls, value) -> "Choice":
        if not isinstance(value, str):
            raise GradingError(f"'choice' must be text, not {payload.json_type(value)}")
        if not value:
            raise GradingError(
                "no choice given: choose which response is better, or a tie, then submit"
            )
        if value in TIES:
            return cls(None, value)
        side, _, level = value.partition("_")
        if side not in SIDES or level not in STRENGTHS:
            raise GradingError(f"unknown choice {value[:40]!r}")
        return cls(side, level)


class Kind:
    name: str  # Campaign.kind
    label: str
    responses: int  # per item
    fields: frozenset[str]  # upload fields of this kind, beside uploads.COMMON
    required_columns: tuple[str, ...]  # CSV columns besides a prompt or messages
    foreign_fields: dict[str, str] = {}  # the other kinds' fields → their kind's label: below

    @property
    def parts(self) -> dict[str, str]:
        """This kind's template parts: the task form and its keys (rater), the agreement
        figures, the label filter and a label's judgement (researcher)."""
        names = ("form", "keys", "stats", "filters", "judgement")
        return {part: f"grading/kinds/{self.name}/{part}.html" for part in names}

    def left_position(self, rng: random.Random) -> int:
        """Which uploaded response the rater sees first."""
        return 0

    def rater_texts(self, texts: dict[int, str], left: int) -> dict[str, str]:
        """The response texts a rater sees, by on-screen slot; never names or positions."""
        raise NotImplementedError

    def api_task(self, texts: dict[int, str], left: int, aspects: list[str]) -> dict:
        return self.rater_texts(texts, left)

    def submission(self, post) -> dict:
        """A task form's fields as the data ``label_fields`` takes."""
        raise NotImplementedError

    def exported(self, row: dict, *, include_ties: bool) -> bool:
        return True


class SideBySide(Kind):
    name, label, responses = SIDE_BY_SIDE, "Side by side", 2
    fields = frozenset({"response_a", "response_b", "responses", "model_a", "model_b", "models"})
    required_columns = ("response_a", "response_b")

    def parse_responses(self, record: dict) -> tuple[list[str], list[str]]:
        return (
            _pair(record, "responses", "response_a", "response_b", MAX_TEXT, True),
            _pair(record, "models", "model_a", "model_b", MAX_NAME, False),
        )

    def parse_gold(self, value, aspects: list[str]) -> dict:
        choices = {"a": 0, "b": 1, "tie": None}
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"'gold' must be 'a', 'b' or 'tie', not {shown(value)}")
        return {"preferred": choices[value.lower()]}

    def left_position(self, rng: random.Random) -> int:
        return rng.randrange(2)

    def rater_texts(self, texts: dict[int, str], left: int) -> dict[str, str]:
        return {"left": texts.get(left, ""), "right": texts.get(1 - left, "")}

    def submission(self, post) -> dict:
        return {"choice": post.get("choice", "")}

    def label_fields(self, a, data: dict) -> dict:
        """``data``: {"choice": "left_better" | "tie_both_good" | …} (Choice)."""
        choice = Choice.parse(data.get("choice", ""))
        if choice.side is None:
            position, picked_left = None, None
        else:
            position = a.left_position if choice.side == "left" else 1 - a.left_position
            picked_left = choice.side == "left"
        correct = None
        if a.item.is_gold and a.item.gold_answer is not None:
            correct = position == a.item.gold_answer.get("preferred")
        return {
            "preferred_position": position,
            "level": choice.level,
            "picked_left": picked_left,
            "gold_correct": correct,
        }

    def export_row(self, common: dict, label: dict, responses: list[dict]) -> dict:
        """Chosen and rejected; a tie has the responses in uploaded order and ``tie`` true."""
        tie = label["preferred_id"] is None
        chosen = (
            responses[0] if tie else next(r for r in responses if r["id"] == label["preferred_id"])
        )
        rejected = next(r for r in responses if r["id"] != chosen["id"])
        return {
            **common,
            "chosen": chosen["text"],
            "rejected": rejected["text"],
            "chosen_model": chosen["model_name"],
            "rejected_model": rejected["model_name"],
            "level": label["level"],
            "tie": tie,
            "aspects": label["scores"] or {},
        }

    def exported(self, row: dict, *, include_ties: bool) -> bool:
        # Preference trainers take every row as chosen over rejected: a tie fed as a pair
        # would teach a preference nobody expressed.
        return include_ties or not row["tie"]

    def chat_row(self, row: dict, messages: list[dict]) -> dict:
        """TRL's conversational preference format: the prompt as a message list, chosen and
        rejected as single assistant messages."""
        rest = {k: v for k, v in row.items() if k not in ("prompt", "context", "aspects")}
        return {
            **rest,
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }

    def agreement_figures(self, campaign, labels: list[dict]) -> tuple[dict, dict]:
        """Pairwise agreement and Fleiss' κ over A/B/tie (by uploaded position, not by screen
        side), and each rater's agreement with the others' majority."""
        by_item: dict[int, list[str]] = {}
        triples = []
        for row in labels:
            category = {0: "A", 1: "B"}.get(row["preferred__position"], "tie")
            by_item.setdefault(row["item_id"], []).append(category)
            triples.append((row["item_id"], row["rater_id"], category))
        units = list(by_item.values())
        counts = [[unit.count(c) for c in ("A", "B", "tie")] for unit in units if len(unit) >= 2]
        return {
            "pairwise_agreement": agreement.pairwise_agreement_rate(units),
            "fleiss_kappa": agreement.fleiss_kappa(counts) if counts else float("nan"),
            "aspect_alpha": {},
        }, agreement.majority_agreement(triples)


class SingleSided(Kind):
    name, label, responses = SINGLE_SIDED, "Single-sided", 1
    fields = frozenset({"response", "model"})
    required_columns = ("response",)

    def parse_responses(self, record: dict) -> tuple[list[str], list[str]]:
        return (
            [payload.text(record.get("response"), "response", max_length=MAX_TEXT, required=True)],
            [payload.text(record.get("model"), "model", max_length=MAX_NAME)],
        )

    def parse_gold(self, value, aspects: list[str]) -> dict:
        if not isinstance(value, dict) or not value:
            raise ValueError(
                f"'gold' must map aspects to a score or [min, max], not {shown(value)}"
            )
        scores = {}
        for aspect, bounds in value.items():
            if aspect not in aspects:
                raise ValueError(f"gold names unknown aspect {str(aspect)[:40]!r}")
            lo, hi = bounds if isinstance(bounds, list) and len(bounds) == 2 else (bounds, bounds)
            if not (_whole_score(lo) and _whole_score(hi) and lo <= hi):
                raise ValueError(
                    f"gold for {aspect!r} must be a whole score 1–5 or [min, max], "
                    f"not {shown(bounds)}"
                )
            scores[aspect] = [lo, hi]
        return {"scores": scores}

    def rater_texts(self, texts: dict[int, str], left: int) -> dict[str, str]:
        return {"response": texts.get(0, "")}

    def api_task(self, texts: dict[int, str], left: int, aspects: list[str]) -> dict:
        return {**self.rater_texts(texts, left), "aspects": aspects}

    def submission(self, post) -> dict:
        scores = {k.removeprefix("score_"): v for k, v in post.items() if k.startswith("score_")}
        return {
            "scores": scores,
            "unsafe": post.get("unsafe") == "on",
            "comment": post.get("comment", ""),
        }

    def label_fields(self, a, data: dict) -> dict:
        """``data``: {"scores": {aspect: 1..5}, "unsafe": bool, "comment": str}."""
        raw = data.get("scores")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise GradingError("'scores' must map each aspect to a score")
        scores = {key: _score(raw.get(key), key) for key in a.campaign.aspect_keys}
        unknown = set(raw) - set(scores)
        if unknown:
            names = ", ".join(sorted(str(k)[:40] for k in unknown))
            raise GradingError(f"unknown aspect(s): {names}")
        unsafe = data.get("unsafe", False)
        if not isinstance(unsafe, bool):
            raise GradingError(f"'unsafe' must be true or false, not {payload.json_type(unsafe)}")
        comment = rater_text(data.get("comment"), "comment", MAX_COMMENT)
        correct = None
        if a.item.is_gold and a.item.gold_answer is not None:
            gold = a.item.gold_answer["scores"]
            correct = all(lo <= scores[k] <= hi for k, (lo, hi) in gold.items())
        return {
            "preferred_position": None,
            "scores": scores,
            "unsafe": unsafe,
            "comment": comment,
            "gold_correct": correct,
        }

    def export_row(self, common: dict, label: dict, responses: list[dict]) -> dict:
        r = responses[0]
        return {
            **common,
            "completion": r["text"],
            "model": r["model_name"],
            "aspects": label["scores"],
            "unsafe": label["unsafe"],
            "comment": label["comment"],
        }

    def chat_row(self, row: dict, messages: list[dict]) -> dict:
        """TRL's conversational prompt-completion format, with the aspect scores beside it."""
        rest = {k: v for k, v in row.items() if k not in ("prompt", "context")}
        return {
            **rest,
            "prompt": messages,
            "completion": [{"role": "assistant", "content": row["completion"]}],
        }

    def agreement_figures(self, campaign, labels: list[dict]) -> tuple[dict, dict]:
        """Krippendorff's ordinal α per aspect; no majority for scores."""
        alphas = {}
        for aspect in campaign.aspects:
            per_item: dict[int, list[int]] = {}
            for row in labels:
                if aspect["key"] in row["scores"]:
                    per_item.setdefault(row["item_id"], []).append(row["scores"][aspect["key"]])
            alphas[aspect["name"]] = agreement.krippendorff_alpha(
                list(per_item.values()), level="ordinal"
            )
        return {"pairwise_agreement": None, "fleiss_kappa": None, "aspect_alpha": alphas}, {}


KINDS: dict[str, Kind] = {kind.name: kind for kind in (SideBySide(), SingleSided())}
KIND_CHOICES = [(kind.name, kind.label) for kind in KINDS.values()]
for _kind in KINDS.values():
    _kind.foreign_fields = {
        name: other.label.lower()
        for other in KINDS.values()
        for name in other.fields - _kind.fields
    }


def _pair(record: dict, plural: str, a: str, b: str, limit: int, required: bool) -> list[str]:
    if plural in record:
        values = record[plural]
        if not (isinstance(values, list) and len(values) == 2):
            raise ValueError(f"{plural!r} must be a list of exactly two")
        return [
            payload.text(values[0], f"{plural}[0]", max_length=limit, required=required),
            payload.text(values[1], f"{plural}[1]", max_length=limit, required=required),
        ]
    return [
        payload.text(record.get(a), a, max_length=limit, required=required),
        payload.text(record.get(b), b, max_length=limit, required=required),
    ]


def _whole_score(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5


def _score(value, key: str) -> int:
    """A whole score 1–5: a number, or the digit a form sends; never a boolean."""
    name = key.replace("_", " ")
    if value is None or value == "":
        raise GradingError(f"give {name} a score from 1 to 5")
    if isinstance(value, str) and value.strip() in ("1", "2", "3", "4", "5"):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GradingError(f"{name} must be a whole score from 1 to 5, not {str(value)[:20]!r}")
    if not 1 <= value <= 5:
        raise GradingError(f"{name} must be from 1 to 5, not {value}")
    return value


def rater_text(value, name: str, max_length: int, *, required: bool = False) -> str:
    """Free text from a rater (form or JSON): core.payload.text's checks, as a GradingError."""
    try:
        return payload.text(value, name, max_length=max_length, required=required)
    except payload.PayloadError as exc:
        raise GradingError(str(exc)) from None
