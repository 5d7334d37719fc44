"""Property and known-value checks for suites.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from suites import stats
from suites.stats import BTScale, Votes


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [  # Reference values: R `binom::binom.confint(method="wilson")`, also Newcombe (1998) t.I
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (20, 20, (0.8389, 1.0)),
    ],
)
def test_wilson_matches_published_values(k, n, expected):
    lo, hi = stats.wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(expected, abs=1e-4)


def test_wilson_is_0_to_1_without_data_and_rejects_impossible_counts():
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 3)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        sample = rng.exponential(2.0, size=80)  # skewed on purpose; true mean 2
        _, lo, hi = stats.bootstrap_mean_ci(sample, n_boot=400, seed=trial)
        covered += lo <= 2.0 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_bootstrap_detects_a_real_regression_and_not_noise():
    rng = np.random.default_rng(2)
    base = (rng.random(1000) < 0.7).astype(float)
    worse = np.where(rng.random(1000) < 0.08, 0.0, base)  # 8% of right answers lost
    same = base.copy()
    flips = rng.choice(1000, 20, replace=False)
    same[flips[:10]], same[flips[10:]] = 1 - same[flips[:10]], 1 - same[flips[10:]]
    regression = stats.paired_bootstrap_diff(base, worse)
    assert regression.significant and regression.ci_high < 0 and regression.p_value < 0.01
    assert not stats.paired_bootstrap_diff(base, base).significant
    assert (
        stats.paired_bootstrap_diff(base, same).ci_low
        <= 0
        <= stats.paired_bootstrap_diff(base, same).ci_high
    )


def simulate_votes(strength: np.ndarray, n: int, tie_rate: float, seed: int) -> Votes:
    """BT votes (natural-log strengths); ties drawn independently of the pair."""
    rng = np.random.default_rng(seed)
    k = len(strength)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    p = 1 / (1 + np.exp(strength[b] - strength[a]))
    y = np.where(rng.random(n) < tie_rate, 0.5, (rng.random(n) < p).astype(float))
    names = [f"m{i}" for i in range(k)]
    return Votes.from_records([names[i] for i in a], [names[i] for i in b], y)


def test_bradley_terry_recovers_known_strengths():
    strength = np.linspace(-1.5, 1.5, 8)
    votes = simulate_votes(strength, 40_000, tie_rate=0.0, seed=3)
    scale = BTScale(l2=0.0)
    ratings = stats.fit_bradley_terry(votes, scale)
    true = scale.ratings(strength)
    assert ratings - ratings.mean() == pytest.approx(true - true.mean(), abs=15)  # Elo points
    assert list(np.argsort(ratings)) == list(range(8))


def test_ratings_move_only_by_a_shift_when_the_anchor_changes():
    votes = simulate_votes(np.array([0.0, 0.5, 1.0, -0.3]), 5000, tie_rate=0.2, seed=4)
    r1 = stats.fit_bradley_terry(votes, anchor=("m0", 1000.0))
    r2 = stats.fit_bradley_terry(votes, anchor=("m3", 800.0))
    assert r1[0] == pytest.approx(1000.0) and r2[3] == pytest.approx(800.0)
    np.testing.assert_allclose(r1 - r2, np.full(4, (r1 - r2)[0]), atol=1e-9)


def test_ratings_do_not_depend_on_which_side_a_model_was_shown():
    votes = simulate_votes(np.array([0.0, 0.7, -0.4]), 3000, tie_rate=0.1, seed=5)
    swapped = Votes(votes.models, votes.b, votes.a, 1 - votes.outcome, votes.weight)
    np.testing.assert_allclose(
        stats.fit_bradley_terry(votes), stats.fit_bradley_terry(swapped), atol=1e-9
    )


def test_a_tie_is_half_a_win_and_weights_count_as_repeated_votes():
    tie = Votes.from_records(["x", "x"], ["y", "y"], [1.0, 0.0])
    assert stats.fit_bradley_terry(Votes.from_records(["x"], ["y"], [0.5], [2.0])) == pytest.approx(
        stats.fit_bradley_terry(tie)
    )
    triple = Votes.from_records(["x", "x", "x", "y"], ["y", "y", "y", "x"], [1, 1, 1, 1])
    weighted = Votes.from_records(["x", "y"], ["y", "x"], [1, 1], [3, 1])
    assert stats.fit_bradley_terry(weighted) == pytest.approx(stats.fit_bradley_terry(triple))


def test_soft_preference_levels_map_to_the_preferred_side():
    assert stats.preference_outcome("significantly_better", "a") == 1.0
    assert stats.preference_outcome("slightly_better", "b") == 0.25
    assert stats.preference_outcome("tie_both_good", None) == 0.5
    with pytest.raises(KeyError):
        stats.preference_outcome("much_better", "a")


def test_unregularised_fit_refuses_a_model_that_never_loses():
    votes = Votes.from_records(["x", "x", "y"], ["y", "z", "z"], [1.0, 1.0, 0.5])
    with pytest.raises(RuntimeError, match="did not converge"):
        stats.fit_bradley_terry(votes, BTScale(l2=0.0))
    assert np.isfinite(stats.fit_bradley_terry(votes)).all()  # the default ridge keeps it finite


def test_bootstrap_intervals_cover_the_point_and_rank_by_overlap():
    strength = np.array([0.0, 0.02, 1.0, 2.0])  # m0 and m1 are indistinguishable
    votes = simulate_votes(strength, 20_000, tie_rate=0.2, seed=6)
    result = stats.bradley_terry_intervals(votes, n_rounds=60)
    assert np.all(result.ci_low <= result.rating) and np.all(result.rating <= result.ci_high)
    assert list(result.rank) == [3, 3, 2, 1]
    assert result.table()[0]["model"] == "m3"
    assert result.bootstrap.shape == (60, 4)


def test_rank_by_interval_counts_models_clearly_above():
    lo, hi = np.array([10.0, 8.0, 0.0, -5.0]), np.array([12.0, 11.0, 9.0, 1.0])
    assert list(stats.rank_by_interval(lo, hi)) == [1, 1, 2, 3]


def test_default_fit_equals_fastchats_logistic_regression_solved_to_convergence():
    """FastChat's compute_elo_mle_with_tie: duplicate every battle, a tie becomes one win each
    way, sklearn LogisticRegression(C=1, no intercept) on +-ln(10) columns; rating 400c+1000.
    (FastChat keeps sklearn's tol=1e-4; here it is tightened so both reach the optimum.)"""
    linear_model = pytest.importorskip("sklearn.linear_model")
    votes = simulate_votes(np.array([0.0, 0.8, -0.5, 0.3, 1.2]), 3000, tie_rate=0.25, seed=7)
    n, k = len(votes.a), len(votes.models)
    x = np.zeros((2 * n, k))
    rows = np.arange(2 * n)
    x[rows, np.tile(votes.a, 2)] = math.log(10)
    x[rows, np.tile(votes.b, 2)] = -math.log(10)
    y = np.concatenate([votes.outcome >= 0.5, votes.outcome == 1.0]).astype(float)
    lr = linear_model.LogisticRegression(fit_intercept=False, tol=1e-12, max_iter=10_000)
    expected = 400 * lr.fit(x, y).coef_[0] + 1000
    np.testing.assert_allclose(stats.fit_bradley_terry(votes), expected, atol=1e-3)
