"""Bradley-Terry ratings with bootstrap intervals: EvalHub vs FastChat on the same votes.

Peer: FastChat 0.2.36 `compute_elo_mle_with_tie` + `get_bootstrap_result`
(fastchat/serve/monitor/elo_analysis.py), the code behind the Chatbot Arena leaderboard:
one sklearn logistic regression on a (2n, K) design matrix per fit, the bootstrap resampling
the battle DataFrame row by row. EvalHub (`suites.stats.bradley_terry_intervals`) collapses
the votes to distinct cells once and fits each round by batched Newton on a (K, K) matrix.

Agreement is measured against FastChat's own function with sklearn's tolerance tightened
(FastChat keeps sklearn's default tol=1e-4, where lbfgs stops a few tenths of an Elo point
short of the optimum of the objective both implement); the gap to stock FastChat is printed
too. FastChat's bootstrap takes minutes per 10 rounds here, so `--fastchat-rounds` below 100
times that many rounds and scales the per-round time to 100, saying so.

Needs (benchmark only, not runtime): fschat==0.2.36 --no-deps, plotly, pytz, scikit-learn,
psutil, accelerate (fastchat's import chain). Last line:
    speedup_vs_fastchat=X.X max_rating_diff=Y
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))  # run from anywhere

import argparse
import time

import numpy as np
import pandas as pd

from suites.stats import Votes, bradley_terry_intervals

WINNER_SCORE = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def simulate_battles(n: int, k: int, seed: int) -> pd.DataFrame:
    """Arena-style battle log: random pairs, BT outcomes on N(0, 1) strengths, 20% ties."""
    rng = np.random.default_rng(seed)
    strength = rng.normal(0.0, 1.0, k)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    p_a = 1 / (1 + np.exp(strength[b] - strength[a]))
    winner = np.where(rng.random(n) < p_a, "model_a", "model_b").astype(object)
    tie = rng.random(n)
    winner[tie < 0.15] = "tie"
    winner[(tie >= 0.15) & (tie < 0.20)] = "tie (bothbad)"
    names = np.array([f"model-{i:02d}" for i in range(k)], dtype=object)
    return pd.DataFrame({"model_a": names[a], "model_b": names[b], "winner": winner})


def evalhub(df: pd.DataFrame, rounds: int) -> tuple[pd.Series, float]:
    start = time.perf_counter()
    votes = Votes.from_records(
        df["model_a"].tolist(), df["model_b"].tolist(), df["winner"].map(WINNER_SCORE).to_numpy()
    )
    result = bradley_terry_intervals(votes, n_rounds=rounds)
    seconds = time.perf_counter() - start
    return pd.Series(result.rating, index=list(votes.models)), seconds


def fastchat(df: pd.DataFrame, rounds: int) -> tuple[pd.Series, float]:
    from fastchat.serve.monitor.elo_analysis import compute_elo_mle_with_tie, get_bootstrap_result

    start = time.perf_counter()
    point = compute_elo_mle_with_tie(df)
    fit_seconds = time.perf_counter() - start
    if rounds:
        start = time.perf_counter()
        get_bootstrap_result(df, compute_elo_mle_with_tie, num_round=rounds)
        per_round = (time.perf_counter() - start) / rounds
    else:
        per_round = fit_seconds  # a bootstrap round is one fit on a resample of equal size
    return point, fit_seconds + 100 * per_round


def fastchat_converged(df: pd.DataFrame) -> pd.Series:
    """FastChat's function unchanged, with sklearn's LogisticRegression told to converge."""
    import sklearn.linear_model as lm
    from fastchat.serve.monitor.elo_analysis import compute_elo_mle_with_tie

    stock = lm.LogisticRegression

    class Converged(stock):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs):
            super().__init__(tol=1e-10, max_iter=10_000, **kwargs)

    lm.LogisticRegression = Converged
    try:
        return compute_elo_mle_with_tie(df)
    finally:
        lm.LogisticRegression = stock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100, help="bootstrap rounds")
    parser.add_argument(
        "--fastchat-rounds",
        type=int,
        default=100,
        help="FastChat rounds actually run; time is scaled to --rounds",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    df = simulate_battles(args.votes, args.models, args.seed)
    print(f"{len(df):,} battles among {args.models} models, {args.rounds} bootstrap rounds")
    ours, ours_s = evalhub(df, args.rounds)
    print(f"evalhub: {ours_s:.2f} s (point fit + {args.rounds} rounds)")
    stock, fc_s = fastchat(df, min(args.fastchat_rounds, args.rounds))
    fc_s = fc_s * args.rounds / 100
    how = (
        "measured"
        if args.fastchat_rounds >= args.rounds
        else f"{args.fastchat_rounds} rounds measured, scaled to {args.rounds}"
    )
    print(f"fastchat: {fc_s:.2f} s (point fit + {args.rounds} rounds; {how})")
    reference = fastchat_converged(df)
    diff = float((ours - reference[ours.index]).abs().max())
    stock_diff = float((ours - stock[ours.index]).abs().max())
    print(
        f"max |rating diff| vs fastchat at its default tol=1e-4: {stock_diff:.4f} Elo "
        "(its lbfgs stops early)"
    )
    print(f"speedup_vs_fastchat={fc_s / ours_s:.1f} max_rating_diff={diff:.2e}")


if __name__ == "__main__":
    main()
