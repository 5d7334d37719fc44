"""Inter-rater agreement and rater quality statistics for human grading. Plain functions on arrays.

- `krippendorff_alpha`: Krippendorff's alpha for nominal, ordinal and interval values with
  missing ratings, from the coincidence matrix of Krippendorff (2011), "Computing Krippendorff's
  Alpha-Reliability", Annenberg School for Communication Departmental Papers 43.
- `fleiss_kappa`: Fleiss' (1971) kappa, generalised to items rated by different numbers of
  raters as in Gwet (2014), "Handbook of Inter-Rater Reliability", 4th ed., ch. 2.
- `pairwise_agreement_rate`: the raw share of rater pairs on an item that agree.
- `majority_agreement`: per rater, how often they side with the strict majority of the others.
- `rater_stats` / `flag_raters`: per-rater gold accuracy, speed and left/right position bias,
  and the human-readable reasons a rater needs review.

Labels are coded once (a dict for any hashable id, `np.unique` for numeric values) and counted
with `np.bincount` or a sparse unit-by-value matrix, so 100k labels take milliseconds. This
module is maths only: it sits in the `grading` app but never imports Django.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.stats import binomtest

Level = Literal["nominal", "ordinal", "interval"]


def _factorize(keys: Iterable[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Integer codes in first-seen order, and the distinct keys in that order."""
    index: dict[Hashable, int] = {}
    codes = [index.setdefault(k, len(index)) for k in keys]
    return np.asarray(codes, dtype=np.intp), list(index)


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _flatten(units: Sequence[Sequence[object]] | np.ndarray) -> tuple[np.ndarray, list]:
    """(unit index, value) of every present value; None and nan are missing."""
    if isinstance(units, np.ndarray) and units.ndim == 2 and units.dtype.kind == "f":
        rows, cols = np.nonzero(~np.isnan(units))
        return rows.astype(np.intp), units[rows, cols].tolist()
    unit_idx, values = [], []
    for i, unit in enumerate(units):
        for v in unit:
            if not _missing(v):
                unit_idx.append(i)
                values.append(v)
    return np.asarray(unit_idx, dtype=np.intp), values


def _pairable(
    unit_idx: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep values whose unit has at least 2; also return m_u, that unit's count, per value."""
    m = np.bincount(unit_idx)[unit_idx]
    keep = m >= 2
    return unit_idx[keep], values[keep], m[keep]


def _coincidences(
    unit_idx: np.ndarray, codes: np.ndarray, m: np.ndarray, n_values: int
) -> np.ndarray:
    """o_ck = sum_u (n_uc n_uk - [c = k] n_uc) / (m_u - 1), Krippendorff (2011) p. 2; (V, V)."""
    shape = (int(unit_idx.max()) + 1, n_values)
    # csr_array sums duplicate (unit, value) entries, so these hold n_uc and n_uc / (m_u - 1).
    counts = sparse.csr_array((np.ones(len(codes)), (unit_idx, codes)), shape=shape)
    weighted = sparse.csr_array((1.0 / (m - 1), (unit_idx, codes)), shape=shape)
    return (weighted.T @ counts).toarray() - np.diag(weighted.sum(axis=0))


def _squared_distances(level: Level, domain: np.ndarray, n_c: np.ndarray) -> np.ndarray:
    """delta^2_ck for the sorted values `domain` with coincidence marginals n_c; (V, V)."""
    if level == "nominal":
        return 1.0 - np.eye(len(domain))
    if level == "interval":
        x = domain
    else:
        # Krippendorff's ordinal (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2 is the squared gap
        # between the mid-ranks cumsum(n)_c - n_c / 2 of the two values.
        x = np.cumsum(n_c) - n_c / 2
    return (x[:, None] - x[None, :]) ** 2


def krippendorff_alpha(
    units: Sequence[Sequence[float | None]] | np.ndarray, *, level: Level = "ordinal"
) -> float:
    """Krippendorff's alpha = 1 - D_o / D_e (Krippendorff 2011, "Computing ...", sections C-E).

    `units` is one entry per unit (item), each the values its raters gave, any number of them;
    a 2-D float array is read the same way, shape (n_units, n_raters) with nan where a rater
    gave nothing: the transpose of Krippendorff's reliability data and of the `krippendorff`
    package's input. None and nan are missing; units with fewer than 2 values are not
    pairable and drop out. Returns nan when no unit is pairable or the pairable values do not
    vary (D_e = 0).
    """
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be nominal, ordinal or interval, not {level!r}")
    unit_idx, values = _flatten(units)
    unit_idx, x, m = _pairable(unit_idx, np.asarray(values, dtype=float))
    if len(x) == 0:
        return math.nan
    domain, codes = np.unique(x, return_inverse=True)
    o = _coincidences(unit_idx, codes, m, len(domain))
    n_c = o.sum(axis=0)
    d2 = _squared_distances(level, domain, n_c)
    expected = n_c @ d2 @ n_c  # n(n - 1) D_e
    if expected == 0:
        return math.nan
    return float(1.0 - (n_c.sum() - 1) * (o * d2).sum() / expected)


def fleiss_kappa(counts: Sequence[Sequence[int]] | np.ndarray) -> float:
    """Fleiss' kappa from counts of shape (n_items, n_categories), counts[i, j] the number of
    raters who put item i in category j; rows may sum to different numbers of raters r_i.

    Gwet's (2014, ch. 2) generalisation for missing ratings: p_a is the mean over items of
    sum_j r_ij (r_ij - 1) / (r_i (r_i - 1)), p_e = sum_j pi_j^2 with pi_j the mean over items
    of r_ij / r_i. Items with fewer than 2 ratings are dropped from both terms (Gwet keeps
    single-rated items in pi_j); with equal r_i this is Fleiss (1971) exactly. Returns nan
    when no item has 2 ratings or chance agreement is 1 (every rating in one category).
    """
    x = np.asarray(counts, dtype=float)
    if x.ndim != 2 or (x < 0).any():
        raise ValueError("counts must be a non-negative (n_items, n_categories) array")
    r = x.sum(axis=1)
    x, r = x[r >= 2], r[r >= 2]
    if len(x) == 0:
        return math.nan
    p_a = np.mean((x * (x - 1)).sum(axis=1) / (r * (r - 1)))
    pi = (x / r[:, None]).mean(axis=0)
    p_e = pi @ pi
    return math.nan if p_e == 1 else float((p_a - p_e) / (1 - p_e))


def pairwise_agreement_rate(units: Sequence[Sequence[Hashable | None]]) -> float:
    """Share of all rater pairs within items that gave the same label, pooled over items
    (an item with r labels holds r(r - 1)/2 pairs). `units` is one list of labels per item;
    None is missing and items with fewer than 2 labels are skipped. nan if no pair."""
    unit_idx, labels = _flatten(units)
    codes, categories = _factorize(labels)
    unit_idx, codes, _ = _pairable(unit_idx, codes)
    if len(codes) == 0:
        return math.nan
    _, n_uc = np.unique(unit_idx * len(categories) + codes, return_counts=True)
    _, m_u = np.unique(unit_idx, return_counts=True)
    return float((n_uc * (n_uc - 1)).sum() / (m_u * (m_u - 1)).sum())


def majority_agreement(
    labels: Iterable[tuple[Hashable, Hashable, Hashable]],
) -> dict[Hashable, float]:
    """Per rater, the share of their labels that match the strict majority of the other raters
    on the same item (leave-one-out). `labels` holds (item_id, rater_id, category) rows.

    Only items with at least 3 labels count. The others' majority must be strict, more than
    half of their labels: where the others split evenly or no category passes half, the label
    is skipped for lack of a reference, never counted as agreement. A rater with no label left
    gets nan. Each row counts as one label, so repeat labels by one rater are not merged.
    """
    labels = list(labels)
    if not labels:
        return {}
    item, _ = _factorize(row[0] for row in labels)
    rater, rater_ids = _factorize(row[1] for row in labels)
    cat, categories = _factorize(row[2] for row in labels)
    width = len(categories) + 1  # a spare empty column, so every item has a runner-up count
    counts = np.bincount(item * width + cat, minlength=(item.max() + 1) * width).reshape(-1, width)
    top = np.sort(counts, axis=1)  # (n_items, width), ascending
    mine = counts[item, cat]  # labels on this label's item in its category, itself included
    best_other = np.where(mine == top[item, -1], top[item, -2], top[item, -1])
    m = counts.sum(axis=1)[item]  # labels on this label's item
    half = (m - 1) / 2  # half of the other raters' labels
    agrees = mine - 1 > half
    judged = (m >= 3) & (agrees | (best_other > half))
    n = np.bincount(rater, weights=judged, minlength=len(rater_ids))
    k = np.bincount(rater, weights=agrees & judged, minlength=len(rater_ids))
    with np.errstate(invalid="ignore"):
        return dict(zip(rater_ids, (k / n).tolist(), strict=True))


@dataclass(frozen=True)
class LabelRecord:
    """One label for `rater_stats`; any object with these four attributes will do."""

    rater_id: Hashable
    seconds: float | None = None  # time spent on the label
    picked_left: bool | None = None  # side-by-side, non-tie labels only
    gold_correct: bool | None = None  # items with a known answer only


@dataclass(frozen=True)
class RaterStats:
    n_labels: int
    gold_n: int
    gold_accuracy: float  # nan without gold items
    median_seconds: float  # nan without timings
    side_n: int  # non-tie side-by-side picks
    left_pick_rate: float  # nan when side_n == 0
    left_pick_p_value: float  # two-sided exact binomial test of left_pick_rate = 0.5
    majority_agreement: float = math.nan  # from `majority_agreement`


def _column(values: Iterable[object]) -> np.ndarray:
    """Floats with None as nan and bools as 0/1."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _stats_of(
    seconds: np.ndarray, left: np.ndarray, gold: np.ndarray, majority: float
) -> RaterStats:
    n_labels = len(seconds)
    seconds, left, gold = (a[~np.isnan(a)] for a in (seconds, left, gold))
    return RaterStats(
        n_labels=n_labels,
        gold_n=len(gold),
        gold_accuracy=float(gold.mean()) if len(gold) else math.nan,
        median_seconds=float(np.median(seconds)) if len(seconds) else math.nan,
        side_n=len(left),
        left_pick_rate=float(left.mean()) if len(left) else math.nan,
        left_pick_p_value=binomtest(int(left.sum()), len(left)).pvalue if len(left) else math.nan,
        majority_agreement=majority,
    )


def rater_stats(
    records: Iterable[LabelRecord], *, majority: Mapping[Hashable, float] | None = None
) -> dict[Hashable, RaterStats]:
    """Per-rater `RaterStats` from label records (`LabelRecord` or any object with its
    attributes, e.g. a `values_list(..., named=True)` row). A None field leaves the label out
    of that statistic only. `majority` (from `majority_agreement`) fills majority_agreement;
    raters missing from it get nan."""
    records = list(records)
    rater, rater_ids = _factorize(r.rater_id for r in records)
    seconds = _column(r.seconds for r in records)
    left = _column(r.picked_left for r in records)
    gold = _column(r.gold_correct for r in records)
    order = np.argsort(rater, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(rater, minlength=len(rater_ids)))[:-1])
    majority = majority or {}
    return {
        rid: _stats_of(seconds[g], left[g], gold[g], majority.get(rid, math.nan))
        # not strict: with no records np.split still returns one (empty) group
        for rid, g in zip(rater_ids, groups, strict=False)
    }


@dataclass(frozen=True)
class Thresholds:
    """When `flag_raters` asks for review. EvalHub's defaults, set by judgment rather than
    taken from a published standard; tune them per campaign."""

    min_gold_accuracy: float = 0.7  # gold items are chosen to be unambiguous
    min_majority_agreement: float = 0.5  # siding with the others' majority less than half the time
    max_left_pick_deviation: float = 0.15  # left-pick rate outside 35%-65% ...
    max_left_pick_p_value: float = 0.01  # ... and unlikely from an unbiased rater
    min_median_seconds: float = 3.0  # too fast to have read both answers
    min_labels_for_flags: int = 10  # fewer labels say too little to flag anyone

    @classmethod
    def from_mapping(cls, value: object) -> Thresholds:
        """Thresholds from a campaign's JSON: an object naming some of the fields above, each
        a number in its range (THRESHOLD_RANGES); the rest keep their defaults. Raises
        ValueError with a message that names the bad entry."""
        if not isinstance(value, dict):
            raise ValueError(
                "thresholds must be a JSON object such as "
                '{"min_gold_accuracy": 0.7}; {} keeps every default'
            )
        for name, number in value.items():
            if name not in THRESHOLD_RANGES:
                known = ", ".join(THRESHOLD_RANGES)
                raise ValueError(f"unknown threshold {str(name)[:40]!r} (known: {known})")
            lo, hi, whole = THRESHOLD_RANGES[name]
            if (
                isinstance(number, bool)
                or not isinstance(number, int | float)
                or not math.isfinite(number)
                or (whole and not float(number).is_integer())
            ):
                kind = "a whole number" if whole else "a number"
                raise ValueError(f"threshold {name!r} must be {kind}")
            if not lo <= number <= hi:
                raise ValueError(f"threshold {name!r} must be between {lo} and {hi}")
        return cls(
            **{name: (int(v) if THRESHOLD_RANGES[name][2] else v) for name, v in value.items()}
        )


# (lowest, highest, whole number) of each threshold a campaign may set.
THRESHOLD_RANGES = {
    "min_gold_accuracy": (0, 1, False),
    "min_majority_agreement": (0, 1, False),
    "max_left_pick_deviation": (0, 0.5, False),
    "max_left_pick_p_value": (0, 1, False),
    "min_median_seconds": (0, 3600, False),
    "min_labels_for_flags": (0, 1_000_000, True),
}


def _reasons(s: RaterStats, t: Thresholds) -> list[str]:
    # Comparisons with nan are False, so a statistic that is missing never raises a flag.
    reasons = []
    if s.gold_n and s.gold_accuracy < t.min_gold_accuracy:
        items = "item" if s.gold_n == 1 else "items"
        accuracy = f"{s.gold_accuracy:.0%} < {t.min_gold_accuracy:.0%}"
        reasons.append(f"gold accuracy {accuracy} ({s.gold_n} gold {items})")
    if s.majority_agreement < t.min_majority_agreement:
        reasons.append(
            f"majority agreement {s.majority_agreement:.0%} < {t.min_majority_agreement:.0%}"
        )
    if (
        abs(s.left_pick_rate - 0.5) > t.max_left_pick_deviation
        and s.left_pick_p_value < t.max_left_pick_p_value
    ):
        reasons.append(
            f"picked the left answer in {s.left_pick_rate:.0%} of {s.side_n} side-by-side "
            f"choices (p={s.left_pick_p_value:.2g})"
        )
    if s.median_seconds < t.min_median_seconds:
        reasons.append(f"median {s.median_seconds:.1f} s per label < {t.min_median_seconds:.1f} s")
    return reasons


def flag_raters(
    stats: Mapping[Hashable, RaterStats], thresholds: Thresholds = Thresholds()
) -> dict[Hashable, list[str]]:
    """Human-readable reasons to review each rater that crosses a threshold; raters with no
    reason, or fewer than `thresholds.min_labels_for_flags` labels, are left out."""
    flags = {}
    for rater_id, s in stats.items():
        if s.n_labels >= thresholds.min_labels_for_flags and (reasons := _reasons(s, thresholds)):
            flags[rater_id] = reasons
    return flags
