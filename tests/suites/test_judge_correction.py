"""Rogan-Gladen correction of a judge-measured rate, with error-rate uncertainty (issue 15)."""

import pytest

from suites.stats import corrected_rate, rogan_gladen


def test_a_perfect_judge_needs_no_correction():
    assert rogan_gladen(0.3, 1.0, 1.0) == pytest.approx(0.3)


def test_rogan_gladen_on_a_worked_case():
    # se 0.9, sp 0.8: observed 0.41 = 0.9 * 0.3 + 0.2 * 0.7, so the true rate is 0.3
    assert rogan_gladen(0.41, 0.9, 0.8) == pytest.approx(0.3)


def test_the_correction_is_clipped_to_the_unit_interval():
    assert rogan_gladen(0.05, 0.9, 0.8) == 0.0  # below the false-positive floor 0.2
    assert rogan_gladen(0.99, 0.9, 0.8) == 1.0  # above the sensitivity ceiling 0.9


def test_a_judge_no_better_than_chance_is_refused():
    with pytest.raises(ValueError, match="exceed 1"):
        rogan_gladen(0.5, 0.5, 0.5)


def test_the_interval_covers_the_estimate_and_widens_with_fewer_human_labels():
    many = corrected_rate(410, 1000, 900, 1000, 800, 1000)
    few = corrected_rate(410, 1000, 9, 10, 8, 10)
    assert many.raw == pytest.approx(0.41) and many.corrected == pytest.approx(0.3)
    assert many.ci_low < 0.3 < many.ci_high
    assert few.ci_high - few.ci_low > 2 * (many.ci_high - many.ci_low)
    assert 0.0 <= few.ci_low and few.ci_high <= 1.0
    assert corrected_rate(410, 1000, 900, 1000, 800, 1000) == many  # seeded


def test_counts_out_of_range_are_rejected():
    with pytest.raises(ValueError):
        corrected_rate(5, 4, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="at least one human label"):
        corrected_rate(1, 4, 0, 0, 1, 1)
