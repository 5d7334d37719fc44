"""Every job kind checks its parameters when submitted (issue 13, item 4): through
POST /api/jobs/ a bad parameter is a 400 naming the field and no Job row, good ones a 201; the
README's tables of job kinds are the declarations' own."""

import json
import math
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from core.jobs import KINDS, JobError, job_submit
from core.models import ApiToken, Job
from core.params import Param, ParamError, Params, one_of
from evalhub.management.commands.jobkinds import README_END, README_START, readme_section
from evalhub.models import EvalRun, ModelVersion
from tests.factories import make_campaign

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(db):
    """The rows the kinds' ids point at: a builtin policy, its compressed child, a reward
    model, a side-by-side campaign and an eval run."""
    policy = ModelVersion.objects.create(name="tiny", backend="builtin", location="/m/tiny")
    compressed = ModelVersion.objects.create(
        name="tiny-pal",
        backend="builtin",
        location="/m/tiny-pal",
        relation=ModelVersion.COMPRESSED,
        parent=policy,
    )
    reward = ModelVersion.objects.create(
        name="rm", kind=ModelVersion.REWARD, backend="reward", location="/m/rm"
    )
    campaign = make_campaign(name="prefs")
    single = make_campaign(name="harm", kind="single_sided")
    run = EvalRun.objects.create(model=policy, suite="gsm8k")
    return {
        "policy": policy.pk,
        "compressed": compressed.pk,
        "reward": reward.pk,
        "campaign": campaign.pk,
        "single": single.pk,
        "run": run.pk,
    }


# kind → (good params, bad params, the field the 400 must name); ids are world's keys.
CASES = {
    "demo": ({"steps": 2, "delay": 0}, {"steps": 0}, "params.steps"),
    "generate": (
        {"models": ["policy"], "prompts": ["Hi"], "campaign": {"kind": "single_sided"}},
        {"models": ["policy"], "source": "no-such-set"},
        "params.source",
    ),
    "models.import": (
        {"src": "/data/model.gguf", "name": "imported"},
        {"src": "/data/model.gguf", "name": "../etc"},
        "params.name",
    ),
    "evaluate": ({"run_id": "run"}, {"run_id": 999_999}, "params.run_id"),
    "reward.train": (
        {"campaign_ids": ["campaign"], "epochs": 2},
        {"campaign_ids": ["campaign"], "loss": "hinge"},
        "params.loss",
    ),
    "posttrain.sft": (
        {"model_id": "policy", "campaign_ids": ["campaign"], "lora_rank": 8},
        {"model_id": "policy", "campaign_ids": ["campaign"], "epochs": "many"},
        "params.epochs",
    ),
    "posttrain.dpo": (
        {"model_id": "policy", "jsonl": "/data/prefs.jsonl", "loss": "ipo"},
        {"model_id": "policy", "jsonl": "/data/prefs.jsonl", "loss": "kto"},
        "params.loss",
    ),
    "posttrain.rl": (
        {"model_id": "policy", "algorithm": "rloo_clip", "k": 4, "reward_model": "reward"},
        {"model_id": "policy", "k": 1},
        "params.k",
    ),
    "itec.round": (
        {"committee": ["policy"], "source": "alpaca-eval", "reward_model": "reward"},
        {"committee": ["policy"], "source": "alpaca-eval", "reward_model": "policy"},
        "params.reward_model",
    ),
    "compress": (
        {"model_id": "policy", "bits": 2, "embedding_bits": None, "suites": []},
        {"model_id": "policy", "bits": 3},
        "params.bits",
    ),
    "adapter.recovery": (
        {"model_id": "compressed", "rank": 8, "steps": 10},
        {"model_id": "policy"},
        "params.model_id",
    ),
    "adapter.train": (
        {"model_id": "policy", "source": "alpaca-eval", "limit": 4},
        {"model_id": "policy", "source": "alpaca-eval", "suites": ["ifeval", "hellaswag"]},
        "params.suites[1]",
    ),
    "judge": (
        {"campaign_id": "campaign", "model_id": "policy", "swap": False},
        {"campaign_id": "campaign", "model_id": "reward"},
        "params.model_id",
    ),
    "safety.judge.train": (
        {"campaign_ids": ["single"], "public": False, "l2": 2},
        {"campaign_ids": ["campaign"]},
        "params.campaign_ids[0]",
    ),
    "grading.export": (
        {"campaign_id": "campaign", "format": "csv", "include_ties": True},
        {"campaign_id": "campaign", "format": "xlsx"},
        "params.format",
    ),
}


def resolve(value, world: dict):
    """world's names in a case's params replaced by the rows' ids."""
    if isinstance(value, dict):
        return {k: resolve(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, world) for v in value]
    return world.get(value, value) if isinstance(value, str) else value


def submit(client, raw: str, kind: str, params: dict):
    return client.post(
        reverse("api_jobs"),
        data=json.dumps({"kind": kind, "params": params}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )


@pytest.fixture
def token(carol) -> str:
    return ApiToken.issue(user=carol, name="ci")[1]


def test_every_job_kind_has_a_case_here():
    missing = sorted(set(KINDS) - set(CASES))
    assert not missing, f"add a good and a bad submission for {missing} to CASES"


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_bad_parameter_is_a_400_naming_it_and_makes_no_job(client, token, world, kind):
    _, bad, field = CASES[kind]
    response = submit(client, token, kind, resolve(bad, world))
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["field"] == field and body["error"].startswith(field + " ")
    assert not Job.objects.exists()


@pytest.mark.parametrize("kind", sorted(CASES))
def test_good_parameters_make_a_queued_job_as_given(client, token, world, kind):
    good = resolve(CASES[kind][0], world)
    response = submit(client, token, kind, good)
    assert response.status_code == 201, response.content
    job = Job.objects.get(kind=kind)
    assert job.status == Job.QUEUED and job.params == good


@pytest.mark.parametrize("kind", sorted(CASES))
def test_an_unknown_parameter_is_refused_by_name(client, token, world, kind):
    params = {**resolve(CASES[kind][0], world), "temprature": 0.5}
    response = submit(client, token, kind, params)
    assert response.status_code == 400
    assert response.json()["field"] == "params.temprature"
    assert "is not a parameter of this kind" in response.json()["error"]
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "params, field, words",
    [
        (
            {"models": ["policy"], "prompts": ["Hi"], "temperature": 5},
            "params.temperature",
            "must be between 0 and 2, got 5",
        ),
        ({"prompts": ["Hi"]}, "params.models", "is required"),
        ({"models": ["policy"]}, "params.prompts", "or `source`"),
        ({"models": ["policy", "policy"], "prompts": ["Hi"]}, "params.models", "each once"),
        ({"models": ["policy", 999_999], "prompts": ["Hi"]}, "params.models[1]", "registered"),
        ({"models": ["reward"], "prompts": ["Hi"]}, "params.models[0]", "registered policy"),
        ({"models": ["policy"], "prompts": ["Hi", 3]}, "params.prompts[1]", "a string"),
        ({"models": ["policy"], "prompts": []}, "params.prompts", "is required"),
        ({"models": ["policy"], "prompts": ["Hi"], "seed": True}, "params.seed", "an integer"),
        ({"models": ["policy"], "prompts": ["Hi"], "reranker": "reward"}, "params.temperature", ""),
        (
            {"models": ["policy"], "prompts": ["Hi"], "campaign": {"overlap": 0}},
            "params.campaign.overlap",
            "between 1 and 20",
        ),
        (
            {"models": ["policy"], "prompts": ["Hi"], "campaign": {"kind": "side_by_side"}},
            "params.campaign",
            "two models",
        ),
    ],
)
def test_generation_parameters_are_checked_field_by_field(
    client, token, world, params, field, words
):
    response = submit(client, token, "generate", resolve(params, world))
    assert response.status_code == 400
    assert response.json()["field"] == field and words in response.json()["error"]
    assert not Job.objects.exists()


def test_job_submit_itself_checks_so_forms_and_commands_cannot_skip_it(world):
    with pytest.raises(ParamError) as caught:
        job_submit(kind="compress", params={"model_id": world["reward"]})
    assert caught.value.field == "params.model_id"
    assert isinstance(caught.value, JobError) and not Job.objects.exists()


def test_numbers_are_normalised_and_non_finite_ones_refused():
    spec = Params((Param("x", float, "x", min=0), Param("n", int, "n")))
    assert spec.validate({"x": 2, "n": 3.0}) == {"x": 2.0, "n": 3}
    assert type(spec.validate({"x": 2})["x"]) is float
    for bad in (math.nan, math.inf):
        with pytest.raises(ParamError, match="finite"):
            spec.validate({"x": bad})
    with pytest.raises(ParamError, match="params.n must be an integer, got number 2.5"):
        spec.validate({"n": 2.5})


def test_defaults_are_not_written_into_the_params():
    spec = Params((Param("a", int, "a", default=3), Param("b", str, "b")), (one_of("a", "b"),))
    assert spec.validate({"b": "x"}) == {"b": "x"}
    with pytest.raises(ParamError, match=r"params.a or `b` is required"):
        spec.validate({})


def test_the_import_form_shows_a_taken_name_as_a_form_error(login, carol, world):
    response = login(carol).post(reverse("model_import"), {"src": "/data/x.gguf", "name": "tiny"})
    assert response.status_code == 400
    assert b"already the name of a registered model" in response.content
    assert not Job.objects.exists()


def test_the_readme_tables_are_the_declarations():
    readme = (Path(settings.BASE_DIR) / "README.md").read_text()
    start, end = readme.index(README_START), readme.index(README_END) + len(README_END)
    assert readme[start:end] == readme_section(), (
        "README.md's job kinds section is out of date: run "
        "`.venv/bin/python manage.py jobkinds --markdown --write`"
    )


def test_the_jobkinds_command_lists_each_kind_with_its_parameters(capsys):
    call_command("jobkinds")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == sorted(KINDS)
    assert "generate: models, prompts" in "\n".join(lines)


@pytest.mark.parametrize(
    "kind, field", [("generate", "params.models"), ("judge", "params.model_id")]
)
def test_a_safety_judge_cannot_be_asked_to_generate(client, token, world, kind, field):
    judge = ModelVersion.objects.create(
        name="a-judge", kind=ModelVersion.JUDGE, backend="safety_judge", location="/x.json"
    )
    params = (
        {"models": [judge.pk], "prompts": ["hi"]}
        if kind == "generate"
        else {"model_id": judge.pk, "campaign_id": world["campaign"]}
    )
    response = submit(client, token, kind, params)
    assert response.status_code == 400 and response.json()["field"].startswith(field)
    assert not Job.objects.exists()
