"""The small contract every benchmark suite follows.

A suite turns a data set into model requests and turns model outputs into scores. It never
calls a model: a runner (``suites.runner.run_suite``, the Django job, a notebook) sends the
requests to a backend and hands the outputs back to ``Suite.score``. Keeping the two apart
means one suite definition serves the local PyTorch models, an HTTP endpoint, or outputs
loaded from a file, and the parity tests can score hand-written outputs without a model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from models.backends.base import GenerationArgs  # one definition, shared with the backends
from suites import stats


@dataclass(frozen=True)
class SuiteSpec:
    """Everything besides the model that changes a suite's numbers; stored with every result."""

    split: str
    num_fewshot: int
    fewshot_format: str  # a short human-readable name, e.g. "lm-eval gsm8k-cot (Q:/A:)"
    generation: GenerationArgs | None = None  # None for log-likelihood suites
    chat: bool = False  # True when requests are chat messages for the backend's template

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["generation"] = self.generation.to_dict() if self.generation else None
        return d


Message = Mapping[str, str]  # {"role": "user" | "system" | "assistant", "content": ...}


@dataclass(frozen=True)
class GenerateRequest:
    """Ask the model to continue `prompt`, or to answer chat `messages` (exactly one is set)."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("set exactly one of prompt and messages")


class LoglikelihoodRequest(NamedTuple):
    """Score log P(continuation | context); a plain (context, continuation) pair."""

    context: str
    continuation: str


Request = GenerateRequest | LoglikelihoodRequest


class Loglikelihood(NamedTuple):
    """A backend's answer to one LoglikelihoodRequest."""

    logprob: float  # summed over the continuation's tokens
    is_greedy: bool  # whether greedy decoding would have produced the continuation


@dataclass(frozen=True)
class SampleResult:
    """The score of one example. `metrics` values are floats so any of them can be averaged."""

    id: str
    metrics: dict[str, float]
    extracted: dict[str, str] = field(default_factory=dict)  # answer per extraction pipeline
    details: dict[str, Any] = field(default_factory=dict)  # JSON-safe; for reading failures

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleResult:
        return cls(
            id=d["id"],
            metrics=dict(d["metrics"]),
            extracted=dict(d["extracted"]),
            details=dict(d["details"]),
        )


@dataclass(frozen=True)
class DetailFilter:
    """A list-valued ``details`` key that run pages let researchers filter samples by."""

    key: str  # e.g. "instructions": samples whose details[key] contains the value match
    label: str  # the filter's label on the run page
    example: str = ""  # a value to show as the placeholder


E = TypeVar("E")  # a suite's example type: a frozen dataclass with an `id: str` field


class Suite(Generic[E]):
    """Base class. Subclasses set `name`, `version` and `spec` and implement the three methods.

    `version` changes whenever a prompt, an extraction rule or the data changes the numbers;
    the suite's README keeps the changelog.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    headline: ClassVar[str]  # the per-sample metric leaderboards show and regressions watch
    lower_is_better: ClassVar[bool] = False  # True when the headline counts failures
    category: ClassVar[str] = ""  # the `details` key that groups samples in drilldowns
    detail_filter: ClassVar[DetailFilter | None] = None  # a further drilldown filter, if any
    nightly_limit: ClassVar[int | None] = None  # examples per nightly run; None: not nightly
    # True when `score` asks a harm judge (`self.judge`, a `judge=` constructor argument): a
    # registered reward model may stand in for it, and human grades measure its agreement.
    judged: ClassVar[bool] = False
    spec: SuiteSpec

    def examples(self, limit: int | None = None) -> list[E]:
        """The scored examples in a fixed order; the first `limit` when given (a preview for
        tests and notebooks: runs score `sample(limit, seed)`, which is not the first N)."""
        raise NotImplementedError

    def category_of(self, ex: E) -> Hashable:
        """The stratum `sample` draws `ex` from: the example's `category` field (MMLU's
        subject, BFCL's and the safety suites' category), or one stratum for suites without."""
        return getattr(ex, self.category, None) if self.category else None

    def sample(self, limit: int | None = None, seed: int = 0) -> list[E]:
        """The examples a run with this `limit` and `seed` scores (`stratified_sample`)."""
        return stratified_sample(self.examples(), limit, seed, self.category_of)

    def requests(self, ex: E) -> list[Request]:
        """What to ask the model for one example; all of one kind (generate or loglikelihood)."""
        raise NotImplementedError

    def score(self, ex: E, outputs: Sequence[Any]) -> SampleResult:
        """Score one example. `outputs[i]` answers `requests(ex)[i]`: a str for a
        GenerateRequest (stop strings already applied), a Loglikelihood otherwise."""
        raise NotImplementedError

    def aggregate(self, results: Sequence[SampleResult]) -> dict[str, Any]:
        """Mean of every metric with a 95% interval (Wilson for 0/1 metrics, else bootstrap)."""
        return mean_metrics(results)

    def describe(self) -> dict[str, Any]:
        """What a stored result must carry to be reproducible."""
        return {"suite": self.name, "version": self.version, "spec": self.spec.as_dict()}


def mean_metrics(results: Sequence[SampleResult]) -> dict[str, Any]:
    """Per metric: mean, n and a 95% interval; metrics missing from a sample are skipped."""
    keys = sorted({k for r in results for k in r.metrics})
    out: dict[str, Any] = {"n": len(results)}
    for key in keys:
        values = [r.metrics[key] for r in results if key in r.metrics]
        out[key] = summarize(values)
    return out


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% interval: Wilson when every value is 0 or 1, percentile bootstrap otherwise."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "n": 0, "ci_low": float("nan"), "ci_high": float("nan")}
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = stats.wilson_interval(int(sum(values)), n)
    else:
        _, lo, hi = stats.bootstrap_mean_ci(values)
    return {"mean": mean, "n": n, "ci_low": lo, "ci_high": hi}


def package_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing it.

    `find_spec(...).submodule_search_locations` avoids running the package's `__init__`,
    which for some data packages imports heavy libraries. Raises FileNotFoundError with the
    package name when it is not installed, so the message says what to install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed for {relative})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def stratified_sample(
    items: Sequence[E], limit: int | None, seed: int, key: Callable[[E], Hashable]
) -> list[E]:
    """`limit` of `items` drawn at random with `seed`, each stratum (`key`) keeping its share,
    returned in the items' own order (MMLU's subjects stay together for prefix caching).

    Stratum sizes are proportional to the population's by largest remainder (Hamilton's
    method: floor of each quota, then one more to the largest remainders, ties broken by the
    seeded generator), so a stratum never gets more than one example off its exact share.
    Every item when `limit` is None or at least the population size.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        strata[key(item)].append(i)
    rng = random.Random(seed)
    order = sorted(strata, key=str)  # a fixed order, so one seed gives one sample
    quota = {s: limit * len(strata[s]) for s in order}  # exact share times len(items)
    counts = {s: quota[s] // len(items) for s in order}
    tiebreak = {s: rng.random() for s in order}
    by_remainder = sorted(order, key=lambda s: (-(quota[s] % len(items)), tiebreak[s]))
    for s in by_remainder[: limit - sum(counts.values())]:
        counts[s] += 1
    chosen = sorted(i for s in order for i in rng.sample(strata[s], counts[s]))
    return [items[i] for i in chosen]


def take(items: Iterable[E], limit: int | None) -> list[E]:
    items = list(items)
    return items if limit is None else items[:limit]
