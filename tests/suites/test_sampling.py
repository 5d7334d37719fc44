"""Limited runs score a seeded sample stratified by category, not the first N examples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from suites.base import stratified_sample
from suites.gsm8k import GSM8K
from suites.mmlu import MMLU
from suites.runner import run_suite
from tests.suites.test_runner import ScriptedBackend


@dataclass(frozen=True)
class Ex:
    id: str
    category: str


def population(sizes: dict[str, int]) -> list[Ex]:
    return [Ex(f"{c}-{i}", c) for c, n in sizes.items() for i in range(n)]


def by_category(items) -> Counter:
    return Counter(ex.category for ex in items)


@pytest.fixture(scope="module")
def mmlu() -> MMLU:
    return MMLU()


def test_the_same_seed_draws_the_same_sample_and_another_seed_another(mmlu):
    first = [ex.id for ex in mmlu.sample(50, seed=0)]
    assert first == [ex.id for ex in mmlu.sample(50, seed=0)]
    assert first != [ex.id for ex in mmlu.sample(50, seed=1)]
    assert len(first) == len(set(first)) == 50


def test_an_mmlu_limit_covers_subjects_in_proportion_not_the_first_subject(mmlu):
    pool = mmlu.examples()
    sizes = Counter(ex.subject for ex in pool)
    chosen = mmlu.sample(570, seed=3)
    got = Counter(ex.subject for ex in chosen)
    assert len(got) == len(sizes) == 57  # every subject, where the first 570 held six
    for subject, n in sizes.items():
        assert abs(got[subject] - 570 * n / len(pool)) < 1, subject
    order = [ex.subject for ex in chosen]
    assert order == sorted(order)  # a subject's questions stay together (shared prefix)


def test_stratum_counts_are_the_largest_remainder_shares():
    items = population({"a": 50, "b": 30, "c": 20})
    assert by_category(stratified_sample(items, 10, 0, lambda e: e.category)) == {
        "a": 5,
        "b": 3,
        "c": 2,
    }
    for seed in range(20):  # quotas 3.5, 2.1, 1.4: a gets 3 or 4, never further off
        got = by_category(stratified_sample(items, 7, seed, lambda e: e.category))
        assert sum(got.values()) == 7 and got["a"] in (3, 4) and got["b"] == 2
        assert got["c"] in (1, 2)


def test_a_suite_without_categories_draws_a_seeded_uniform_sample():
    suite = GSM8K()
    ids = [ex.id for ex in suite.sample(20, seed=0)]
    assert ids == [ex.id for ex in suite.sample(20, seed=0)]
    assert ids != [ex.id for ex in suite.examples(20)]  # not the first twenty
    assert ids == sorted(ids)  # in the suite's own order


def test_no_limit_or_a_limit_past_the_size_scores_everything():
    items = population({"a": 3, "b": 2})
    assert stratified_sample(items, None, 0, lambda e: e.category) == items
    assert stratified_sample(items, 9, 0, lambda e: e.category) == items


def test_the_runner_scores_the_sample_and_says_whether_it_is_complete():
    suite = GSM8K()
    run = run_suite(suite, ScriptedBackend(), limit=4, seed=7, batch_size=4)
    assert [s.id for s in run.samples] == [ex.id for ex in suite.sample(4, seed=7)]
    meta = run.meta
    assert (meta["seed"], meta["sample_size"], meta["complete"]) == (7, 4, False)
    assert meta["suite_size"] == len(suite.examples())
