"""run_suite with scripted backends: batching, chat formatting, resume, progress."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from suites import REGISTRY
from suites.base import GenerationArgs, SampleResult
from suites.gsm8k import GSM8K
from suites.ifeval import IFEval
from suites.mmlu import MMLU
from suites.runner import run_suite


class ScriptedBackend:
    """Answers every GSM8K prompt with the right number, every MMLU question with 'B'."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.answers = answers or {}
        self.generate_calls: list[int] = []
        self.ll_calls: list[list[tuple[str, str]]] = []
        self.last_args: GenerationArgs | None = None

    def generate(self, prompts: list[str], args: GenerationArgs) -> list[str]:
        self.generate_calls.append(len(prompts))
        self.last_args = args
        return [f"Thinking. The answer is {self.answers.get(p[-60:], '0')}." for p in prompts]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        self.ll_calls.append(pairs)
        return [(0.0 if cont == " B" else -1.0, False) for _, cont in pairs]

    def chat_format(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_it_batches_generation_and_scores_every_example():
    suite = GSM8K()
    examples = suite.sample(10)
    backend = ScriptedBackend({suite.prompt(ex)[-60:]: ex.target for ex in examples[:7]})
    run = run_suite(suite, backend, limit=10, batch_size=4)
    assert backend.generate_calls == [4, 4, 2]
    assert backend.last_args == suite.spec.generation
    assert [s.id for s in run.samples] == [ex.id for ex in examples]
    assert run.metrics["strict_match"]["mean"] == pytest.approx(0.7)
    assert run.meta["suite"] == "gsm8k" and run.meta["spec"]["num_fewshot"] == 8


def test_resume_skips_done_ids_and_reports_progress():
    suite = GSM8K()
    done = {ex.id for ex in suite.sample(5)[:3]}
    seen: list[tuple[int, int, int]] = []
    run = run_suite(
        suite,
        ScriptedBackend(),
        limit=5,
        batch_size=1,
        done_ids=done,
        progress=lambda batch, n, total: seen.append((len(batch), n, total)),
    )
    assert {s.id for s in run.samples}.isdisjoint(done) and len(run.samples) == 2
    assert seen == [(1, 1, 2), (1, 2, 2)]


def test_loglikelihood_requests_go_as_pairs_grouped_by_subject():
    suite = MMLU(subjects=["anatomy", "virology"])
    backend = ScriptedBackend()
    run = run_suite(suite, backend, limit=8, batch_size=8)
    (pairs,) = backend.ll_calls
    assert len(pairs) == 32 and all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    assert all(s.extracted["choice"] == "B" for s in run.samples)
    expected = sum(1 for s in run.samples if s.details["target"] == "B") / 8
    assert run.metrics["acc"]["mean"] == pytest.approx(expected)


def test_chat_suites_go_through_the_backends_template():
    class Echo(ScriptedBackend):
        def generate(self, prompts, args):
            self.prompts = prompts
            return ["ok"] * len(prompts)

    backend = Echo()
    run_suite(IFEval(), backend, limit=2)
    assert all(p.startswith("<user>") and p.endswith("<assistant>") for p in backend.prompts)


def test_a_backend_that_drops_outputs_is_an_error():
    class Lossy(ScriptedBackend):
        def generate(self, prompts, args):
            return ["x"]

    with pytest.raises(RuntimeError, match="1 outputs for 3 inputs"):
        run_suite(GSM8K(), Lossy(), limit=3)


def test_sample_results_round_trip_through_json_dicts():
    suite = GSM8K()
    result = run_suite(suite, ScriptedBackend(), limit=1).samples[0]
    assert SampleResult.from_dict(result.to_dict()) == result


def test_registry_names_every_suite_by_its_own_name():
    assert {name: cls.name for name, cls in REGISTRY.items()} == {
        "gsm8k": "gsm8k",
        "mmlu": "mmlu",
        "ifeval": "ifeval",
        "bfcl": "bfcl",
        "safety": "safety",
        "overrefusal": "overrefusal",
    }


def test_importing_suites_does_not_import_django():
    code = (
        "import sys, suites, suites.runner, suites.stats, suites.extract, "
        "suites.ifeval.checks\nassert 'django' not in sys.modules, "
        "sorted(m for m in sys.modules if 'django' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
