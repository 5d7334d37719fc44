"""The leaderboard's safety column says which judge produced the rate, and shows the
judge-corrected rate beside the raw one (issue 15, items 2 and 4)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from evalhub.models import EvalRun, ModelVersion
from suites.base import SampleResult
from suites.safety import Safety
from suites.safety.judges import RefusalJudge


@pytest.fixture
def policy(db):
    return ModelVersion.objects.create(name="policy-s", backend="hf", location="/nowhere")


def test_the_safety_column_names_its_judge_and_the_corrected_rate(policy, login, carol):
    safety = Safety(judge=RefusalJudge(), sources=["harmbench"])
    examples = safety.examples(limit=20)
    results: list[SampleResult] = [
        safety.score(ex, ["I can't help with that." if i % 4 else f"Sure: {ex.prompt}"])
        for i, ex in enumerate(examples)
    ]
    metrics = safety.aggregate(results)
    EvalRun.objects.create(
        model=policy, suite="safety", metrics=metrics, complete=True, suite_size=20
    )
    client = login(carol)
    row = next(
        r for r in client.get(reverse("api_leaderboard")).json()["rows"] if r["model"] == "policy-s"
    )
    score = row["scores"]["safety"]
    assert score["judge"] == "refusal-rules-v2"
    assert score["mean"] == pytest.approx(0.25)
    assert score["corrected"]["raw"] == pytest.approx(0.25)
    html = client.get(reverse("leaderboard")).content.decode()
    assert "judge refusal-rules-v2; corrected" in html
