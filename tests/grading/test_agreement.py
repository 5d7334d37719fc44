"""Known-value, parity and property checks for grading.agreement. No database needed.

Reference packages, imported only where used and skipped when absent: `krippendorff`
(Castro's PyPI package) and `statsmodels`. Values hard-coded below were produced by them, so
the known-value tests run without them.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from grading.agreement import (
    LabelRecord,
    RaterStats,
    Thresholds,
    flag_raters,
    fleiss_kappa,
    krippendorff_alpha,
    majority_agreement,
    pairwise_agreement_rate,
    rater_stats,
)

ROOT = Path(__file__).resolve().parents[2]
nan = math.nan

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section E: 4 observers x
# 12 units, values 1-5, with missing ratings. Rows are observers, as printed in the paper.
KRIPPENDORFF_2011 = np.array(
    [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
)

# Wikipedia, "Fleiss' kappa", worked example: 10 items, 14 raters each, 5 categories.
WIKIPEDIA_FLEISS = np.array(
    [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
)


def _random_reliability_data(rng: np.random.Generator) -> np.ndarray:
    """(n_raters, n_units) ratings on a 1-5 scale, about 30% missing."""
    data = rng.integers(1, 6, size=(rng.integers(2, 6), rng.integers(3, 40))).astype(float)
    data[rng.random(data.shape) < 0.3] = nan
    return data


# --- Krippendorff's alpha -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [  # krippendorff 0.9.0 alpha(...); the paper prints 0.743, 0.849 and 0.815
        ("nominal", 0.743421052631579),
        ("interval", 0.8491071428571428),
        ("ordinal", 0.8153875037548814),
    ],
)
def test_alpha_matches_krippendorffs_own_worked_example(level, expected):
    units = [[v for v in column if not math.isnan(v)] for column in KRIPPENDORFF_2011.T]
    assert krippendorff_alpha(units, level=level) == pytest.approx(expected, abs=1e-12)
    assert krippendorff_alpha(KRIPPENDORFF_2011.T, level=level) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_alpha_matches_the_krippendorff_package_on_random_data_with_missing_values(level):
    krippendorff = pytest.importorskip("krippendorff")
    rng = np.random.default_rng(7)
    for _ in range(50):
        data = _random_reliability_data(rng)
        expected = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
        assert krippendorff_alpha(data.T, level=level) == pytest.approx(expected, abs=1e-10)


def test_alpha_reads_ragged_units_and_none_as_missing_like_the_padded_array():
    array = [[1.0, 2.0, nan], [3.0, 3.0, 3.0], [2.0, nan, nan], [4.0, 5.0, 4.0]]
    ragged = [[1, None, 2], [3, 3, 3], [2], [4, 4, 5]]
    for level in ("nominal", "ordinal", "interval"):
        assert krippendorff_alpha(ragged, level=level) == pytest.approx(
            krippendorff_alpha(np.array(array), level=level), abs=1e-12
        )


def test_alpha_is_one_for_perfect_agreement_and_nan_when_undefined():
    assert krippendorff_alpha([[1, 1], [2, 2, 2], [5, 5]], level="ordinal") == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha([[3, 3], [3, 3, 3]]))  # no variation: D_e = 0
    assert math.isnan(krippendorff_alpha([[1], [2, None], []]))  # nothing pairable
    assert math.isnan(krippendorff_alpha([]))


def test_alpha_ignores_units_with_a_single_value():
    units = [[1, 2, 2], [3, 3], [4, 5, 4], [1, 1]]
    for level in ("nominal", "ordinal", "interval"):
        assert krippendorff_alpha(units + [[5], [1, None]], level=level) == pytest.approx(
            krippendorff_alpha(units, level=level), abs=1e-12
        )


def test_ordinal_alpha_depends_only_on_rank_order_and_interval_alpha_survives_affine_maps():
    rng = np.random.default_rng(3)
    data = _random_reliability_data(rng).T
    monotone = np.exp(data)  # same order, unequal gaps
    assert krippendorff_alpha(monotone, level="ordinal") == pytest.approx(
        krippendorff_alpha(data, level="ordinal"), abs=1e-12
    )
    assert krippendorff_alpha(3 * data - 7, level="interval") == pytest.approx(
        krippendorff_alpha(data, level="interval"), abs=1e-12
    )
    assert krippendorff_alpha(monotone, level="interval") != pytest.approx(
        krippendorff_alpha(data, level="interval"), abs=1e-6
    )


def test_alpha_rejects_an_unknown_level():
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2]], level="ratio")


# --- Fleiss' kappa --------------------------------------------------------------------------


def test_fleiss_matches_the_wikipedia_worked_example():
    assert fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(0.20993070442195522, abs=1e-12)


def test_fleiss_matches_statsmodels_for_equal_rater_counts():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(11)
    for _ in range(30):
        n_raters, n_categories = rng.integers(2, 8), rng.integers(2, 6)
        labels = rng.integers(0, n_categories, size=(rng.integers(2, 50), n_raters))
        counts = np.stack([(labels == c).sum(axis=1) for c in range(n_categories)], axis=1)
        expected = inter_rater.fleiss_kappa(counts)
        assert fleiss_kappa(counts) == pytest.approx(expected, abs=1e-12)


def test_fleiss_with_varying_rater_counts_follows_gwets_generalisation():
    counts = [[2, 1, 0], [4, 0, 0], [0, 2, 0], [1, 1, 2], [0, 3, 0], [1, 0, 2], [1, 1, 0]]
    # By hand: p_a is the mean of per-item pair agreement, pi_j the mean per-item proportion.
    p_a = Fraction(23, 42)
    p_e = Fraction(11, 28) ** 2 + Fraction(37, 84) ** 2 + Fraction(1, 6) ** 2
    assert fleiss_kappa(counts) == pytest.approx(float((p_a - p_e) / (1 - p_e)), abs=1e-12)
    assert fleiss_kappa(counts) == pytest.approx(0.27488, abs=1e-5)  # irrCAC 0.4.4 CAC.fleiss()
    # An item with one rating carries no pair: it drops out of both terms.
    assert fleiss_kappa(counts + [[0, 0, 1], [0, 0, 0]]) == pytest.approx(fleiss_kappa(counts))


def test_fleiss_is_one_for_perfect_agreement_and_nan_when_undefined():
    assert fleiss_kappa([[3, 0], [0, 3], [0, 2]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[3, 0], [2, 0]]))  # one category only: p_e = 1
    assert math.isnan(fleiss_kappa([[1, 0], [0, 1]]))  # no item with two ratings
    with pytest.raises(ValueError):
        fleiss_kappa([[1, -1]])


# --- pairwise and majority agreement --------------------------------------------------------


def test_pairwise_agreement_pools_pairs_over_items_and_skips_single_labels():
    units = [["A", "A", "B"], ["tie", "tie"], ["A"], [None, "B", "B"]]
    assert pairwise_agreement_rate(units) == pytest.approx(3 / 5)  # 1 of 3, 1 of 1, 1 of 1
    assert pairwise_agreement_rate([["A", "A"], ["B", "B", "B"]]) == 1.0
    assert math.isnan(pairwise_agreement_rate([["A"], [None, "B"]]))


def test_majority_agreement_uses_the_strict_majority_of_the_other_raters():
    labels = [
        ("q1", "r1", "A"), ("q1", "r2", "A"), ("q1", "r3", "A"), ("q1", "r4", "B"),
        # others split 2-2 for r1, r2 and r3, so only r4 and r5 are judged here
        ("q2", "r1", "B"), ("q2", "r2", "B"), ("q2", "r3", "B"),
        ("q2", "r4", "A"), ("q2", "r5", "A"),
        ("q3", "r1", "A"), ("q3", "r2", "B"), ("q3", "r5", "tie"),  # no majority for anyone
        ("q4", "r1", "A"), ("q4", "r6", "B"),  # fewer than 3 labels
    ]  # fmt: skip
    shares = majority_agreement(labels)
    assert {k: v for k, v in shares.items() if k != "r6"} == {
        "r1": 1.0, "r2": 1.0, "r3": 1.0, "r4": 0.0, "r5": 0.0,
    }  # fmt: skip
    assert math.isnan(shares["r6"])
    assert majority_agreement([]) == {}


def _majority_by_definition(labels):
    """Leave-one-out strict majority, one label at a time."""
    by_item: dict = {}
    for item, _, cat in labels:
        by_item.setdefault(item, []).append(cat)
    judged, agreed = Counter(), Counter()
    for item, rater, cat in labels:
        cats = by_item[item]
        if len(cats) < 3:
            continue
        others = Counter(cats)
        others[cat] -= 1
        top, count = others.most_common(1)[0]
        if count > (len(cats) - 1) / 2:
            judged[rater] += 1
            agreed[rater] += top == cat
    return {r: agreed[r] / judged[r] for r in judged}


def test_majority_agreement_matches_a_label_by_label_definition_on_random_data():
    rng = np.random.default_rng(5)
    labels = [
        (int(rng.integers(60)), int(rng.integers(12)), "AB"[rng.integers(2)] if rng.random() < 0.8
         else "tie")
        for _ in range(600)
    ]  # fmt: skip
    shares = majority_agreement(labels)
    expected = _majority_by_definition(labels)
    assert {r: s for r, s in shares.items() if not math.isnan(s)} == pytest.approx(expected)


# --- rater stats and flags ------------------------------------------------------------------


def test_rater_stats_on_hand_built_labels():
    picks = [True] * 8 + [False] * 2
    gold = [True, False, True] + [None] * 7
    seconds = [2.0, 4.0, None, 10.0, 4.0, 6.0, 3.0, 4.0, 8.0, 5.0]  # sorted: 2 3 4 4 4 5 6 8 10
    ann_labels = [LabelRecord("ann", s, p, g) for s, p, g in zip(seconds, picks, gold, strict=True)]
    bob_labels = [LabelRecord("bob", 7.0), LabelRecord("bob", None, None, True)]
    stats = rater_stats(ann_labels + bob_labels, majority={"ann": 0.75})

    assert stats["ann"] == RaterStats(
        n_labels=10,
        gold_n=3,
        gold_accuracy=pytest.approx(2 / 3),
        median_seconds=4.0,
        side_n=10,
        left_pick_rate=0.8,
        left_pick_p_value=pytest.approx(112 / 1024),  # P(X >= 8) + P(X <= 2), X ~ Bin(10, 1/2)
        majority_agreement=0.75,
    )
    bob = stats["bob"]
    assert (bob.n_labels, bob.gold_n, bob.gold_accuracy, bob.median_seconds) == (2, 1, 1.0, 7.0)
    assert bob.side_n == 0
    assert math.isnan(bob.left_pick_rate) and math.isnan(bob.left_pick_p_value)
    assert math.isnan(bob.majority_agreement)


def binom_p(k: int, n: int) -> float:
    return binomtest(k, n).pvalue


def _stats(**overrides) -> RaterStats:
    good = {
        "n_labels": 40,
        "gold_n": 11,
        "gold_accuracy": 10 / 11,
        "median_seconds": 12.0,
        "side_n": 40,
        "left_pick_rate": 0.55,
        "left_pick_p_value": 0.6,
        "majority_agreement": 0.8,
    }
    return RaterStats(**(good | overrides))


def test_flag_raters_gives_one_reason_per_threshold_crossed():
    stats = {
        "good": _stats(),
        "bad": _stats(
            gold_accuracy=6 / 11,
            majority_agreement=0.4,
            left_pick_rate=0.8,
            left_pick_p_value=binom_p(32, 40),
            median_seconds=1.5,
        ),
    }
    assert flag_raters(stats) == {
        "bad": [
            "gold accuracy 55% < 70% (11 gold items)",
            "majority agreement 40% < 50%",
            "picked the left answer in 80% of 40 side-by-side choices (p=0.00018)",
            "median 1.5 s per label < 3.0 s",
        ]
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {"gold_accuracy": 0.7},  # at the threshold, not below
        {"gold_n": 0, "gold_accuracy": nan},
        {"majority_agreement": nan},
        # 80% left but only 10 choices: not significant
        {"left_pick_rate": 0.8, "side_n": 10, "left_pick_p_value": binom_p(8, 10)},
        # significant but only 60% left: too small a bias to matter
        {"left_pick_rate": 0.6, "side_n": 10_000, "left_pick_p_value": binom_p(6000, 10_000)},
        {"median_seconds": nan},
        {"n_labels": 9, "gold_accuracy": 0.0, "majority_agreement": 0.0, "median_seconds": 0.1},
    ],
)
def test_flag_raters_leaves_alone_raters_within_thresholds_or_with_too_few_labels(overrides):
    assert flag_raters({"r": _stats(**overrides)}) == {}


def test_flag_raters_uses_the_thresholds_given():
    stats = {"r": _stats(gold_n=1, gold_accuracy=0.0, n_labels=5)}
    assert flag_raters(stats) == {}
    assert flag_raters(stats, Thresholds(min_labels_for_flags=5)) == {
        "r": ["gold accuracy 0% < 70% (1 gold item)"]
    }
    assert flag_raters({"r": _stats()}, Thresholds(min_median_seconds=20.0)) == {
        "r": ["median 12.0 s per label < 20.0 s"]
    }


def test_the_agreement_module_imports_without_django():
    code = (
        "import sys, grading.agreement\n"
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
