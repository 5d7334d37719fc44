"""Compression on the platform: a compress job palettizes a registered model on real text,
measures it against its parent, saves a small checkpoint that the builtin backend serves, and
the model page shows the layer table, the comparison and the bpw/KL plot."""

from pathlib import Path

import pytest
from django.urls import reverse

from core.jobs import KINDS, execute
from core.models import Job
from evalhub.models import EvalRun, ModelVersion

pytestmark = pytest.mark.django_db


def _compress(params: dict) -> Job:
    job = Job.objects.create(kind="compress", params=params)
    execute(job.pk, KINDS["compress"].job_fn)
    job.refresh_from_db()
    return job


def test_a_compress_job_registers_a_small_palettized_child_that_generates(
    parent,  # noqa: F811
    login,
    carol,
):
    job = _compress(
        {
            "model_id": parent.pk,
            "layer_bits": {"blocks.0.mlp.w2": 2},
            "calib_seqs": 2,
            "eval_seqs": 2,
            "max_len": 64,
            "suites": ["gsm8k"],
            "eval_limit": 2,
        }
    )
    assert job.status == "succeeded", job.error
    child = ModelVersion.objects.get(pk=job.result["model_id"])
    assert child.parent == parent and child.relation == "compressed_from"
    info = child.info["compression"]
    bits = {r["name"]: r["bits"] for r in info["layers"]}
    assert bits["blocks.0.mlp.w2"] == 2 and bits["blocks.1.mlp.w2"] == 4 and bits["tok_emb"] == 4
    # a 64-wide tiny layer pays 16 fp16 entries per 16 × 64 weights: +0.25 bpw for tables
    assert 2.0 < child.bits_per_weight < 4.3 and child.bits_per_weight == info["scheme"]["bpw"]
    quality = info["quality"]
    assert quality["kl"] > 0 and 0 <= quality["top1"] <= 1 and quality["tokens"] > 0
    dense = (Path(parent.location) / "model.safetensors").stat().st_size
    assert (Path(child.location) / "model.safetensors").stat().st_size < dense / 4
    assert EvalRun.objects.get(model=child).suite == "gsm8k"

    from evalhub.registry import backend_for
    from models.backends import GenerationArgs

    text = backend_for(child).generate(["Hello"], GenerationArgs(max_new_tokens=4))
    assert len(text) == 1  # the palettized checkpoint loads and decodes through the backend

    client = login(carol)
    page = client.get(reverse("model_detail", args=[parent.pk])).content.decode()
    assert child.name in page and "KL against bits per weight" in page
    child_page = client.get(reverse("model_detail", args=[child.pk])).content.decode()
    assert "blocks.0.mlp.w2" in child_page and "Palettization, layer by layer" in child_page


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bits": 3}, "'bits'"),
        ({"layer_bits": {"blocks.0.mlp.w2": 8}}, "'layer_bits'"),
        ({"layer_bits": {"no.such.layer": 2}}, "no.such.layer"),
        ({"calib_seqs": 0}, "'calib_seqs'"),
    ],
)
def test_bad_compression_parameters_fail_clearly(params, message, parent):  # noqa: F811
    job = _compress({"model_id": parent.pk, "calib_seqs": 1, "eval_seqs": 1, **params})
    assert job.status == "failed" and message in job.error and not job.traceback
    assert ModelVersion.objects.count() == 1


def test_the_model_page_starts_a_compression_job(parent, login, carol):  # noqa: F811
    client = login(carol)
    response = client.post(
        reverse("model_compress", args=[parent.pk]),
        {"bits": "4", "embedding_bits": "", "calib_seqs": 8, "suites": ["mmlu"]},
    )
    job = Job.objects.get()
    assert response.status_code == 302 and job.kind == "compress"
    assert job.params["embedding_bits"] is None and job.params["bits"] == 4
    bad = client.post(reverse("model_compress", args=[parent.pk]), {"bits": "3"})
    assert bad.status_code == 400 and Job.objects.count() == 1


def test_a_mixed_precision_job_meets_its_target_and_shows_the_sensitivity_table(
    parent,  # noqa: F811
    login,
    carol,
):
    job = _compress(
        {
            "model_id": parent.pk,
            "target_bpw": 3.5,
            "calib_seqs": 2,
            "eval_seqs": 1,
            "max_len": 48,
            "suites": [],
        }
    )
    assert job.status == "succeeded", job.error
    child = ModelVersion.objects.get(pk=job.result["model_id"])
    info = child.info["compression"]
    rows = info["sensitivity"]["layers"]
    assert len(rows) == 9  # 2 blocks × 4 projections and the embedding (tied head)
    assert child.bits_per_weight <= 3.5 and {r["chosen"] for r in rows} == {2, 4}
    assert {r["name"]: r["bits"] for r in info["layers"]} == {r["name"]: r["chosen"] for r in rows}
    page = login(carol).get(reverse("model_detail", args=[child.pk])).content.decode()
    assert "Sensitivity and chosen bits" in page and "2-bit" in page


def test_a_recovery_adapter_closes_part_of_the_gap_and_is_served_through_v1(
    parent,  # noqa: F811
    client,
    carol,
    inference_server,
):
    client.force_login(carol)
    compressed = _compress(
        {
            "model_id": parent.pk,
            "bits": 2,
            "calib_seqs": 2,
            "eval_seqs": 2,
            "max_len": 48,
            "suites": [],
        }
    )
    assert compressed.status == "succeeded", compressed.error
    base = ModelVersion.objects.get(pk=compressed.result["model_id"])
    job = Job.objects.create(
        kind="adapter.recovery",
        params={
            "model_id": base.pk,
            "rank": 8,
            "steps": 12,
            "lr": 3e-3,
            "batch_size": 2,
            "train_seqs": 6,
            "eval_seqs": 2,
            "max_len": 48,
            "suites": [],
        },
    )
    execute(job.pk, KINDS["adapter.recovery"].job_fn)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    adapter = ModelVersion.objects.get(pk=job.result["model_id"])
    assert adapter.kind == "adapter" and adapter.parent == base
    assert adapter.relation == "adapter_of" and adapter.location == base.location
    quality = adapter.info["adapter"]["quality"]
    assert quality["after"]["kl"] < quality["before"]["kl"]  # the adapter recovers some
    assert adapter.info["adapter"]["init"] == "error"  # the default start
    files = sorted(p.name for p in Path(adapter.params["adapter"]).iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # PEFT's layout
    assert len(job.data["curves"]["loss"]["value"]) == 12

    from core.models import ApiToken

    _, token = ApiToken.issue(user=carol, name="v1")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    names = [m["id"] for m in client.get("/v1/models", **auth).json()["data"]]
    assert adapter.name in names
    response = client.post(
        "/v1/completions",
        data={"model": adapter.name, "prompt": "Hello", "max_tokens": 3},
        content_type="application/json",
        **auth,
    )
    assert response.status_code == 200, response.content
    assert response.json()["model"] == adapter.name

    page = client.get(reverse("model_detail", args=[adapter.pk])).content.decode()
    assert "Recovery adapter" in page and "recovered" in page
    base_page = client.get(reverse("model_detail", args=[base.pk])).content.decode()
    assert "Train a recovery adapter" in base_page
    started = client.post(reverse("model_recover", args=[base.pk]), {"rank": 16, "steps": 5})
    assert started.status_code == 400  # lr and training sequences missing: nothing queued
    assert Job.objects.filter(kind="adapter.recovery").count() == 1
