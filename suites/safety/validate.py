"""Measure every offline judge against PyRIT's public human labels; train the learned judge.

    python -m suites.safety.validate --train   # fit the MiniLM heads on the train split
    python -m suites.safety.validate --write   # score judges on the test split, write
                                               # agreement.json and print the README table

Rows are split by prompt (`humanlabels.split_of`), so no test prompt was seen in training or
in tuning the rules (the rules' v2 patterns were written from train-split misses and the
examples quoted in issue 15). Refusal detection is scored on the refusal set, harm on the
"objective achieved" set and on the graded-harm set (mean human score >= 0.5).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from suites.safety.humanlabels import AGREEMENT_PATH, TASKS, Labelled, fmt, load_split, per_category
from suites.safety.judges import Judge, RefusalJudge, Verdict, harmbench_refused

FIELD = {"refusal": "refused", "objective": "harmful", "harm": "harmful"}


class HarmBenchSubstringJudge:
    """HarmBench's AdvBench substring list as a judge (the published baseline)."""

    name = "harmbench-substrings"
    version = "8e1604d"

    def judge(self, prompt: str, response: str) -> Verdict:
        refused = harmbench_refused(response)
        return Verdict(refused, not refused, float(refused), "substring" if refused else "none")


def verdicts(judge: Judge, rows: Sequence[Labelled]) -> list[Verdict]:
    predict = getattr(judge, "predict", None)
    if predict is not None:  # batch judges embed everything in one pass
        return list(predict([r.prompt for r in rows], [r.response for r in rows]))
    return [judge.judge(r.prompt, r.response) for r in rows]


def evaluate(judge: Judge, split: str = "test") -> dict[str, Any]:
    """task -> {"all": metrics, category: metrics, ...} on one split."""
    out = {}
    for task in TASKS:
        rows = load_split(task, split)
        predicted = [getattr(v, FIELD[task]) for v in verdicts(judge, rows)]
        out[task] = per_category(rows, predicted)
    return out


def train_learned(version: str = "1"):
    from suites.safety.learned import DEFAULT_PATH, EmbeddingJudge

    refusal = [(r.prompt, r.response, r.label) for r in load_split("refusal", "train")]
    harm = [(r.prompt, r.response, r.label) for t in ("objective", "harm")
            for r in load_split(t, "train")]  # fmt: skip
    judge = EmbeddingJudge.train(refusal, harm, version)
    judge.save(DEFAULT_PATH)
    return judge


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per judge and task (overall), accuracy / kappa / precision / recall."""
    lines = [
        "| judge | task | n | accuracy | κ | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_task in results.items():
        for task, cats in by_task.items():
            m = cats["all"]
            lines.append(
                f"| {name} | {task} | {m['n']} | {fmt(m['accuracy'])} | {fmt(m['kappa'])} | "
                f"{fmt(m['precision'])} | {fmt(m['recall'])} |"
            )
    return "\n".join(lines)


def category_table(results: dict[str, dict[str, Any]], task: str) -> str:
    """Markdown: κ per category of one task, a column per judge."""
    names = list(results)
    cats = [c for c in results[names[0]][task] if c != "all"]
    lines = ["| category | n | " + " | ".join(f"κ {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]  # fmt: skip
    for c in cats:
        n = results[names[0]][task][c]["n"]
        ks = " | ".join(fmt(results[j][task][c]["kappa"]) for j in names)
        lines.append(f"| {c} | {n} | {ks} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="fit and save the learned judge")
    parser.add_argument("--write", action="store_true", help="write agreement.json")
    args = parser.parse_args(argv)
    from suites.safety.learned import EmbeddingJudge

    learned = train_learned() if args.train else EmbeddingJudge.load()
    judges: list[Judge] = [HarmBenchSubstringJudge(), RefusalJudge(), learned]
    results = {f"{j.name}@{getattr(j, 'version', '1')}": evaluate(j) for j in judges}
    if args.write:
        AGREEMENT_PATH.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(table(results))
    for task in ("objective", "harm"):
        print(f"\n{task}\n" + category_table(results, task))


if __name__ == "__main__":
    main()
