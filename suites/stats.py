"""Statistics for benchmark results and human-preference votes. Plain functions on arrays.

- `wilson_interval`: score interval for a proportion (Wilson 1927), good at small n and near 0/1.
- `bootstrap_mean_ci`: percentile bootstrap of a mean (Efron & Tibshirani 1993).
- `paired_bootstrap_diff`: the same on per-example differences between two runs of one suite,
  for regression detection (Koehn 2004 uses the paired form for MT).
- `fit_bradley_terry` / `bradley_terry_intervals`: Bradley-Terry (1952) ratings from pairwise
  votes on the Elo scale Chatbot Arena reports (Chiang et al. 2024), with ties and soft or
  weighted outcomes, bootstrap intervals, and Arena's rank-by-interval.

The Bradley-Terry fit works on aggregated counts, never on one row per vote: votes collapse
into a (K, K) matrix of won score mass, Newton's method runs on that (K is the number of
models, tens), and the bootstrap draws multinomial counts over the distinct vote cells
instead of resampling a million rows, so every round costs O(K^2) after one O(n) pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from models.preferences import PREFERENCE_LEVELS, TIES

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Score for the preferred side at each preference level (a tie is 0.5, the strongest level a
# full win). Not the reward model's soft targets: models.preferences.Level says why. Pass your
# own mapping to `preference_outcome` to change it.
PREFERENCE_SCORES: Mapping[str, float] = {lv.name: lv.arena_score for lv in PREFERENCE_LEVELS}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for successes/n; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, n={n}]")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _bootstrap_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resamples of x, drawn in chunks so memory stays near 8 MB."""
    n = len(x)
    out = np.empty(n_boot)
    rows = max(1, 1_000_000 // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = x[idx].mean(axis=1)
    return out


def bootstrap_mean_ci(
    values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap 1-alpha interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    means = _bootstrap_means(x, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


@dataclass(frozen=True)
class PairedDiff:
    """Mean of (b - a) over shared examples, its bootstrap interval and a two-sided p-value."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero: a real change, not noise."""
        return self.ci_low > 0 or self.ci_high < 0


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> PairedDiff:
    """Paired bootstrap of run b minus run a. Precondition: a[i] and b[i] score the same example.

    Resampling examples (not runs) keeps the pairing, so the interval reflects how much the
    difference depends on which questions happen to be in the set.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"need two equal, non-empty arrays, got {x.shape} and {y.shape}")
    d = y - x
    means = _bootstrap_means(d, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # Share of resamples on the far side of zero, doubled: the bootstrap's two-sided p-value.
    p = 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return PairedDiff(float(d.mean()), float(lo), float(hi), float(min(1.0, p)), int(d.size))


# ---------------------------------------------------------------- Bradley-Terry


def preference_outcome(
    level: str, preferred: str | None, scores: Mapping[str, float] = PREFERENCE_SCORES
) -> float:
    """Score of model A for one vote at preference `level` (a name from
    models.preferences.LEVELS): `preferred` is "a", "b", or None for a tie."""
    s = scores[level]
    if preferred is None or level in TIES:
        return 0.5
    if preferred not in ("a", "b"):
        raise ValueError(f"preferred must be 'a', 'b' or None, got {preferred!r}")
    return s if preferred == "a" else 1.0 - s


@dataclass(frozen=True)
class Votes:
    """Pairwise votes as arrays. outcome[i] is model a[i]'s score against b[i] in [0, 1]
    (1 win, 0 loss, 0.5 tie, anything between for soft preferences); weight[i] >= 0."""

    models: tuple[str, ...]
    a: np.ndarray  # (n,) int indices into models
    b: np.ndarray  # (n,) int
    outcome: np.ndarray  # (n,) float
    weight: np.ndarray  # (n,) float

    @classmethod
    def from_records(
        cls,
        model_a: Sequence[str],
        model_b: Sequence[str],
        outcome: Sequence[float],
        weight: Sequence[float] | None = None,
    ) -> Votes:
        models = tuple(sorted(set(model_a) | set(model_b)))
        index = {m: i for i, m in enumerate(models)}
        n = len(model_a)
        a = np.fromiter((index[m] for m in model_a), dtype=np.int64, count=n)
        b = np.fromiter((index[m] for m in model_b), dtype=np.int64, count=n)
        y = np.asarray(outcome, dtype=float)
        w = np.ones(n) if weight is None else np.asarray(weight, dtype=float)
        if len(y) != n or len(w) != n or np.any((y < 0) | (y > 1)) or np.any(w < 0):
            raise ValueError("outcome must be in [0, 1], weight >= 0, both as long as model_a")
        if np.any(a == b):
            raise ValueError("a vote compares a model with itself")
        return cls(models, a, b, y, w)

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Distinct (a, b, outcome, weight) combinations and how many votes fall in each.

        Returns (a, b, won, lost, count): won/lost are the score mass one vote of the cell
        gives a over b and b over a. Real vote tables have few distinct cells (pairs times
        preference levels), which is what makes the bootstrap cheap.
        """
        k = len(self.models)
        levels, level_idx = np.unique(
            np.stack([self.outcome, self.weight]), axis=1, return_inverse=True
        )
        code = (self.a * k + self.b) * levels.shape[1] + level_idx.ravel()
        uniq, count = np.unique(code, return_counts=True)
        level = uniq % levels.shape[1]
        pair = uniq // levels.shape[1]
        y, w = levels[0, level], levels[1, level]
        return pair // k, pair % k, w * y, w * (1 - y), count


def _won_matrix(k: int, a, b, won, lost, counts: np.ndarray) -> np.ndarray:
    """(R, K, K) won-mass matrices from (R, C) cell counts: W[r, i, j] = i's score over j."""
    rounds = counts.shape[0]
    offset = (np.arange(rounds) * k * k)[:, None]  # (R, 1)
    flat = np.bincount((offset + a * k + b).ravel(), (counts * won).ravel(), rounds * k * k)
    flat += np.bincount((offset + b * k + a).ravel(), (counts * lost).ravel(), rounds * k * k)
    return flat.reshape(rounds, k, k)


def _newton(won: np.ndarray, l2: float, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Minimise -sum W_ij log sigmoid(t_i - t_j) + l2/2 |t|^2 for each of R matrices at once.

    won: (R, K, K). Returns t: (R, K) natural-log strengths. With l2 == 0 the loss is flat
    along t + c, so the step solves (H + 11^T/K) d = -g, which keeps sum(t) = 0.
    Raises RuntimeError when it does not converge, which with l2 == 0 means some model has
    no wins or no losses, or the comparison graph is disconnected: no finite MLE exists.
    """
    rounds, k, _ = won.shape
    total = won + won.transpose(0, 2, 1)  # (R, K, K) votes between i and j
    theta = np.zeros((rounds, k))
    ridge = l2 * np.eye(k) if l2 > 0 else np.ones((k, k)) / k
    for _ in range(max_iter):
        p = expit(theta[:, :, None] - theta[:, None, :])  # (R, K, K) P(i beats j)
        grad = (total * p - won).sum(axis=2) + l2 * theta  # (R, K)
        curv = total * p * (1 - p)  # (R, K, K)
        hess = -curv + np.eye(k) * curv.sum(axis=2)[:, :, None] + ridge  # (R, K, K)
        step = np.linalg.solve(hess, -grad[:, :, None])[:, :, 0]  # (R, K)
        # Cap a step at 4 nats: near-separable data makes early Newton steps overshoot.
        step *= np.minimum(1.0, 4.0 / np.maximum(np.abs(step).max(axis=1), 1e-300))[:, None]
        theta += step
        if np.abs(step).max() < tol:
            return theta
    raise RuntimeError(
        "Bradley-Terry fit did not converge; with l2=0 some model may have "
        "only wins or only losses, or the vote graph may be disconnected"
    )


@dataclass(frozen=True)
class BTScale:
    """How strengths map to reported ratings: rating = init + scale * log_base(strength).

    Defaults are Chatbot Arena's Elo scale (FastChat `compute_elo_mle_with_tie`: SCALE=400,
    BASE=10, INIT_RATING=1000). l2 is a ridge penalty l2/2 * |c|^2 on c = log_base strengths;
    0.5 reproduces FastChat's LogisticRegression(C=1.0) on its duplicated battles (each vote
    appears twice there), and it keeps ratings finite for a model that never loses.
    """

    scale: float = 400.0
    base: float = 10.0
    init: float = 1000.0
    l2: float = 0.5

    def ratings(self, theta: np.ndarray) -> np.ndarray:
        return self.init + self.scale * theta / math.log(self.base)

    @property
    def l2_natural(self) -> float:
        """The penalty on natural-log strengths t = c * ln(base)."""
        return self.l2 / math.log(self.base) ** 2


def _anchored(ratings: np.ndarray, models: Sequence[str], anchor: tuple[str, float] | None):
    if anchor is None:
        return ratings
    name, value = anchor
    return ratings + (value - ratings[..., list(models).index(name)])[..., None]


def fit_bradley_terry(
    votes: Votes, scale: BTScale = BTScale(), anchor: tuple[str, float] | None = None
) -> np.ndarray:
    """Ratings (K,) in `votes.models` order; `anchor=(model, value)` shifts them so that
    model gets value (the fit itself does not depend on it)."""
    a, b, won, lost, count = votes.cells()
    w = _won_matrix(len(votes.models), a, b, won, lost, count[None, :].astype(float))
    return _anchored(scale.ratings(_newton(w, scale.l2_natural)[0]), votes.models, anchor)


@dataclass(frozen=True)
class BTRatings:
    """Point ratings with percentile-bootstrap intervals and rank-by-interval, model order."""

    models: tuple[str, ...]
    rating: np.ndarray  # (K,)
    ci_low: np.ndarray  # (K,)
    ci_high: np.ndarray  # (K,)
    rank: np.ndarray  # (K,) int, 1 = best
    bootstrap: np.ndarray  # (R, K) ratings of each round, for custom summaries

    def table(self) -> list[dict[str, float | int | str]]:
        """One dict per model, best first."""
        order = np.argsort(-self.rating, kind="stable")
        return [
            {
                "model": self.models[i],
                "rating": float(self.rating[i]),
                "ci_low": float(self.ci_low[i]),
                "ci_high": float(self.ci_high[i]),
                "rank": int(self.rank[i]),
            }
            for i in order
        ]


def bradley_terry_intervals(
    votes: Votes,
    n_rounds: int = 100,
    scale: BTScale = BTScale(),
    anchor: tuple[str, float] | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    chunk: int = 50,
) -> BTRatings:
    """Point fit plus bootstrap: each round redraws all n votes with replacement.

    Drawing n votes with replacement is the same as drawing multinomial counts over the
    distinct vote cells with probabilities count/n, which is what this does; rounds are fitted
    `chunk` at a time as one batched Newton solve.
    """
    a, b, won, lost, count = votes.cells()
    k, n = len(votes.models), int(count.sum())
    rng = np.random.default_rng(seed)
    point = _won_matrix(k, a, b, won, lost, count[None, :].astype(float))
    rating = scale.ratings(_newton(point, scale.l2_natural)[0])
    boots = []
    for start in range(0, n_rounds, chunk):
        draws = rng.multinomial(n, count / n, size=min(chunk, n_rounds - start))  # (R, C)
        w = _won_matrix(k, a, b, won, lost, draws.astype(float))
        boots.append(scale.ratings(_newton(w, scale.l2_natural)))
    boot = _anchored(np.concatenate(boots), votes.models, anchor)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    return BTRatings(
        votes.models,
        _anchored(rating, votes.models, anchor),
        lo,
        hi,
        rank_by_interval(lo, hi),
        boot,
    )


def rank_by_interval(ci_low: np.ndarray, ci_high: np.ndarray) -> np.ndarray:
    """Chatbot Arena's rank: 1 + the number of models whose lower bound exceeds this model's
    upper bound, so models with overlapping intervals share a rank."""
    lo, hi = np.asarray(ci_low), np.asarray(ci_high)
    return 1 + (lo[None, :] > hi[:, None]).sum(axis=1)


# ---------------------------------------------------------------- judge-corrected rates


def rogan_gladen(observed: float, sensitivity: float, specificity: float) -> float:
    """True prevalence from a rate measured by an imperfect judge (Rogan & Gladen 1978):
    (observed + specificity - 1) / (sensitivity + specificity - 1), clipped to [0, 1].
    Precondition: sensitivity + specificity > 1 (a judge better than chance)."""
    youden = sensitivity + specificity - 1
    if youden <= 0:
        raise ValueError(f"sensitivity + specificity must exceed 1, got {youden + 1:.3g}")
    return min(1.0, max(0.0, (observed + specificity - 1) / youden))


@dataclass(frozen=True)
class CorrectedRate:
    raw: float  # the judge's rate, k / n
    corrected: float  # Rogan-Gladen point estimate
    ci_low: float
    ci_high: float
    n: int


def corrected_rate(
    k: int,
    n: int,
    true_pos: int,
    positives: int,
    true_neg: int,
    negatives: int,
    n_boot: int = 4000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CorrectedRate:
    """Rogan-Gladen corrected rate of k flagged out of n, for a judge whose sensitivity was
    measured as true_pos / positives and specificity as true_neg / negatives on human labels.

    The interval is a parametric bootstrap over all three uncertain proportions (the observed
    rate, sensitivity and specificity), each drawn from its Jeffreys Beta(x + 1/2, m - x + 1/2)
    posterior; draws where the judge is no better than chance are dropped and each draw is
    clipped to [0, 1], so the interval widens with few human labels, not only with small n.
    """
    if not (0 <= k <= n and 0 < n and 0 <= true_pos <= positives and 0 <= true_neg <= negatives):
        raise ValueError("counts out of range")
    if positives == 0 or negatives == 0:
        raise ValueError("sensitivity and specificity each need at least one human label")
    se, sp = true_pos / positives, true_neg / negatives
    rng = np.random.default_rng(seed)
    p = rng.beta(k + 0.5, n - k + 0.5, n_boot)
    se_b = rng.beta(true_pos + 0.5, positives - true_pos + 0.5, n_boot)
    sp_b = rng.beta(true_neg + 0.5, negatives - true_neg + 0.5, n_boot)
    youden = se_b + sp_b - 1
    ok = youden > 0
    draws = np.clip((p[ok] + sp_b[ok] - 1) / youden[ok], 0.0, 1.0)
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2]) if draws.size else (0.0, 1.0)
    return CorrectedRate(k / n, rogan_gladen(k / n, se, sp), float(lo), float(hi), n)
