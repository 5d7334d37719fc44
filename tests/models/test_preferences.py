"""The preference vocabulary, its records and the places that must agree with it."""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from models.preferences import (
    DEFAULT_MARGINS,
    DEFAULT_SOFT_TARGETS,
    LEVELS,
    PREFERENCE_LEVELS,
    STRENGTHS,
    TIES,
    Preference,
    labels_hash,
    level,
    load_preferences_jsonl,
    split_by_prompt,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------- levels
def test_levels_run_strongest_first_with_the_ties_last():
    assert LEVELS == STRENGTHS + TIES == tuple(lv.name for lv in PREFERENCE_LEVELS)
    assert STRENGTHS == ("significantly_better", "better", "slightly_better", "negligibly_better")
    assert TIES == ("tie_both_good", "tie_both_bad")
    assert [level(n).is_tie for n in LEVELS] == [False] * 4 + [True] * 2


def test_every_ladder_falls_with_the_strength_and_is_even_at_a_tie():
    strengths = [level(n) for n in STRENGTHS]
    for a, b in zip(strengths, strengths[1:], strict=False):
        assert a.soft_target > b.soft_target > 0.5
        assert a.margin > b.margin >= 0
        assert a.arena_score > b.arena_score > 0.5
    for tie in map(level, TIES):
        assert (tie.soft_target, tie.arena_score, tie.margin) == (0.5, 0.5, None)


def test_soft_targets_stay_below_one_but_the_strongest_vote_is_a_full_win():
    # A soft target of 1 has no finite optimum; the arena score of 1 matches Arena's win.
    assert max(DEFAULT_SOFT_TARGETS.values()) < 1
    assert level(STRENGTHS[0]).arena_score == 1.0


def test_the_defaults_recorded_with_trained_reward_models_are_unchanged():
    assert DEFAULT_SOFT_TARGETS == dict(zip(LEVELS, (0.95, 0.85, 0.7, 0.6, 0.5, 0.5), strict=True))
    assert DEFAULT_MARGINS == dict(zip(STRENGTHS, (1.0, 2 / 3, 1 / 3, 0.0), strict=True))


def test_an_unknown_level_is_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match="'much_better'.*significantly_better"):
        level("much_better")
    with pytest.raises(ValueError, match="unknown preference level"):
        Preference("p", "a", "b", "much_better")


def test_the_vocabulary_imports_without_torch_or_django():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now fails\n"
        "import models.preferences\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'django']\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------- consumers
def test_grading_label_choices_are_the_vocabulary_and_need_no_migration():
    from grading.models import Label

    choices = Label._meta.get_field("level").choices
    assert choices == [(lv.name, lv.label) for lv in PREFERENCE_LEVELS]
    initial = importlib.import_module("grading.migrations.0001_initial")
    [stored] = [
        f.choices
        for op in initial.Migration.operations
        if getattr(op, "name", None) == "Label"
        for name, f in op.fields
        if name == "level"
    ]
    assert list(choices) == stored


def test_the_rater_keys_offer_every_level_on_each_side_and_each_tie_once():
    from grading.services import Choice
    from grading.views import SBS_CHOICES

    keys = [key for key, _, _ in SBS_CHOICES]
    assert keys == list("1234567890")
    parsed = [Choice.parse(value) for _, value, _ in SBS_CHOICES]
    assert [c.value for c in parsed] == [value for _, value, _ in SBS_CHOICES]
    assert [c.level for c in parsed if c.side == "left"] == list(STRENGTHS)
    assert [c.level for c in parsed if c.side == "right"] == list(reversed(STRENGTHS))
    assert [c.level for c in parsed if c.side is None] == list(TIES)
    assert ("1", "left_significantly_better", "A is significantly better") in SBS_CHOICES
    assert ("5", "tie_both_good", "Tie: both good") in SBS_CHOICES


def test_leaderboard_votes_score_every_level_from_the_vocabulary():
    from suites import stats

    assert set(stats.PREFERENCE_SCORES) == set(LEVELS)
    for name in LEVELS:
        s = level(name).arena_score
        assert stats.preference_outcome(name, "a") + stats.preference_outcome(name, "b") == 1
        assert stats.preference_outcome(name, "a") == (0.5 if name in TIES else s)


# ------------------------------------------------------------------------------------ data
def test_it_reads_the_grading_export_and_plain_trl_rows(tmp_path):
    rows = [
        {
            "prompt": "p1",
            "chosen": "good",
            "rejected": "bad",
            "level": "slightly_better",
            "tie": False,
            "aspects": {"chosen": {"helpful": 4}, "rejected": {"helpful": 2}},
            "rater": "alice",
            "item_id": 7,
            "chosen_model": "m1",
        },
        {
            "prompt": "p2",
            "chosen": "x",
            "rejected": "y",
            "level": "tie_both_bad",
            "tie": True,
            "aspects": {},
        },
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go"},
        {"prompt": "p4", "chosen": "x", "rejected": "y", "tie": True},
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b, c, d = load_preferences_jsonl(path)
    assert (a.level, a.chosen_aspects, a.rejected_aspects) == (
        "slightly_better",
        {"helpful": 4},
        {"helpful": 2},
    )
    assert b.tie and b.level == "tie_both_bad"
    assert (c.prompt, c.level) == ("hi", "better")  # ungraded TRL rows count as "better"
    assert d.tie and d.level == "tie_both_good"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "level": "better", "tie": True}, "tie"),
        ({"prompt": "p", "completion": "a", "aspects": {"helpful": 3}}, "single-sided"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "level": "much_better"}, "unknown"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "list of messages"),
        (
            {
                "prompt": "p",
                "chosen": "a",
                "rejected": "b",
                "level": "better",
                "aspects": {"chosen": {"helpful": 9}},
            },
            "1..5",
        ),
    ],
)
def test_it_rejects_malformed_rows_with_their_line_number(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        load_preferences_jsonl(path)


def test_it_names_the_line_of_a_row_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: "):
        load_preferences_jsonl(path)


@pytest.mark.parametrize("seed", range(5))
def test_split_by_prompt_never_puts_a_prompt_on_both_sides(seed):
    rng = random.Random(seed)
    prefs = [Preference(f"p{rng.randrange(40)}", "a", "b", "better") for _ in range(300)]
    train, held = split_by_prompt(prefs, held_out=0.25, seed=seed)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert len(train) + len(held) == len(prefs) and held
    assert len({p.prompt for p in held}) == round(0.25 * len({p.prompt for p in prefs}))
    assert split_by_prompt(prefs, 0.25, seed) == (train, held)  # deterministic per seed


def test_split_by_prompt_keeps_a_single_prompt_for_training():
    prefs = [Preference("p", "a", "b", "better")] * 3
    assert split_by_prompt(prefs, 0.5) == (prefs, [])
    with pytest.raises(ValueError, match="fraction"):
        split_by_prompt(prefs, 1.0)


def test_labels_hash_follows_every_label_but_not_their_order():
    prefs = [Preference("p", "a", "b", "better"), Preference("q", "c", "d", "tie_both_good")]
    assert labels_hash(prefs) == labels_hash(prefs[::-1])
    changed = [Preference("p", "a", "b", "slightly_better"), prefs[1]]
    graded = [Preference("p", "a", "b", "better", {"helpful": 5}), prefs[1]]
    assert len({labels_hash(prefs), labels_hash(changed), labels_hash(graded)}) == 3
