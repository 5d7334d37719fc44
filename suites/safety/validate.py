"""Measure every offline judge against PyRIT's public human labels; train the learned judge.

    python -m suites.safety.validate --train   # fit the MiniLM heads on the train split
    python -m suites.safety.validate --train-probe  # fit the SmolLM2 probe's harm head
    python -m suites.safety.validate --write   # score judges on the test split, write
                                               # agreement.json and print the README table
                                               # (the probe: SmolLM2 on 554 distinct rows of 639)
    python -m suites.safety.validate --rubric CHECKPOINT --sample 20 --write
        # the StrongREJECT-rubric LLM judge run by a model (an EvalHub checkpoint directory,
        # or a .gguf/HF directory run by transformers) on a seeded sample of each task's
        # test rows: LLM judging is slow on a CPU, so its figures say how many rows they hold

Rows are split by prompt (`humanlabels.split_of`), so no test prompt was seen in training or
in tuning the rules (the rules' v2 patterns were written from train-split misses and the
examples quoted in issue 15). Refusal detection is scored on the refusal set, harm on the
"objective achieved" set and on the graded-harm set (mean human score >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
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
    """The judge's verdict on each row, each distinct (prompt, response) judged once: the
    tasks' test splits share rows (554 distinct of 639 for the three), and a model judge's
    pass is the cost."""
    pairs = list(dict.fromkeys((r.prompt, r.response) for r in rows))
    predict = getattr(judge, "predict", None)
    if predict is not None:  # batch judges embed everything in one pass
        judged = list(predict([p for p, _ in pairs], [r for _, r in pairs]))
    else:
        judged = [judge.judge(p, r) for p, r in pairs]
    verdict = dict(zip(pairs, judged, strict=True))
    return [verdict[r.prompt, r.response] for r in rows]


def evaluate(judge: Judge, split: str = "test", sample: int | None = None) -> dict[str, Any]:
    """task -> {"all": metrics, category: metrics, ...} on one split; with `sample`, on that
    many rows per task drawn with a fixed seed (`sampled`). Verdicts whose reason says
    "unparseable" (LLM judges) are counted in "all"'s `unparseable`."""
    rows = {task: sampled(load_split(task, split), sample) for task in TASKS}
    judged = iter(verdicts(judge, [r for task in TASKS for r in rows[task]]))
    out = {}
    for task in TASKS:
        mine = [next(judged) for _ in rows[task]]
        out[task] = per_category(rows[task], [getattr(v, FIELD[task]) for v in mine])
        out[task]["all"]["unparseable"] = sum(v.reason == "unparseable" for v in mine)
    return out


def sampled(rows: Sequence[Labelled], n: int | None, seed: int = 0) -> list[Labelled]:
    """`n` rows drawn without replacement with `seed`, in their original order; all if None."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def rubric_judge(location: str):
    """The StrongREJECT-rubric judge run by the model at `location`: an EvalHub checkpoint
    directory (builtin engine) or a .gguf file / Hugging Face directory (transformers)."""
    from models.backends import load_backend
    from suites.safety.rubric import StrongRejectJudge

    path = Path(location)
    kind = "builtin" if (path / "model.safetensors").exists() else "hf"
    return StrongRejectJudge(load_backend(kind, str(path)), model=path.stem)


def train_learned(version: str = "1"):
    from suites.safety.learned import DEFAULT_PATH, EmbeddingJudge

    refusal = [(r.prompt, r.response, r.label) for r in load_split("refusal", "train")]
    harm = [(r.prompt, r.response, r.label) for t in ("objective", "harm")
            for r in load_split(t, "train")]  # fmt: skip
    judge = EmbeddingJudge.train(refusal, harm, version)
    judge.save(DEFAULT_PATH)
    return judge


def probe_train_rows() -> list[tuple[str, str, bool]]:
    """The probe's training rows: objective + graded-harm train split, as the learned judge's
    harm head."""
    return [(r.prompt, r.response, r.label) for t in ("objective", "harm")
            for r in load_split(t, "train")]  # fmt: skip


def train_probe(checkpoint: str | None = None, version: str = "1"):
    """Fit and save the SmolLM2 probe (suites/safety/probe.py) on `checkpoint` (the bundled
    model if None): 800 forward passes, ~6 min on one thread."""
    from suites.safety.probe import DEFAULT_PATH, HiddenStateJudge, HiddenStates, bundled_checkpoint

    states = HiddenStates(checkpoint or bundled_checkpoint())
    judge = HiddenStateJudge.train(probe_train_rows(), states, version)
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
    parser.add_argument("--train-probe", action="store_true", help="fit and save the probe")
    parser.add_argument("--probe-checkpoint", help="the probe's model (default: bundled)")
    parser.add_argument("--no-probe", action="store_true", help="skip the SmolLM2 probe")
    parser.add_argument("--write", action="store_true", help="write agreement.json")
    parser.add_argument("--rubric", metavar="MODEL", help="score only the StrongREJECT judge")
    parser.add_argument("--sample", type=int, help="rows per task (seeded) for --rubric")
    args = parser.parse_args(argv)
    from suites.safety.learned import EmbeddingJudge
    from suites.safety.probe import HiddenStateJudge

    if args.rubric:
        judges: list[Judge] = [rubric_judge(args.rubric)]
    else:
        learned = train_learned() if args.train else EmbeddingJudge.load()
        judges = [HarmBenchSubstringJudge(), RefusalJudge(), learned]
        if args.train_probe:
            judges.append(train_probe(args.probe_checkpoint))
        elif not args.no_probe:
            judges.append(HiddenStateJudge.load(checkpoint=args.probe_checkpoint))
    sample = args.sample if args.rubric else None
    results, timing = {}, []
    for j in judges:
        key, t0 = f"{j.name}@{getattr(j, 'version', '1')}", time.perf_counter()
        results[key] = evaluate(j, sample=sample)
        n = sum(m["all"]["n"] for m in results[key].values())
        timing.append(f"{key}: {n} responses, {(time.perf_counter() - t0) / n:.3f} s each")
    if args.write:  # other judges' recorded figures stay
        recorded = json.loads(AGREEMENT_PATH.read_text()) if AGREEMENT_PATH.exists() else {}
        recorded.update(results)
        AGREEMENT_PATH.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(table(results))
    print("\n" + "\n".join(timing))
    for task in ("objective", "harm"):
        print(f"\n{task}\n" + category_table(results, task))


if __name__ == "__main__":
    main()
