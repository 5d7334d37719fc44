"""Generation jobs: prompts × models → responses → a grading campaign; resumable; registry."""

from pathlib import Path

import pytest

from core.jobs import KINDS, execute, job_submit
from core.models import Job, JobStep
from core.params import ParamError
from evalhub.generation import pair_plan
from evalhub.models import ModelVersion
from evalhub.promptsets import prompt_set_import
from evalhub.registry import backend_for, checkpoint_stats
from grading.models import Campaign, Item
from models.backends import GenerationArgs

pytestmark = pytest.mark.django_db

PROMPTS = [
    "Name a colour.",
    "Say hello.",
    "Count to three.",
    "Name a fruit.",
    "Name a day.",
    "Name a month.",
    "Name a planet.",
    "Name a metal.",
    "Name a tree.",
]


@pytest.fixture
def two_models(smollm2_checkpoint):
    return [
        ModelVersion.objects.create(
            name=name, backend="builtin", location=str(smollm2_checkpoint), params={"batch_size": 8}
        )
        for name in ("smol-a", "smol-b")
    ]


def _run(params):
    job = Job.objects.create(kind="generate", params=params)
    execute(job.pk, KINDS["generate"].job_fn)
    job.refresh_from_db()
    return job


def test_a_generation_job_makes_a_side_by_side_campaign(two_models):
    job = _run(
        {
            "models": [m.pk for m in two_models],
            "prompts": PROMPTS,
            "max_new_tokens": 4,
            "campaign": {"name": "smol vs smol", "overlap": 2},
        }
    )
    assert job.status == "succeeded", job.error
    campaign = Campaign.objects.get(pk=job.result["campaign_id"])
    assert campaign.kind == "side_by_side" and campaign.items.count() == len(PROMPTS)
    item = Item.objects.get(campaign=campaign, prompt="Say hello.")
    assert sorted(item.responses.values_list("model_name", flat=True)) == ["smol-a", "smol-b"]
    assert all(r.text for r in item.responses.all())
    assert job.steps.count() == 4  # 2 models × 2 batches of up to 8 prompts


def test_a_resumed_generation_job_does_not_redo_finished_batches(two_models):
    params = {"models": [m.pk for m in two_models], "prompts": PROMPTS, "max_new_tokens": 3}
    job = Job.objects.create(kind="generate", params=params, status="running", attempts=1)
    canned = ["already done"] * 8
    JobStep.objects.create(job=job, key=f"{two_models[0].pk}:0", output=canned, attempt=1)
    execute(job.pk, KINDS["generate"].job_fn)
    job.refresh_from_db()
    assert job.status == "succeeded" and job.attempts == 2
    steps = dict(job.steps.values_list("key", "attempt"))
    assert steps[f"{two_models[0].pk}:0"] == 1 and steps[f"{two_models[1].pk}:0"] == 2
    assert job.steps.get(key=f"{two_models[0].pk}:0").output == canned


def test_bad_generation_parameters_fail_the_job_clearly(two_models):
    job = _run({"models": [999], "prompts": PROMPTS})
    assert job.status == "failed" and "registered model" in job.error
    job = _run({"models": [two_models[0].pk], "prompts": "not a list"})
    assert job.status == "failed" and "'prompts'" in job.error


def test_pairs_rotate_through_every_pair_of_models():
    plan = pair_plan(6, 3)
    assert [(a, b) for _, a, b in plan] == [(0, 1), (0, 2), (1, 2)] * 2


def test_checkpoint_stats_count_parameters(smollm2_checkpoint):
    stats = checkpoint_stats(smollm2_checkpoint)
    assert 134_000_000 < stats["n_params"] < 135_000_000
    assert stats["bits_per_weight"] == pytest.approx(32, abs=0.1)


def test_a_broken_model_file_fails_the_job_with_a_clear_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    model = ModelVersion.objects.create(name="broken", backend="builtin", location=str(broken))
    job = _run({"models": [model.pk], "prompts": ["hi"], "max_new_tokens": 2})
    assert job.status == "failed" and "corrupt JSON" in job.error


MT_BENCH = Path(__file__).parents[1] / "data" / "mt_bench_question.jsonl"


def test_mt_bench_is_answered_turn_by_turn_and_graded_side_by_side_on_turn_2(two_models):
    prompt_set = prompt_set_import(
        name="mt-bench", data=MT_BENCH.read_bytes(), filename="question.jsonl"
    )
    job = _run(
        {
            "models": [m.pk for m in two_models],
            "prompt_set": "mt-bench",
            "max_new_tokens": 6,
            "campaign": {"name": "mt turn 2", "kind": "side_by_side", "turn": 2, "overlap": 1},
        }
    )
    assert job.status == "succeeded", job.error
    assert job.steps.count() == 4  # 2 models × 2 turns × 1 batch of 3 conversations
    assert job.result["prompt_set"]["hash"] == prompt_set.content_hash
    assert job.result["prompt_set"]["version"] == 1 and job.result["turns"] == 2

    # Turn 2 saw the model's own turn-1 answer: the same chats, built by hand, give the same text.
    model = two_models[0]
    turn1 = job.steps.get(key=f"{model.pk}:0").output
    turn2 = job.steps.get(key=f"{model.pk}:t2:0").output
    backend = backend_for(model)
    chats = [
        [
            {"role": "user", "content": r["turns"][0]},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": r["turns"][1]},
        ]
        for r, answer in zip(prompt_set.records, turn1, strict=True)
    ]
    args = GenerationArgs(max_new_tokens=6, temperature=0.0, seed=0)
    assert backend.generate([backend.chat_format(c) for c in chats], args) == turn2

    campaign = Campaign.objects.get(pk=job.result["campaign_id"])
    assert campaign.kind == "side_by_side" and campaign.items.count() == 3
    item = campaign.items.get(metadata__record="101")
    assert item.prompt == prompt_set.records[1]["turns"][1]
    assert item.metadata["turn"] == 2
    assert item.metadata["prompt_set_hash"] == prompt_set.content_hash
    # the turn's reference answer, where the prompt set has one, is what the LLM judge reads
    assert item.metadata["reference"] == prompt_set.records[1]["reference"][1]
    assert "reference" not in campaign.items.get(metadata__record="81").metadata
    for response in item.responses.all():
        # each side shows its own earlier turn, then the graded turn-2 answer
        assert response.text.endswith(turn2[1]) and "Earlier in this conversation" in response.text


def test_a_generation_job_naming_an_unknown_prompt_set_is_refused_at_submission(two_models):
    with pytest.raises(ParamError) as err:
        job_submit(kind="generate", params={"models": [two_models[0].pk], "prompt_set": "nope"})
    assert err.value.field == "params.prompt_set" and not Job.objects.exists()
    with pytest.raises(ParamError) as err:
        job_submit(kind="generate", params={"models": [two_models[0].pk], "source": "mt-bench"})
    assert err.value.field == "params.source"


def test_a_single_sided_campaign_grades_every_turn_with_the_earlier_turns_as_context(two_models):
    prompt_set_import(name="mt-bench", data=MT_BENCH.read_bytes(), filename="question.jsonl")
    model = two_models[0]
    job = _run(
        {
            "models": [model.pk],
            "prompt_set": "mt-bench@1",
            "max_new_tokens": 3,
            "campaign": {"name": "mt single", "overlap": 1},
        }
    )
    assert job.status == "succeeded", job.error
    campaign = Campaign.objects.get(pk=job.result["campaign_id"])
    assert campaign.kind == "single_sided" and campaign.items.count() == 6  # 3 questions × 2 turns
    first = campaign.items.get(metadata__record="111", metadata__turn=1)
    second = campaign.items.get(metadata__record="111", metadata__turn=2)
    turn1 = first.responses.get().text
    assert first.prompt == "What is 17 multiplied by 3?" and first.context == []
    assert second.prompt.startswith("Now add 9") and second.context == [
        {"role": "user", "content": "What is 17 multiplied by 3?"},
        {"role": "assistant", "content": turn1},
    ]
    from evalhub.judging import case_for

    assert (first.metadata["reference"], second.metadata["reference"]) == ("51", "10")
    assert case_for(second, ["x"]).reference == "10"  # the judge reads each turn's own
